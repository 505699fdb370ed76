"""DVC stage ``train_lora@<degradation>``: one LoRA on the frozen backbone, for one degradation.

Writes ``<out>/`` in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``) plus
``restoration.json`` (degradation, ``t*``), the validation metrics of the kept (best-on-val) weights
against the degraded input's, and ``reports/wandb/train_lora@<d>.json``.
"""

from __future__ import annotations

import argparse

from pipeline.config import adapter_settings, adapter_training, stage_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("degradation")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="data/degraded/<degradation>")
    parser.add_argument("--backbone", default="models/backbone")
    parser.add_argument("--out", required=True, help="models/loras/<degradation>")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--checkpoints", required=True)
    args = parser.parse_args(argv)
    params = stage_params(args.params)

    import sys

    from omegaconf import OmegaConf

    from pipeline.files import atomic_dir, write_json
    from pipeline.models.adapters import adapter_parameter_count, attach_lora, lora_config, save_adapter
    from pipeline.models.backbone import OneStepReadout, count_parameters, load_backbone
    from pipeline.models.card import lora_card, synthesized_digest
    from pipeline.tracking import finish, log_model_folder, make_logger
    from pipeline.training.fit import fit_restoration
    from pipeline.training.trainer import seed

    seed(params)
    stage = f"train_lora@{args.degradation}"
    settings = adapter_settings(params, args.degradation)
    training = adapter_training(params, args.degradation)

    unet, scheduler = load_backbone(args.backbone)
    backbone_size = count_parameters(unet)["total"]
    model = attach_lora(unet, lora_config(settings))
    logger = make_logger(params, stage, job_type="train_lora")
    _, metrics, writer = fit_restoration(
        params, model, OneStepReadout(scheduler), [args.degradation], [settings["t_star"]], [args.data],
        training, training.max_steps, logger, args.checkpoints, inputs=[args.data, args.backbone],
        timestep_rules=[settings["timestep"]],
    )
    if not writer:
        return
    adapter_size = adapter_parameter_count(model)
    command = (f"make params ARGS=profile={params.profile_name}   # + the overrides that give the settings above\n"
               f"python -m pipeline.stages.train_lora {' '.join(argv if argv is not None else sys.argv[1:])}")
    card = lora_card(args.degradation, params.degradations[args.degradation].description, settings,
                     OmegaConf.to_container(training, resolve=True), adapter_size, backbone_size, metrics,
                     synthesized_digest(args.data), command)
    with atomic_dir(args.out) as tmp:
        save_adapter(model, tmp, args.degradation, settings["t_star"], settings["timestep"])
        (tmp / "README.md").write_text(card)  # in place of PEFT's template card
    metrics.update(
        degradation=args.degradation, t_star=settings["t_star"], timestep=settings["timestep"], rank=settings["rank"],
        adapter_parameters=adapter_size, backbone_parameters=backbone_size,
        adapter_to_backbone=adapter_size / backbone_size,
        psnr_gain=metrics["val/psnr"] - metrics["val/input_psnr"],
    )
    log_model_folder(logger, stage, args.out, metrics)
    logger.experiment.summary.update(metrics)
    write_json(args.metrics, metrics)
    finish(logger, stage)
    print(f"{stage}: val PSNR {metrics['val/input_psnr']:.2f} -> {metrics['val/psnr']:.2f} dB "
          f"(best at step {metrics['step']}); adapter {adapter_size} parameters "
          f"({100 * adapter_size / backbone_size:.1f}% of the backbone)")


if __name__ == "__main__":
    main()
