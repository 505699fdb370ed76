"""The benchmark result as markdown (README's Performance section)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.testsets import PUBLISHED
from pipeline.files import atomic_path, write_json


def write_report(out: Path, result: dict, text: str) -> None:
    """A benchmark's result as ``<out>.json`` and its markdown ``text`` as ``<out>.md``, each written atomically."""
    write_json(out.with_suffix(".json"), result)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(text, encoding="utf-8")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    m = result["machine"]
    runs = "; ".join(f"{', '.join(r['sections'])} in {r['seconds'] / 60:.1f} min" for r in result["runs"])
    parts = [f"Measured by `python -m benchmarks` on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch "
             f"threads, torch {m['torch']}), profile `{result['profile']}` ({runs})."]
    if "quality" in result:
        parts.append(f"\n**Quality on real photographs** ({result['images_per_set']} images per set; PSNR on RGB "
                     "[0, 255] and on the BT.601 Y channel (the JPEG literature's protocol), SSIM; seconds per image "
                     "on this CPU). Noise: clean + N(0, σ²), a fixed seed per image; JPEG: Pillow at the given "
                     "quality; Kodak24 rows use the project's own degradations (blur kernels known to Wiener / "
                     "Richardson–Lucy). *− UIR-LoRA*: the method's RGB PSNR minus UIR-LoRA's on the same images, "
                     "mean ± its standard error over the images (paired; one run). The last column: published results "
                     "(RGB PSNR, from the test sets' README) — **published, not run here**.")
        benches = list(dict.fromkeys(r["benchmark"] for r in result["quality"]))
        rows = []
        for bench in benches:
            for r in (r for r in result["quality"] if r["benchmark"] == bench):
                paired = r.get("vs_reference")
                rows.append([bench, r["method"], f"{r['psnr']:.2f}",
                             f"{paired['mean']:+.2f} ± {paired['standard_error']:.2f}" if paired else "",
                             f"{r['psnr_y']:.2f}" if "psnr_y" in r else "—",
                             f"{r['ssim']:.3f}", f"{r['seconds_per_image']:.2f}", ""])
            for method, psnr in PUBLISHED.get(bench, {}).items():
                rows.append([bench, method, "", "", "", "", "", f"{psnr:.2f}"])
        parts.append(table(["benchmark", "method", "PSNR", "− UIR-LoRA", "PSNR (Y)", "SSIM", "s / image",
                             "published, not run here"], rows))
        for line in result.get("skipped", []):
            parts.append(f"- skipped {line}")
    if "routing" in result:
        parts.append(f"\n**What the router decides on real photographs** ({result['images_per_set']} images per set; the "
                     "decision `uir restore` acts on: `clean` and `unknown` are left as they are, otherwise the adapters "
                     "applied; *as the truth*: clean photos called clean, degraded ones given exactly their adapters)")
        rows = [[r["benchmark"], str(r["images"]), f"{r['as_truth']} ({100 * r['as_truth'] / r['images']:.0f} %)",
                 str(r["unchanged"]), ", ".join(f"{d} {n}" for d, n in r["decisions"].items())] for r in result["routing"]]
        parts.append(table(["set", "images", "as the truth", "left as they were", "decisions"], rows))
    if "training" in result:
        parts.append("\n**Training throughput** (one optimisation step at the stage's batch and patch size, the "
                     "fastest of the repeats; *before*: PEFT's own LoRA forward, replaced by the merged-weight forward)")
        rows = [[r["stage"], r["variant"], str(r["batch"]), f"{1000 * r['seconds_per_step']:.0f}",
                 f"{r['patches_per_second']:.0f}", f"{r['stage_training_seconds']:.0f}"] for r in result["training"]]
        parts.append(table(["stage", "variant", "batch", "ms / step", "patches / s", "steps × s/step"], rows))
        g = result["growth"]
        parts.append(f"\n**Cost of growth** (training time from the step times above): a new degradation (one LoRA + "
                     f"refitting the router) {g['new_degradation_seconds']:.0f} s, retraining the multi-task model "
                     f"{g['multitask_retrain_seconds']:.0f} s (ratio {g['new_over_multitask']:.2f}), all training stages "
                     f"{g['all_training_seconds']:.0f} s (ratio {g['new_over_all_training']:.2f}).")
    if "growth_repro" in result:
        g = result["growth_repro"]
        rows = [[stage, f"{seconds:.0f}"] for stage, seconds in g["stages"].items()]
        parts.append(f"\n**`dvc repro` after adding one degradation** (`{g['degradation']}`, timed stage by stage in a "
                     f"clone): {g['total_seconds'] / 60:.1f} min in all; LoRAs trained: {', '.join(g['trained_loras'])}. "
                     f"UIR-LoRA's own part (every stage but the baselines' and the evaluation: its data, its LoRA, noise "
                     f"level estimator, router and restoration settings) {g['uir_lora_seconds']:.0f} s; the rest retrains "
                     f"the union baselines and re-evaluates (multi-task alone {g['multitask_seconds']:.0f} s)."
                     + (f" Restored from DVC's run cache (an earlier run's outputs, so not timed here): "
                        f"{', '.join(g['restored'])}." if g.get("restored") else ""))
        parts.append(table(["stage", "seconds"], rows))
    if "inference" in result:
        inf = result["inference"]
        parts.append(f"\n**Inference** (UNet pass over {inf['batch']} tiles of {inf['tile']}²; "
                     f"{inf['gflop_per_megapixel']:.1f} GFLOP per megapixel; this machine's fp32 matmul: "
                     f"{inf['matmul_gflops']:.0f} GFLOP/s)")
        rows = [[r["variant"], f"{r['ms_per_megapixel']:.0f}", f"{r['gflops_per_second']:.1f}",
                 f"{r['fraction_of_matmul']:.2f}"] for r in inf["variants"]]
        parts.append(table(["adapters", "ms / MP", "GFLOP/s", "of matmul rate"], rows))
        rows = [[f"{r['side']}²", f"{r['seconds']:.1f}", f"{r['ms_per_megapixel']:.0f}", f"{r['rss_loaded_mb']:.0f}",
                 f"{r['peak_rss_mb']:.0f}"] for r in result["restore"]]
        parts.append("\n**`UniversalRestorer.restore`** end to end (router, K=2, 256² tiles, one fresh process each)")
        parts.append(table(["image", "seconds", "ms / MP", "RSS with models loaded, MB", "peak RSS while restoring, MB"],
                            rows))
    if "engines" in result:
        eng = result["engines"]
        parts.append(f"\n**Engines** (one restoration step over {eng['batch']} tiles of {eng['tile']}², {eng['threads']} threads, "
                     f"{eng['gflop_per_megapixel']:.0f} GFLOP per megapixel; K=2 is a weight-space mix merged before the "
                     f"run; fraction of this machine's {eng['matmul_gflops']:.0f} GFLOP/s fp32 matmul rate)")
        rows = [[r["engine"], r["adapters"], f"{r['ms_per_megapixel']:.0f}", f"{r['fraction_of_matmul']:.2f}"] for r in eng["rows"]]
        parts.append(table(["engine", "adapters", "ms / MP", "of matmul rate"], rows))
        if eng.get("quality"):
            labels = list(next(iter(eng["quality"].values())))
            rows = [[name, *(f"{scores[label]:.2f}" for label in labels)] for name, scores in eng["quality"].items()]
            parts.append("\n**What each engine's precision costs** (mean PSNR, dB; Kodak24: all 24 images, σ=25, noise "
                         "adapter; each adapter on its own test crops)")
            parts.append(table(["set", *labels], rows))
        if eng.get("operators"):
            ops = sorted({op for shares in eng["operators"].values() for op in shares}, key=lambda op: op == "other")
            rows = [[op, *(f"{100 * shares.get(op, 0):.0f} %" for shares in eng["operators"].values())] for op in ops]
            parts.append("\n**Where ONNX Runtime spends its time** (share of node time by operator type, its own profiler)")
            parts.append(table(["operator", *eng["operators"]], rows))
        rows = [[r["engine"], f"{r['megapixels']:.0f} MP", f"{r['seconds']:.1f}", f"{r['ms_per_megapixel']:.0f}",
                 f"{r['peak_rss_mb']:.0f}"] for r in result["engine_restore"]]
        parts.append("\n**A 12 MP photo** through `UniversalRestorer.restore` (one adapter, 256² tiles overlapping by 32, "
                     "fresh process)")
        parts.append(table(["engine", "image", "seconds", "ms / MP", "peak RSS, MB"], rows))
    if "storage" in result:
        rows = [[r["model"], f"{r['megabytes']:.2f}", f"{r['parameters']:,}"] for r in result["storage"]]
        parts.append("\n**Storage**")
        parts.append(table(["model", "MB on disk", "parameters"], rows))
    return "\n\n".join(parts) + "\n"
