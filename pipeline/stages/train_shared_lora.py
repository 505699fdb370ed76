"""DVC stage ``train_shared_lora``: one LoRA with the rank of all N per-degradation LoRAs together
(rank Σ r_i on the union of their target layers), trained on the union of the training sets.

It has the parameters of the N specific adapters without their specificity: it separates "specific
adapters" from "more parameters". Reads ``baselines.<name>`` (``--name``, default ``shared_lora``); writes
``<out>/`` in PEFT's format plus ``restoration.json`` (kind ``lora``, ``t*``, label).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import shared_adapter_settings, stage_params, total_adapter_steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="shared_lora", help="the baseline: a key of `baselines` in params.yaml")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/degraded")
    parser.add_argument("--backbone", default="models/backbone")
    parser.add_argument("--out", help="default: models/baselines/<name>")
    parser.add_argument("--metrics", help="default: reports/train_<name>.json")
    parser.add_argument("--checkpoints", help="default: checkpoints/train_<name>")
    args = parser.parse_args(argv)
    params = stage_params(args.params)
    if args.name not in params.baselines:
        raise SystemExit(f"no baselines.{args.name} in {args.params}; configured: {sorted(params.baselines)}")

    from pipeline.files import atomic_dir, write_json
    from pipeline.models.adapters import adapter_parameter_count, attach_lora, lora_config, save_adapter
    from pipeline.models.backbone import OneStepReadout, load_backbone
    from pipeline.models.folder import ModelsFolder
    from pipeline.tracking import finish, log_model_folder, make_logger
    from pipeline.training.fit import fit_restoration
    from pipeline.training.trainer import seed

    stage = f"train_{args.name}"
    out = args.out or f"models/baselines/{args.name}"
    seed(params)
    cfg = params.baselines[args.name]
    tasks = list(params.degradations)
    settings = shared_adapter_settings(params)
    max_steps = total_adapter_steps(params)

    unet, scheduler = load_backbone(args.backbone)
    model = attach_lora(unet, lora_config(settings))
    logger = make_logger(params, stage, job_type="train_shared_lora")
    roots = [Path(args.data) / t for t in tasks]
    _, metrics, writer = fit_restoration(
        params, model, OneStepReadout(scheduler), tasks, [cfg.t_star] * len(tasks), roots, cfg.train, max_steps,
        logger, args.checkpoints or f"checkpoints/{stage}", inputs=[*roots, args.backbone], balance_tasks=cfg.balance_tasks,
    )
    if not writer:
        return
    with atomic_dir(out) as tmp:
        save_adapter(model, tmp, "+".join(tasks), cfg.t_star)
        ModelsFolder.write_settings(tmp, kind="lora", t_star=int(cfg.t_star), label=cfg.label, degradations=tasks)
    metrics.update(t_star=cfg.t_star, rank=settings["rank"], adapter_parameters=adapter_parameter_count(model),
                   steps_total=max_steps)
    log_model_folder(logger, stage, out, metrics)
    logger.experiment.summary.update(metrics)
    write_json(args.metrics or f"reports/{stage}.json", metrics)
    finish(logger, stage)
    print(f"{stage}: rank {settings['rank']}, val PSNR {metrics['val/input_psnr']:.2f} -> {metrics['val/psnr']:.2f} dB")


if __name__ == "__main__":
    main()
