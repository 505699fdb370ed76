"""Training a ``OneStepRestoration`` end to end: data, trainer, W&B logging, best-on-validation weights."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig

from pipeline.data.datasets import RestorationDataModule
from pipeline.models.adapters import merged_lora_forward
from pipeline.models.backbone import OneStepReadout, count_parameters
from pipeline.training.restoration import OneStepRestoration
from pipeline.training.trainer import build_trainer, fit, resume_checkpoint


def task_balance_weights(datamodule: RestorationDataModule) -> list[float]:
    """Per-task loss weights inversely proportional to the task's mean input error (mean weight 1)."""
    errors = []
    for dataset in datamodule.train_set.datasets:
        errors.append(float(torch.stack([(lq - gt).abs().mean() for lq, gt in zip(dataset.lq, dataset.gt)]).mean()))
    inverse = [1.0 / max(e, 1e-6) for e in errors]
    return [w * len(inverse) / sum(inverse) for w in inverse]


def fit_restoration(
    params: DictConfig,
    network: torch.nn.Module,
    readout: OneStepReadout,
    tasks: Sequence[str],
    t_star: Sequence[int],
    roots: Sequence[str | Path],
    training: DictConfig,
    max_steps: int,
    logger,
    checkpoint_dir: str | Path,
    inputs: Sequence[str | Path],
    balance_tasks: bool = False,
    timestep_rules: Sequence[str] | None = None,
) -> tuple[OneStepRestoration, dict[str, float], bool]:
    """Train ``network`` (whatever of it requires grad) and leave the best-on-validation weights in it.

    ``training`` holds ``batch_size``, ``lr``, ``weight_decay``, ``warmup_steps``, ``val_every``; a
    checkpoint in ``checkpoint_dir`` made from the same params and ``inputs`` is resumed.
    Returns the module, the validation metrics of the kept weights, and whether this process is the
    global rank zero (the one that writes outputs).
    """
    network.train()  # the frozen backbone has no dropout or batch norm: modes only silence Lightning's warning
    datamodule = RestorationDataModule(roots, training.batch_size, params.seed, params.trainer.num_workers)
    datamodule.setup("fit")
    weights = task_balance_weights(datamodule) if balance_tasks else None
    module = OneStepRestoration(
        network, readout, tasks, t_star, lr=training.lr, weight_decay=training.weight_decay,
        warmup_steps=training.warmup_steps, max_steps=max_steps, task_weights=weights,
        panel_images=params.logger.panel_images, timestep_rules=timestep_rules,
    )
    sizes = count_parameters(network)
    logger.log_hyperparams({"model/parameters_total": sizes["total"], "model/parameters_trainable": sizes["trainable"],
                            "model/task_weights": weights or [1.0] * len(tasks)})
    ckpt_path = resume_checkpoint(checkpoint_dir, params, inputs)
    trainer = build_trainer(params, max_steps, training.val_every, logger, checkpoint_dir)
    with merged_lora_forward(network):
        fit(trainer, module, training.val_every, ckpt_path, datamodule=datamodule)
    metrics = module.load_best()
    metrics.update(parameters_total=sizes["total"], parameters_trainable=sizes["trainable"])
    return module, metrics, trainer.is_global_zero
