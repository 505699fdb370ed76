"""DVC stage ``fit_router``: the degradation-aware router over the trained degradations.

Trained on the single-degradation training sets, plus (``router.train.mixed_patches`` > 0) random
pairs of degradations applied to clean training patches, labelled with both components. The
unknown-degradation threshold is calibrated on validation data. Writes ``<out>/`` (config.json +
model.safetensors), validation metrics and the W&B pointer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import stage_params

STAGE = "fit_router"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/degraded")
    parser.add_argument("--clean", default="data/clean")
    parser.add_argument("--out", default="models/router")
    parser.add_argument("--metrics", default=f"reports/{STAGE}.json")
    parser.add_argument("--checkpoints", default=f"checkpoints/{STAGE}")
    args = parser.parse_args(argv)
    params = stage_params(args.params)

    from torch.utils.data import ConcatDataset

    from pipeline.data.datasets import D4Augmented, LabelledImages
    from pipeline.data.loaders import ShuffledD4Sampler, evaluation_loader, training_loader
    from pipeline.files import write_json
    from pipeline.models.router import DegradationRouter, RouterConfig, text_prototypes
    from pipeline.tracking import finish, log_model_folder, make_logger
    from pipeline.training.router import RouterTraining, calibrate_mix_threshold, calibrate_threshold, mixed_set
    from pipeline.training.trainer import build_trainer, fit, resume_checkpoint, seed

    seed(params)
    cfg = params.router
    names = list(params.degradations)
    roots = [Path(args.data) / n for n in names]

    train_parts = [LabelledImages.from_sets(roots, "train")]
    val_parts = [LabelledImages.from_sets(roots, "val")]
    sizes = params.synthesis
    for parts, split, count, size in (
        (train_parts, "train", cfg.train.mixed_patches, sizes.patch_size),
        (val_parts, "val", cfg.train.mixed_val_patches, sizes.eval_crop),
    ):
        mixed = mixed_set(params, names, args.clean, split, count, size)
        if mixed is not None:
            parts.append(mixed)

    prototypes = None
    if cfg.prototypes == "text":  # frozen: the router learns to map images onto the names' embeddings
        prototypes = text_prototypes([params.degradations[n].description for n in names])
    router = DegradationRouter(RouterConfig(
        names=names, embed_dim=prototypes.shape[1] if prototypes is not None else cfg.embed_dim, width=cfg.width,
        temperature=cfg.temperature, prototypes=cfg.prototypes), prototypes=prototypes)
    module = RouterTraining(router, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                            warmup_steps=cfg.train.warmup_steps, max_steps=cfg.train.max_steps)
    logger = make_logger(params, STAGE, job_type=STAGE)
    ckpt_path = resume_checkpoint(args.checkpoints, params, [*roots, args.clean])
    trainer = build_trainer(params, cfg.train.max_steps, cfg.train.val_every, logger, args.checkpoints)
    train_set = ConcatDataset(train_parts)
    train_loader = training_loader(D4Augmented(train_set), ShuffledD4Sampler(len(train_set), cfg.train.batch_size,
                                                                            params.seed), params.trainer.num_workers)
    val_loaders = [evaluation_loader(part, cfg.train.batch_size) for part in val_parts]  # singles, mixes: two sizes
    fit(trainer, module, cfg.train.val_every, ckpt_path, train_dataloaders=train_loader, val_dataloaders=val_loaders)
    if not trainer.is_global_zero:
        return
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    router.eval()
    router.config.threshold = calibrate_threshold(router, val_parts[0], cfg.unknown_quantile)
    router.config.mix_threshold, mix_rates = calibrate_mix_threshold(router, val_parts[0], val_parts[1] if len(val_parts) > 1 else None)
    router.save_pretrained(args.out)
    metrics.update(threshold=router.config.threshold, mix_threshold=router.config.mix_threshold, **mix_rates,
                   parameters=sum(p.numel() for p in router.parameters()))
    log_model_folder(logger, STAGE, args.out, metrics)
    logger.experiment.summary.update(metrics)
    write_json(args.metrics, metrics)
    finish(logger, STAGE)
    print(f"{STAGE}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
