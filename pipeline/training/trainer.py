"""The Lightning ``Trainer`` from params: accelerator, devices, strategy, precision are configuration,
so DDP, multi-GPU and multi-node runs need no code change."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig


def configure_threads(trainer_params: DictConfig) -> None:
    if trainer_params.cpu_threads:
        torch.set_num_threads(int(trainer_params.cpu_threads))


def seed(params: DictConfig) -> None:
    """Seed every generator from ``params.seed``: a training stage calls it first, before it builds a
    model, so that initial weights (UNet, LoRA A matrices, router) are the same on every run."""
    L.seed_everything(params.seed, workers=True, verbose=False)


def build_trainer(
    params: DictConfig,
    max_steps: int,
    val_every: int,
    logger: Any,
    checkpoint_dir: str | Path,
    callbacks: Sequence[Callback] = (),
    **overrides: Any,
) -> L.Trainer:
    """A Trainer for ``max_steps`` optimisation steps, validating every ``val_every`` steps, checkpointing
    every ``trainer.checkpoint_every`` steps into ``checkpoint_dir`` (emptied first)."""
    cfg = params.trainer
    configure_threads(cfg)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    checkpoint = ModelCheckpoint(dirpath=str(checkpoint_dir), every_n_train_steps=cfg.checkpoint_every,
                                 save_last=True, save_top_k=0, enable_version_counter=False)
    options = dict(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=cfg.precision,
        deterministic=cfg.deterministic,
        max_steps=max_steps,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.log_every_n_steps,
        enable_progress_bar=True,
        logger=logger,
        callbacks=[checkpoint, *callbacks],
        default_root_dir=str(checkpoint_dir),
    )
    options.update(overrides)
    return L.Trainer(**options)


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule, val_every: int) -> None:
    """``trainer.fit``, plus a last validation when ``max_steps`` is not a multiple of ``val_every``."""
    trainer.fit(module, datamodule=datamodule)
    if trainer.max_steps % val_every:
        trainer.validate(module, datamodule=datamodule, verbose=False)
