"""The Lightning ``Trainer`` from params, and resumable training.

Accelerator, devices, strategy, precision are configuration, so DDP, multi-GPU and multi-node runs need
no code change. Each stage checkpoints into its own folder after every validation; the folder is not
a DVC output, because ``dvc exp run`` force-checks-out a stage's outputs, persist ones included, before
it runs it. A stage killed mid-training resumes from its last checkpoint on the next ``dvc repro`` or
``dvc exp run``, provided the params and inputs it was started with are unchanged
(``fingerprint.json``). Batches are a pure function of the step (``ResumableBatchSampler``) and the
checkpoint carries the global RNG state, so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import logging
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from pipeline.data.loaders import ResumableBatchSampler
from pipeline.files import write_json

LAST_CHECKPOINT = "last.ckpt"
FINGERPRINT = "fingerprint.json"


def configure_threads(trainer_params: DictConfig) -> None:
    if trainer_params.cpu_threads:
        torch.set_num_threads(int(trainer_params.cpu_threads))


def native_cpu_bf16() -> bool:
    """This CPU computes bf16 natively (AVX512-BF16 or AMX): bf16 autocast speeds training up instead of down."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def check_precision(trainer_params: DictConfig) -> None:
    """bf16 autocast runs on any CPU, but emulated it is slower than fp32: say so rather than train slowly."""
    if trainer_params.accelerator == "cpu" and str(trainer_params.precision).startswith("bf16") and not native_cpu_bf16():
        warnings.warn(f"trainer.precision={trainer_params.precision} on a CPU without native bf16 (AVX512-BF16 or "
                      "AMX) trains slower than fp32: run with -S trainer.precision=32-true", stacklevel=2)


def seed(params: DictConfig) -> None:
    """Seed every generator from ``params.seed``: a training stage calls it first, before it builds a
    model, so that initial weights (UNet, LoRA A matrices, router) are the same on every run."""
    L.seed_everything(params.seed, workers=True, verbose=False)


def fingerprint(params: DictConfig, inputs: Sequence[str | Path]) -> str:
    """A hash of the resolved params and of every file under ``inputs``: what a checkpoint was trained from."""
    digest = hashlib.sha256(json.dumps(OmegaConf.to_container(params, resolve=True), sort_keys=True).encode())
    for root in map(Path, inputs):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            digest.update(str(file.relative_to(root) if root.is_dir() else file.name).encode())
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def resume_checkpoint(checkpoint_dir: str | Path, params: DictConfig, inputs: Sequence[str | Path]) -> Path | None:
    """The checkpoint to resume from, if ``checkpoint_dir`` holds one made from the same params and inputs;
    otherwise the folder is emptied for a fresh run (on the global rank zero only)."""
    checkpoint_dir = Path(checkpoint_dir)
    expected = fingerprint(params, inputs)
    last = checkpoint_dir / LAST_CHECKPOINT
    recorded = checkpoint_dir / FINGERPRINT
    if last.is_file() and recorded.is_file() and json.loads(recorded.read_text()).get("fingerprint") == expected:
        return last
    if rank_zero_only.rank == 0:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        write_json(recorded, {"fingerprint": expected})
    return None


class ValidationCheckpoint(Callback):
    """Writes ``last.ckpt`` after every validation during ``fit``: the best-on-validation bookkeeping of the
    module is then part of it (Lightning writes through a temporary file: a kill leaves the previous one)."""

    def __init__(self, checkpoint_dir: str | Path):
        self.path = Path(checkpoint_dir) / LAST_CHECKPOINT

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path, weights_only=False)  # the full state: optimiser, loops, RNG


class GlobalRngState(Callback):
    """Saves the global torch RNG (DDPM noise and timesteps draw from it) and restores it at the first
    batch after a resume, once Lightning has built its loaders."""

    def __init__(self):
        self._pending: torch.Tensor | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get("torch_rng_state")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            torch.set_rng_state(self._pending)
            self._pending = None


class StepProgressBar(TQDMProgressBar):
    """One bar over the run's optimisation steps (``max_steps``), not one per epoch: training is set in steps,
    and Lightning's per-epoch bar shows "Epoch 2/-2" when no epoch limit is set."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:
            bar.reset(total=trainer.max_steps)
            bar.n = trainer.global_step
            bar.set_description("training steps")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._should_update(trainer.global_step, trainer.max_steps):
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
            self.train_progress_bar.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # the bar runs on across epochs


class _NoAdvertising(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvertising())


class TrackDataPosition(Callback):
    """Keeps every ``ResumableBatchSampler`` told how many batches training has consumed: the position its
    loader saves in a checkpoint (the loader itself runs a batch ahead of training)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loaders = trainer.train_dataloader
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            sampler = getattr(loader, "batch_sampler", None)
            if isinstance(sampler, ResumableBatchSampler):
                sampler.step = trainer.global_step


def build_trainer(
    params: DictConfig,
    max_steps: int,
    val_every: int,
    logger: Any,
    checkpoint_dir: str | Path,
    **overrides: Any,
) -> L.Trainer:
    """A Trainer for ``max_steps`` optimisation steps, validating and checkpointing every ``val_every``
    steps into ``checkpoint_dir``."""
    cfg = params.trainer
    configure_threads(cfg)
    check_precision(cfg)
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
        enable_model_summary=False,  # the stage logs its parameter counts itself
        enable_checkpointing=False,  # ValidationCheckpoint writes the one checkpoint a resume needs
        use_distributed_sampler=False,  # ResumableBatchSampler shards batches across ranks itself
        logger=logger,
        callbacks=[ValidationCheckpoint(checkpoint_dir), GlobalRngState(), TrackDataPosition(),
                   *([StepProgressBar()] if overrides.get("enable_progress_bar", True) else [])],
        default_root_dir=str(checkpoint_dir),
    )
    options.update(overrides)
    return L.Trainer(**options)


def fit(trainer: L.Trainer, module: L.LightningModule, val_every: int, ckpt_path: str | Path | None = None,
        datamodule: L.LightningDataModule | None = None, train_dataloaders: Any = None, val_dataloaders: Any = None) -> None:
    """``trainer.fit`` (resumed from ``ckpt_path`` if given), plus a last validation when ``max_steps`` is
    not a multiple of ``val_every`` or when the run resumed at its end (so final metrics always exist)."""
    if ckpt_path is not None:
        step = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
        print(f"resuming from {ckpt_path} at step {step}")
    trainer.fit(module, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders, datamodule=datamodule,
                ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    if trainer.max_steps % val_every or not any(k.startswith("val/") for k in trainer.callback_metrics):
        trainer.validate(module, dataloaders=val_dataloaders, datamodule=datamodule, verbose=False)
