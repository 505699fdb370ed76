"""Write the README's "Results" section from ``reports/metrics.json`` and copy one sample grid into
``docs/``: the numbers in the README are what the last ``dvc repro`` gave, never typed by hand. With
``--over-seeds``, the table is mean ± std over this commit and its experiments that differ from the
workspace's params in ``seed`` alone (``make seeds``), each run's ``reports/metrics.json`` read from git, or
over the runs' ``metrics.json`` files given as ``--run SEED=FILE``.

    python -m pipeline.evaluation.results                (or: make results)
    python -m pipeline.evaluation.results --over-seeds   (the last step of make seeds)
    python -m pipeline.evaluation.results --over-seeds --run 1=reports/seeds/metrics_seed1.json --run 2=...
    python -m pipeline.evaluation.results --over-seeds --run ... --paired uir_lora-multitask [--before 1=FILE ...]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
from pathlib import Path

from pipeline.config import load_params
from pipeline.files import atomic_path, read_json
from pipeline.models.router import MIX_THRESHOLD_POLICIES

START, END = "<!-- results:start -->", "<!-- results:end -->"


def results_markdown(metrics: dict, params, sample: str) -> str:
    lines = [
        f"Profile `{params.profile_name}`; test PSNR (dB) / SSIM, averaged over the "
        f"{len(params.degradations)} single and {len(params.mixed)} mixed test sets "
        f"({params.synthesis.test_crops} crops of {params.synthesis.eval_crop}² each).",
        "",
        "| method | single PSNR | single SSIM | mixed PSNR | mixed SSIM |",
        "|---|---|---|---|---|",
    ]
    for method, label in metrics["labels"].items():
        s, m = metrics["single"].get(method), metrics["mixed"].get(method)
        if s and m:
            lines.append(f"| {label} | {s['psnr']:.2f} | {s['ssim']:.3f} | {m['psnr']:.2f} | {m['ssim']:.3f} |")
    router, used = metrics["router"], metrics["restoration"]
    lines += [
        "",
        f"Router: top-1 accuracy {router['top1_accuracy']:.3f} on the single test sets; recall of the true "
        f"components among its top-|mix| adapters {router['mix_recall']:.3f} on the mixed sets. The `{used['policy']}` "
        f"policy (mix threshold {used['mix_threshold_used']:.2f}) gave two or more adapters to "
        f"{100 * router['single_given_two_or_more']:.1f}% of single and {100 * router['mixed_given_two_or_more']:.1f}% "
        f"of mixed test images; {100 * router['unknown_rate']:.1f}% were flagged unknown and "
        + ("left as they were (`unknown: identity`)." if used["unknown"] == "identity" else "restored by their routing anyway (`unknown: route`).")
        + _clean_sentence({k: [v] for k, v in router.items()}, lambda v: f"{100 * v[0]:.1f}%"),
        "",
        *_sample_lines(sample),
    ]
    return "\n".join(lines)


CLEAN_RATES = ("clean_called_clean", "clean_given_an_adapter", "single_called_clean", "mixed_called_clean")


def _clean_sentence(rates: dict[str, list], show) -> str:
    """What the router made of clean test crops and how many degraded ones it called clean (runs whose
    router has no clean class have none of these rates: no sentence)."""
    if any(v is None for k in CLEAN_RATES for v in rates.get(k, [None])):
        return ""
    return (f" Clean test crops (the singles' ground truth): called clean {show(rates['clean_called_clean'])}, given "
            f"an adapter {show(rates['clean_given_an_adapter'])}; degraded crops called clean (left as they were): "
            f"single {show(rates['single_called_clean'])}, mixed {show(rates['mixed_called_clean'])}.")


def _mean_std(values: list[float], digits: int) -> str:
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def over_seeds_markdown(runs: dict[int, dict], params, sample: str | None = None) -> str:
    """The results table as mean ± std (sample std) over ``runs`` (seed -> that run's metrics.json)."""
    seeds = sorted(runs)
    first = runs[seeds[0]]
    lines = [
        f"Profile `{params.profile_name}`, **mean ± std over {len(seeds)} seeds** ({', '.join(map(str, seeds))}; "
        f"each seed synthesises its data and trains every model anew); test PSNR (dB) / SSIM, averaged over the "
        f"{len(params.degradations)} single and {len(params.mixed)} mixed test sets "
        f"({params.synthesis.test_crops} crops of {params.synthesis.eval_crop}² each).",
        "",
        "| method | single PSNR | single SSIM | mixed PSNR | mixed SSIM |",
        "|---|---|---|---|---|",
    ]
    for method, label in first["labels"].items():
        if method == "uir_lora":
            label = "**UIR-LoRA** as shipped (the candidate chosen on validation, per seed)"
        if not all(method in runs[s]["single"] and method in runs[s]["mixed"] for s in seeds):
            continue
        cells = [_mean_std([runs[s][kind][method][metric] for s in seeds], 2 if metric == "psnr" else 3)
                 for kind in ("single", "mixed") for metric in ("psnr", "ssim")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    router = {k: [runs[s]["router"][k] for s in seeds] for k in ("top1_accuracy", "mix_recall", "unknown_rate",
                                                                 "single_given_two_or_more", "mixed_given_two_or_more")}
    chosen = "; ".join(f"{s}: {runs[s]['restoration']['policy']}, {runs[s]['restoration']['composition']}"
                       + (f" at {runs[s]['restoration']['mix_threshold_used']:.2f}" if runs[s]["restoration"]["policy"] in MIX_THRESHOLD_POLICIES else "")
                       + (f", gate {runs[s]['restoration']['cascade_gate']:.2f}, "
                          f"{runs[s]['restoration'].get('cascade_pairs', 'any')} pairs" if runs[s]["restoration"]["policy"] == "cascade" else "")
                       + (", unknown routed" if runs[s]["restoration"].get("unknown") == "route" else "")
                       + f", {runs[s]['restoration'].get('noise_level', 'analytic')} noise level"
                       + (f" (corrections from {runs[s]['restoration']['min_noise_correction']:g})"
                          if runs[s]["restoration"].get("noise_level") == "learned" and runs[s]["restoration"].get("min_noise_correction") else "")
                       for s in seeds)
    lines += [
        "",
        f"Router: top-1 accuracy {_mean_std(router['top1_accuracy'], 3)} on the single test sets; recall of the true "
        f"components among its first |mix| adapters {_mean_std(router['mix_recall'], 3)}; flagged unknown "
        f"{_mean_std(router['unknown_rate'], 3)}. As shipped, two or more adapters went to "
        f"{_mean_std(router['single_given_two_or_more'], 3)} of single and {_mean_std(router['mixed_given_two_or_more'], 3)} "
        f"of mixed test images. Chosen on validation (seed: policy, composition, the cascade's gate and pairs, unknown "
        f"left as they are unless routed, the noise adapter's timestep): {chosen}."
        + _clean_sentence({k: [runs[s]["router"].get(k) for s in seeds] for k in CLEAN_RATES},
                          lambda v: _mean_std(v, 3)),
    ]
    if sample is not None:
        lines += ["", *_sample_lines(sample)]
    return "\n".join(lines)


def paired_differences(runs: dict[int, dict], pairs: list[tuple[str, str]],
                       before: dict[int, dict] | None = None) -> list[str]:
    """Markdown lines: for each ``(a, b)``, the per-seed differences a − b of test PSNR (dB) on the single and the
    mixed sets, as mean ± std and per seed; with ``before`` (seed -> an earlier run's metrics.json, the same seeds),
    also each method's change from that run."""
    seeds = sorted(runs)

    def line(label: str, diffs: dict[str, list[float]]) -> str:
        return f"- {label}: " + "; ".join(
            f"{kind} {_mean_std(values, 2)} ({', '.join(f'{v:+.2f}' for v in values)})" for kind, values in diffs.items())

    for method in {m for pair in pairs for m in pair}:
        lacking = [s for s in seeds if method not in runs[s]["single"]]
        if lacking:
            raise ValueError(f"no method {method!r} in the run(s) of seed {', '.join(map(str, lacking))}; "
                             f"methods: {', '.join(runs[lacking[0]]['single'])}")
    lines = [f"Paired over seeds {', '.join(map(str, seeds))} (test PSNR dB, mean ± std, then per seed):"]
    for a, b in pairs:
        lines.append(line(f"`{a}` − `{b}`", {kind: [runs[s][kind][a]["psnr"] - runs[s][kind][b]["psnr"] for s in seeds]
                                             for kind in ("single", "mixed")}))
    if before is not None:
        if sorted(before) != seeds:
            raise ValueError(f"the earlier runs are of seeds {sorted(before)}, these of {seeds}")
        for method in runs[seeds[0]]["single"]:
            if all(method in before[s]["single"] for s in seeds):
                lines.append(line(f"`{method}`, this run − the earlier", {
                    kind: [runs[s][kind][method]["psnr"] - before[s][kind][method]["psnr"] for s in seeds]
                    for kind in ("single", "mixed")}))
    return lines


def _sample_lines(sample: str) -> list[str]:
    return [f"![degraded, multi-task, UIR-LoRA, clean](docs/{Path(sample).name})", "",
            f"*{Path(sample).stem.removeprefix('sample_')}: degraded | multi-task | UIR-LoRA | clean.* "
            "Per-set numbers: `reports/single.csv`, `reports/mixed.csv`, `reports/plots/psnr.png`."]


def seed_runs(show: list[dict], params_file: str) -> dict[int, dict]:
    """seed -> metrics.json of the commit and of its experiments whose params differ from ``params_file``'s in
    ``seed`` alone (from ``dvc exp show --json``)."""
    import yaml

    from pipeline.evaluation.compare import experiments, flatten

    current = flatten(yaml.safe_load(Path(params_file).read_text()))
    runs = {}
    for row in experiments(show):
        if all(row["params"].get(k) == v for k, v in current.items() if k != "seed"):
            text = subprocess.run(["git", "show", f"{row['rev']}:reports/metrics.json"], capture_output=True,
                                  text=True, check=True).stdout
            runs[row["params"]["seed"]] = json.loads(text)
    return runs


def _write_block(readme: Path, markdown: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} block")
    block = f"{START}\n{markdown}\n{END}"
    with atomic_path(readme) as tmp:
        tmp.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--reports", default="reports")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--sample-set", default="noise+blur", help="which set's sample grid to show")
    parser.add_argument("--over-seeds", action="store_true", help="mean ± std over the seeds of `make seeds`")
    parser.add_argument("--json", help="with --over-seeds: read this `dvc exp show --json` output instead of running it")
    parser.add_argument("--rev", action="append", help="with --over-seeds: the experiments of this commit "
                        "(default: HEAD); repeat it for several")
    parser.add_argument("--run", action="append", metavar="SEED=FILE", help="with --over-seeds: this seed's "
                        "metrics.json instead of the experiments'; repeat it for each seed")
    parser.add_argument("--paired", action="append", metavar="A-B", help="with --over-seeds: print the per-seed "
                        "differences of methods A and B (e.g. uir_lora-multitask) instead of writing the README")
    parser.add_argument("--before", action="append", metavar="SEED=FILE", help="with --paired: an earlier run's "
                        "metrics.json of that seed; each method's change from it is printed too")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.over_seeds:
        if args.run:
            runs = {int(seed): read_json(path, stage="evaluate") for seed, path in (r.split("=", 1) for r in args.run)}
        else:
            from pipeline.evaluation.compare import exp_show

            runs = seed_runs(exp_show(args.json, args.rev), args.params)
        if len(runs) < 2:
            raise SystemExit(f"{len(runs)} run(s) with this workspace's params: run `make seeds` first")
        if args.paired:
            before = {int(seed): read_json(path, stage="evaluate") for seed, path in
                      (r.split("=", 1) for r in args.before)} if args.before else None
            pairs = [tuple(p.split("-", 1)) for p in args.paired]
            if any(len(pair) != 2 for pair in pairs):
                raise SystemExit(f"--paired takes A-B (two method names), got {args.paired}")
            try:
                print("\n".join(paired_differences(runs, pairs, before)))
            except ValueError as error:
                raise SystemExit(f"results --paired: {error}") from None
            return
        sample = Path("docs") / f"sample_{args.sample_set}.png"
        _write_block(Path(args.readme), over_seeds_markdown(runs, params, str(sample) if sample.is_file() else None))
        print(f"updated {args.readme}: {len(runs)} seeds ({', '.join(map(str, sorted(runs)))})")
        return
    metrics = read_json(Path(args.reports) / "metrics.json", stage="evaluate")
    source = Path(args.reports) / "samples" / f"{args.sample_set}.png"
    if not source.is_file():
        raise SystemExit(f"{source} is missing: run `dvc repro evaluate`")
    sample = Path("docs") / f"sample_{args.sample_set}.png"
    sample.parent.mkdir(exist_ok=True)
    shutil.copyfile(source, sample)
    _write_block(Path(args.readme), results_markdown(metrics, params, str(sample)))
    print(f"updated {args.readme} and {sample}")


if __name__ == "__main__":
    main()
