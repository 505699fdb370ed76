"""DVC stage ``evaluate``: every method on every single and mixed test set.

Methods: the degraded input, the oracle LoRA (true adapter; equal weights over a mix's components),
UIR-LoRA (router, top-K), UIR-LoRA top-1, the multi-task baseline and the shared-LoRA baseline.
Writes ``reports/metrics.json`` (means over single and over mixed sets, router accuracy and recall),
``reports/{single,mixed}.csv`` (PSNR per set and method), ``reports/per_image.csv``, PNG charts,
``reports/samples/<set>.png`` (degraded | multi-task | UIR-LoRA | clean) and one W&B run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm import tqdm

from pipeline.config import load_params
from pipeline.data.datasets import PairedDataset, to_uint8
from pipeline.evaluation.methods import Models
from pipeline.evaluation.report import confusion_chart, mean_table, per_set_table, psnr_chart, write_csv
from pipeline.files import write_json
from pipeline.images import tile, write_image
from pipeline.tracking import finish, make_logger
from pipeline.training.trainer import configure_threads

STAGE = "evaluate"
SAMPLE_COLUMNS = ("input", "multitask", "uir_lora")


def as01(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/degraded")
    parser.add_argument("--mixed", default="data/mixed")
    parser.add_argument("--models", default="models")
    parser.add_argument("--reports", default="reports")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    configure_threads(params.trainer)
    cfg = params.evaluate
    names = list(params.degradations)
    reports = Path(args.reports)

    models = Models.load(args.models, names)
    methods = models.methods(params.router.top_k)
    sets = [(d, "single", Path(args.data) / d / "test") for d in names]
    sets += [("+".join(m), "mixed", Path(args.mixed) / "+".join(m) / "test") for m in params.mixed]

    rows, samples = [], {}
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    recall, unknown = [], []
    for set_name, kind, folder in tqdm(sets, desc="evaluate", unit="set"):
        dataset = PairedDataset(folder, stage="synthesize" if kind == "single" else "synthesize_mixed")
        lq_all, gt_all = torch.stack(dataset.lq), torch.stack(dataset.gt)
        truths = [set_name] * len(dataset)
        for start in range(0, len(dataset), cfg.batch_size):
            lq, gt = lq_all[start : start + cfg.batch_size], gt_all[start : start + cfg.batch_size]
            batch_truths = truths[start : start + cfg.batch_size]
            routing = models.router.route(lq)
            unknown += routing.unknown.tolist()
            if kind == "single":
                for top in routing.similarity.argmax(-1).tolist():
                    confusion[names.index(set_name), top] += 1
            else:
                components = set(set_name.split("+"))
                for weights in routing.weights:
                    kept = {names[i] for i in torch.nonzero(weights).flatten().tolist()}
                    recall.append(len(kept & components) / len(components))
            for method, restore in methods.items():
                restored = models.run(restore, lq, batch_truths)
                psnr = peak_signal_noise_ratio(as01(restored), as01(gt), data_range=1.0, reduction="none", dim=(1, 2, 3))
                ssim = structural_similarity_index_measure(as01(restored), as01(gt), data_range=1.0, reduction="none")
                for i in range(lq.shape[0]):
                    rows.append({"set": set_name, "kind": kind, "index": start + i, "method": method,
                                 "psnr": float(psnr[i]), "ssim": float(ssim[i])})
                if start == 0 and method in SAMPLE_COLUMNS:
                    samples.setdefault(set_name, {})[method] = restored[: cfg.sample_images]
            if start == 0:
                samples[set_name]["clean"] = gt[: cfg.sample_images]

    method_names = list(methods)
    metrics = {
        "single": mean_table(rows, "single", method_names),
        "mixed": mean_table(rows, "mixed", method_names),
        "router": {
            "top1_accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)),
            f"top{params.router.top_k}_recall_mixed": float(np.mean(recall)) if recall else None,
            "unknown_rate": float(np.mean(unknown)),
        },
    }
    single_table = per_set_table(rows, "single", method_names, "psnr")
    mixed_table = per_set_table(rows, "mixed", method_names, "psnr")
    write_json(reports / "metrics.json", metrics)
    write_csv(reports / "single.csv", single_table)
    write_csv(reports / "mixed.csv", mixed_table)
    write_csv(reports / "per_image.csv", rows)
    psnr_chart(reports / "plots" / "psnr.png", single_table, mixed_table, method_names)
    confusion_chart(reports / "plots" / "router_confusion.png", confusion, names)
    grids = {}
    for set_name, columns in samples.items():
        order = [*SAMPLE_COLUMNS, "clean"]
        images = [to_uint8(columns[c][i]) for i in range(columns["clean"].shape[0]) for c in order]
        grids[set_name] = tile(images, columns=len(order))
        write_image(reports / "samples" / f"{set_name}.png", grids[set_name])

    logger = make_logger(params, STAGE, job_type=STAGE)
    run = logger.experiment
    logger.log_table("evaluate/per_image", columns=list(rows[0]), data=[list(r.values()) for r in rows])
    logger.log_image("evaluate/samples", images=list(grids.values()),
                     caption=[f"{s}: degraded | multi-task | UIR-LoRA | clean" for s in grids])
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
