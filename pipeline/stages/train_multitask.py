"""DVC stage ``train_multitask``: the baseline the paper argues against — the backbone fully fine-tuned
on the union of every degradation's training set, with as many optimisation steps as all LoRAs together.

Writes ``<out>/`` (``save_pretrained`` UNet + scheduler, and ``restoration.json`` with its one ``t*``:
the model is blind to the degradation), validation metrics per degradation, and the W&B pointer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import load_params, total_adapter_steps
from pipeline.files import atomic_dir, write_json
from pipeline.models.backbone import OneStepReadout, load_backbone, save_backbone
from pipeline.tracking import finish, log_model_folder, make_logger
from pipeline.training.fit import fit_restoration
from pipeline.training.trainer import seed

STAGE = "train_multitask"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/degraded", help="folder of data/degraded/<degradation>")
    parser.add_argument("--backbone", default="models/backbone")
    parser.add_argument("--out", default="models/multitask")
    parser.add_argument("--metrics", default=f"reports/{STAGE}.json")
    parser.add_argument("--checkpoints", default=f"checkpoints/{STAGE}")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    seed(params)
    cfg = params.multitask
    tasks = list(params.degradations)
    max_steps = total_adapter_steps(params)

    unet, scheduler = load_backbone(args.backbone)
    unet.requires_grad_(True).train()
    logger = make_logger(params, STAGE, job_type=STAGE)
    roots = [Path(args.data) / t for t in tasks]
    _, metrics, writer = fit_restoration(
        params, unet, OneStepReadout(scheduler), tasks, [cfg.t_star] * len(tasks), roots, cfg.train, max_steps,
        logger, args.checkpoints, inputs=[*roots, args.backbone], balance_tasks=cfg.balance_tasks,
    )
    if not writer:
        return
    with atomic_dir(args.out) as tmp:
        save_backbone(tmp, unet, scheduler)
        write_json(tmp / "restoration.json", {"degradations": tasks, "t_star": int(cfg.t_star)})
    metrics.update(t_star=cfg.t_star, steps_total=max_steps)
    log_model_folder(logger, STAGE, args.out, metrics)
    logger.experiment.summary.update(metrics)
    write_json(args.metrics, metrics)
    finish(logger, STAGE)
    print(f"{STAGE}: val PSNR {metrics['val/input_psnr']:.2f} -> {metrics['val/psnr']:.2f} dB over {len(tasks)} degradations")


if __name__ == "__main__":
    main()
