"""DVC stage ``evaluate``: every method on every single and mixed test set, image by image, through the
same restoration path as ``uir restore`` (``pipeline.evaluation.methods``).

Writes ``reports/headline.json`` (the handful of numbers experiments are compared on: the DVC metric),
``reports/metrics.json`` (every method's mean PSNR/SSIM over single and mixed sets, router figures),
``reports/{single,mixed}.csv`` (PSNR per set and method: DVC plots), ``reports/per_image.csv``, PNG
charts, ``reports/samples/<set>.png`` (degraded | multi-task | UIR-LoRA | clean) and one W&B run.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from pipeline.config import stage_params

STAGE = "evaluate"
SAMPLE_COLUMNS = ("input", "multitask", "uir_lora")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/degraded")
    parser.add_argument("--mixed", default="data/mixed")
    parser.add_argument("--models", default="models")
    parser.add_argument("--reports", default="reports")
    args = parser.parse_args(argv)
    params = stage_params(args.params)

    import numpy as np
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    from tqdm import tqdm

    from pipeline.evaluation.methods import load_methods
    from pipeline.evaluation.report import confusion_chart, headline, mean_table, per_set_table, psnr_chart, sample_grid, write_csv
    from pipeline.evaluation.selection import load_sets
    from pipeline.files import write_json
    from pipeline.images import write_image
    from pipeline.tracking import finish, make_logger
    from pipeline.training.trainer import configure_threads

    configure_threads(params.trainer)
    torch.set_grad_enabled(False)
    names = list(params.degradations)
    reports = Path(args.reports)
    methods, restorer = load_methods(args.models)  # the settings select_restoration chose on validation
    settings = restorer.settings
    sets = load_sets(args.data, args.mixed, names, params.mixed, "test")

    def as_tensor(image: np.ndarray) -> torch.Tensor:
        return torch.tensor(image).permute(2, 0, 1)[None].float() / 255  # a copy: decoded arrays are read-only

    rows, samples = [], {}
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    recall, unknown, adapters_used = [], [], {"single": [], "mixed": []}
    called_clean = {"single": [], "mixed": []}
    for test_set in tqdm(sets, desc=STAGE, unit="set"):
        set_name, kind = test_set.name, test_set.kind
        components = set_name.split("+")
        for index, (lq, gt) in enumerate(zip(test_set.degraded, test_set.clean)):
            analysis = restorer.analyse(lq)
            unknown.append(analysis.unknown)
            called_clean[kind].append(analysis.clean)
            adapters_used[kind].append(len(analysis.weights))
            ranked = analysis.ranking
            if kind == "single":
                confusion[names.index(set_name), names.index(ranked[0])] += 1
            else:
                recall.append(len(set(ranked[: len(components)]) & set(components)) / len(components))
            truth = as_tensor(gt)
            scores = {}  # by the restored pixels: variants that restore an image alike are scored once
            for method in methods:
                restored = method.restore(lq, set_name)
                pixels = (restored.shape, restored.dtype.str, hashlib.blake2b(restored.tobytes(), digest_size=16).digest())
                if pixels not in scores:
                    prediction = as_tensor(restored)
                    scores[pixels] = (float(peak_signal_noise_ratio(prediction, truth, data_range=1.0)),
                                      float(structural_similarity_index_measure(prediction, truth, data_range=1.0)))
                psnr, ssim = scores[pixels]
                rows.append({"set": set_name, "kind": kind, "index": index, "method": method.name,
                             "psnr": psnr, "ssim": ssim})
                if index < params.evaluate.sample_images and method.name in SAMPLE_COLUMNS:
                    samples.setdefault(set_name, {}).setdefault(method.name, []).append(restored)
            if index < params.evaluate.sample_images:
                samples[set_name].setdefault("clean", []).append(gt)

    # The clean counterparts of the first single set's crops (every degradation has the same boxes):
    # what the router makes of images with nothing to restore.
    clean_crops = next(s.clean for s in sets if s.kind == "single")
    clean_analyses = [restorer.analyse(gt) for gt in clean_crops]
    method_names = [m.name for m in methods]
    metrics = {
        "single": mean_table(rows, "single", method_names),
        "mixed": mean_table(rows, "mixed", method_names),
        "router": {
            "top1_accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)),
            "mix_recall": float(np.mean(recall)) if recall else None,  # components among the top-|mix| adapters
            "unknown_rate": float(np.mean(unknown)),
            "single_given_two_or_more": float(np.mean(np.array(adapters_used["single"]) > 1)),
            "mixed_given_two_or_more": float(np.mean(np.array(adapters_used["mixed"]) > 1)) if recall else None,
            "single_called_clean": float(np.mean(called_clean["single"])),
            "mixed_called_clean": float(np.mean(called_clean["mixed"])) if recall else None,
            "clean_called_clean": float(np.mean([a.clean for a in clean_analyses])),
            "clean_given_an_adapter": float(np.mean([not a.unchanged for a in clean_analyses])),
        },
        "restoration": {**settings.as_dict(),
                        "mix_threshold_used": settings.mix_threshold if settings.mix_threshold is not None
                        else restorer.router.config.mix_threshold},
        "labels": {m.name: m.label for m in methods},
    }
    single_table = per_set_table(rows, "single", method_names, "psnr")
    mixed_table = per_set_table(rows, "mixed", method_names, "psnr")
    write_json(reports / "metrics.json", metrics)
    write_json(reports / "headline.json", headline(metrics))
    write_csv(reports / "single.csv", single_table)
    write_csv(reports / "mixed.csv", mixed_table)
    write_csv(reports / "per_image.csv", rows)
    psnr_chart(reports / "plots" / "psnr.png", single_table, mixed_table, method_names)
    confusion_chart(reports / "plots" / "router_confusion.png", confusion, names)
    header = ["degraded", "multi-task", "UIR-LoRA", "clean"]
    grids = {}
    for set_name, columns in samples.items():
        order = [c for c in (*SAMPLE_COLUMNS, "clean") if c in columns]
        grids[set_name] = sample_grid([[columns[c][i] for c in order] for i in range(len(columns["clean"]))],
                                      [header[(*SAMPLE_COLUMNS, "clean").index(c)] for c in order])
        write_image(reports / "samples" / f"{set_name}.png", grids[set_name])

    logger = make_logger(params, STAGE, job_type=STAGE)
    run = logger.experiment
    logger.log_table("evaluate/per_image", columns=list(rows[0]), data=[list(r.values()) for r in rows])
    logger.log_image("evaluate/samples", images=list(grids.values()), caption=[f"{s}: {' | '.join(header)}" for s in grids])
    logger.log_image("evaluate/charts", images=[str(reports / "plots" / "psnr.png"),
                                                str(reports / "plots" / "router_confusion.png")])
    run.summary.update({f"{kind}/{m}/{k}": v for kind in ("single", "mixed")
                        for m, values in metrics[kind].items() for k, v in values.items()})
    run.summary.update({f"router/{k}": v for k, v in metrics["router"].items()})
    finish(logger, STAGE)
    for kind in ("single", "mixed"):
        print(f"{STAGE}: {kind}: " + ", ".join(f"{m} {v['psnr']:.2f} dB" for m, v in metrics[kind].items()))
    print(f"{STAGE}: router: {metrics['router']}")


if __name__ == "__main__":
    main()
