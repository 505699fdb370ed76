"""DVC stage ``train_multitask``: the baseline the paper argues against — the backbone fully fine-tuned
on the union of every degradation's training set, with as many optimisation steps as all LoRAs together.

Reads ``baselines.<name>`` (``--name``, default ``multitask``). Writes ``<out>/`` (``save_pretrained`` UNet
+ scheduler, and ``restoration.json``: kind ``unet``, its one ``t*`` — the model is blind to the
degradation — and its label), validation metrics per degradation, and the W&B pointer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import stage_params, total_adapter_steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="multitask", help="the baseline: a key of `baselines` in params.yaml")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/degraded", help="folder of data/degraded/<degradation>")
    parser.add_argument("--backbone", default="models/backbone")
    parser.add_argument("--out", help="default: models/baselines/<name>")
    parser.add_argument("--metrics", help="default: reports/train_<name>.json")
    parser.add_argument("--checkpoints", help="default: checkpoints/train_<name>")
    args = parser.parse_args(argv)
    params = stage_params(args.params)
    if args.name not in params.baselines:
        raise SystemExit(f"no baselines.{args.name} in {args.params}; configured: {sorted(params.baselines)}")

    from pipeline.files import atomic_dir, write_json
    from pipeline.models.backbone import OneStepReadout, load_backbone, save_backbone
    from pipeline.models.folder import ModelsFolder
    from pipeline.tracking import finish, log_model_folder, make_logger
    from pipeline.training.fit import fit_restoration
    from pipeline.training.trainer import seed

    stage = f"train_{args.name}"
    out = args.out or f"models/baselines/{args.name}"
    seed(params)
    cfg = params.baselines[args.name]
    tasks = list(params.degradations)
    max_steps = total_adapter_steps(params)

    unet, scheduler = load_backbone(args.backbone)
    unet.requires_grad_(True).train()
    logger = make_logger(params, stage, job_type="train_multitask")
    roots = [Path(args.data) / t for t in tasks]
    _, metrics, writer = fit_restoration(
        params, unet, OneStepReadout(scheduler), tasks, [cfg.t_star] * len(tasks), roots, cfg.train, max_steps,
        logger, args.checkpoints or f"checkpoints/{stage}", inputs=[*roots, args.backbone], balance_tasks=cfg.balance_tasks,
    )
    if not writer:
        return
    with atomic_dir(out) as tmp:
        save_backbone(tmp, unet, scheduler)
        ModelsFolder.write_settings(tmp, kind="unet", t_star=int(cfg.t_star), label=cfg.label, degradations=tasks)
    metrics.update(t_star=cfg.t_star, steps_total=max_steps)
    log_model_folder(logger, stage, out, metrics)
    logger.experiment.summary.update(metrics)
    write_json(args.metrics or f"reports/{stage}.json", metrics)
    finish(logger, stage)
    print(f"{stage}: val PSNR {metrics['val/input_psnr']:.2f} -> {metrics['val/psnr']:.2f} dB over {len(tasks)} degradations")


if __name__ == "__main__":
    main()
