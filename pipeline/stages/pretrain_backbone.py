"""DVC stage ``pretrain_backbone``: the shared generative model, a UNet2DModel DDPM on clean patches.

Writes ``<out>/`` (``save_pretrained``: UNet config + safetensors, scheduler config), a sample grid
drawn from the model, validation metrics (one-step denoising PSNR at several noise levels), and
``reports/wandb/pretrain_backbone.json``. With ``backbone.pretrained`` set, that UNet2DModel folder is
evaluated and used instead of training one.
"""

from __future__ import annotations

import argparse

from pipeline.config import stage_params

STAGE = "pretrain_backbone"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--clean", default="data/clean")
    parser.add_argument("--out", default="models/backbone")
    parser.add_argument("--samples", default="reports/backbone_samples.png")
    parser.add_argument("--metrics", default="reports/pretrain_backbone.json")
    parser.add_argument("--checkpoints", default="checkpoints/pretrain_backbone")
    args = parser.parse_args(argv)
    params = stage_params(args.params)

    import sys
    import time
    from pathlib import Path

    from omegaconf import OmegaConf

    from pipeline.data.datasets import CleanPatchDataModule
    from pipeline.data.tensors import to_uint8
    from pipeline.files import atomic_dir, write_json
    from pipeline.images import tile, write_image
    from pipeline.models.backbone import build_scheduler, build_unet, count_parameters, load_backbone, save_backbone
    from pipeline.models.card import append_validation, backbone_card, data_digest
    from pipeline.models.sampling import sample
    from pipeline.tracking import finish, log_model_folder, make_logger, wandb_mode
    from pipeline.training.backbone import BackboneDDPM
    from pipeline.training.trainer import build_trainer, fit, resume_checkpoint, seed

    seed(params)
    cfg = params.backbone
    train = cfg.train

    if cfg.pretrained:
        unet, scheduler = load_backbone(cfg.pretrained)
    else:
        unet, scheduler = build_unet(cfg.architecture), build_scheduler(cfg.schedule)
    module = BackboneDDPM(unet, scheduler, lr=train.lr, weight_decay=train.weight_decay, ema_decay=train.ema_decay,
                          warmup_steps=train.warmup_steps, max_steps=train.max_steps, val_sigmas=list(train.val_sigmas))
    datamodule = CleanPatchDataModule(args.clean, train.patch_size, train.batch_size, train.steps_per_epoch,
                                      train.val_patches, params.seed, params.trainer.num_workers)
    logger = make_logger(params, STAGE, job_type=STAGE)
    sizes = count_parameters(unet)
    logger.log_hyperparams({"model/parameters_total": sizes["total"]})
    trainer = build_trainer(params, train.max_steps, train.val_every, logger, args.checkpoints)
    started = time.perf_counter()
    if cfg.pretrained:
        module.ema.module.load_state_dict(unet.state_dict())
        trainer.validate(module, datamodule=datamodule)
    else:
        fit(trainer, module, train.val_every, resume_checkpoint(args.checkpoints, params, [args.clean]),
            datamodule=datamodule)
    seconds = time.perf_counter() - started
    if not trainer.is_global_zero:
        return
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    final = module.ema_unet.eval()

    with atomic_dir(args.out) as tmp:
        save_backbone(tmp, final, scheduler)
        card = None
        if not cfg.pretrained:
            run = {"run_id": logger.version, "project": params.logger.project, "mode": wandb_mode(params)}
            command = (f"make params ARGS=profile={params.profile_name}   # + the overrides that give the settings above\n"
                       f"python -m pipeline.stages.{STAGE} {' '.join(argv if argv is not None else sys.argv[1:])}")
            card = backbone_card(OmegaConf.to_container(cfg.architecture, resolve=True),
                                 OmegaConf.to_container(train, resolve=True), sizes["total"], int(trainer.global_step),
                                 seconds, metrics, data_digest(args.clean), run, command)
        elif (Path(cfg.pretrained) / "README.md").is_file():  # its card, and what this run measured
            card = append_validation((Path(cfg.pretrained) / "README.md").read_text(), metrics,
                                     f"`{STAGE}` with backbone.pretrained = {cfg.pretrained}, on {args.clean}'s val split")
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
    drawn = sample(final, scheduler, cfg.sample.count, cfg.architecture.sample_size, cfg.sample.steps, params.seed)
    grid = tile([to_uint8(x) for x in drawn], columns=cfg.sample.columns)
    write_image(args.samples, grid)
    logger.log_image(key="samples", images=[grid], caption=[f"{cfg.sample.steps}-step ancestral DDPM samples"])
    metrics.update(parameters_total=sizes["total"], steps=int(trainer.global_step))
    log_model_folder(logger, STAGE, args.out, metrics)
    write_json(args.metrics, metrics)
    finish(logger, STAGE)
    print(f"{STAGE}: {sizes['total'] / 1e6:.2f} M parameters; " +
          ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.startswith("val/")))


if __name__ == "__main__":
    main()
