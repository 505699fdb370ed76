"""DVC stage ``fit_router``: the degradation-aware router over the trained degradations.

Trained on the single-degradation training sets, plus (``router.train.mixed_patches`` > 0) random
pairs of degradations applied to clean training patches, labelled with both components. The
unknown-degradation threshold is calibrated on validation data. Writes ``<out>/`` (config.json +
model.safetensors), validation metrics and the W&B pointer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset

from pipeline.config import load_params
from pipeline.data.datasets import D4Augmented, LabelledImages, ShuffledD4Sampler, evaluation_loader, to_tensor, training_loader
from pipeline.data.synthesis import load_clean, mixed_patches
from pipeline.files import write_json
from pipeline.models.router import DegradationRouter, RouterConfig, text_prototypes
from pipeline.tracking import finish, log_model_folder, make_logger
from pipeline.training.router import RouterTraining
from pipeline.training.trainer import build_trainer, fit, resume_checkpoint, seed

STAGE = "fit_router"


def mixed_set(params, names: list[str], clean_dir: str, split: str, count: int, size: int) -> LabelledImages | None:
    """``count`` mixed ``size``² patches of one split's clean images, targets uniform over components."""
    if count <= 0 or len(names) < 2:
        return None
    patches = mixed_patches(params.degradations, names, load_clean(clean_dir, split), size, count,
                            params.seed + (split == "val"))
    targets = torch.zeros(len(patches), len(names))
    for row, (_, components) in enumerate(patches):
        targets[row, [names.index(c) for c in components]] = 1.0 / len(components)
    return LabelledImages([to_tensor(image) for image, _ in patches], targets)


@torch.no_grad()
def calibrate_threshold(router: DegradationRouter, singles: LabelledImages, quantile: float) -> float:
    """The ``quantile`` of the best cosine similarity over validation images of known degradations."""
    best = torch.cat([router.similarity(torch.stack(singles.images[i : i + 64])).max(-1).values
                      for i in range(0, len(singles), 64)])
    return float(torch.quantile(best, quantile))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/degraded")
    parser.add_argument("--clean", default="data/clean")
    parser.add_argument("--out", default="models/router")
    parser.add_argument("--metrics", default=f"reports/{STAGE}.json")
    parser.add_argument("--checkpoints", default=f"checkpoints/{STAGE}")
    args = parser.parse_args(argv)
    params = load_params(args.params)
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
        temperature=cfg.temperature, top_k=cfg.top_k, prototypes=cfg.prototypes), prototypes=prototypes)
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
    router.save_pretrained(args.out)
    metrics.update(threshold=router.config.threshold, top_k=cfg.top_k,
                   parameters=sum(p.numel() for p in router.parameters()))
    log_model_folder(logger, STAGE, args.out, metrics)
    logger.experiment.summary.update(metrics)
    write_json(args.metrics, metrics)
    finish(logger, STAGE)
    print(f"{STAGE}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
