"""DVC stage ``train_shared_lora``: one LoRA with the rank of all N per-degradation LoRAs together
(rank Σ r_i on the union of their target layers), trained on the union of the training sets.

It has the parameters of the N specific adapters without their specificity: it separates "specific
adapters" from "more parameters". Writes ``<out>/`` in PEFT's format plus ``restoration.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import load_params, shared_adapter_settings, total_adapter_steps
from pipeline.files import atomic_dir, write_json
from pipeline.models.adapters import adapter_parameter_count, attach_lora, lora_config, save_adapter
from pipeline.models.backbone import OneStepReadout, load_backbone
from pipeline.tracking import finish, log_model_folder, make_logger
from pipeline.training.fit import fit_restoration
from pipeline.training.trainer import seed

STAGE = "train_shared_lora"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/degraded")
    parser.add_argument("--backbone", default="models/backbone")
    parser.add_argument("--out", default="models/shared_lora")
    parser.add_argument("--metrics", default=f"reports/{STAGE}.json")
    parser.add_argument("--checkpoints", default=f"checkpoints/{STAGE}")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    seed(params)
    cfg = params.shared_lora
    tasks = list(params.degradations)
    settings = shared_adapter_settings(params)
    max_steps = total_adapter_steps(params)

    unet, scheduler = load_backbone(args.backbone)
    model = attach_lora(unet, lora_config(settings))
    logger = make_logger(params, STAGE, job_type=STAGE)
    roots = [Path(args.data) / t for t in tasks]
    _, metrics, writer = fit_restoration(
        params, model, OneStepReadout(scheduler), tasks, [cfg.t_star] * len(tasks), roots, cfg.train, max_steps,
        logger, args.checkpoints, inputs=[*roots, args.backbone], balance_tasks=cfg.balance_tasks,
    )
    if not writer:
        return
    with atomic_dir(args.out) as tmp:
        save_adapter(model, tmp, "+".join(tasks), cfg.t_star)
    metrics.update(t_star=cfg.t_star, rank=settings["rank"], adapter_parameters=adapter_parameter_count(model),
                   steps_total=max_steps)
    log_model_folder(logger, STAGE, args.out, metrics)
    logger.experiment.summary.update(metrics)
    write_json(args.metrics, metrics)
    finish(logger, STAGE)
    print(f"{STAGE}: rank {settings['rank']}, val PSNR {metrics['val/input_psnr']:.2f} -> {metrics['val/psnr']:.2f} dB")


if __name__ == "__main__":
    main()
