"""W&B runs: one per stage execution, grouped by experiment, pointed at from ``reports/wandb/<stage>.json``.

``group`` is the DVC experiment (``DVC_EXP_NAME``) or else ``repro-<short git revision>``; ``job_type``
the stage; the run name the DVC stage name (``train_lora@noise``); the config the resolved params.
W&B's mode comes from ``logger.mode`` (``offline`` by default, so nothing needs an account) and may be
overridden by the ``WANDB_MODE`` environment variable, as W&B users expect.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from pipeline.files import write_json


def experiment_group() -> str:
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        revision = "nogit"
    return f"repro-{revision}"


def wandb_mode(params: DictConfig) -> str:
    mode = os.environ.get("WANDB_MODE") or params.logger.mode
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.mode must be online, offline or disabled, got {mode!r}")
    return mode


def make_logger(params: DictConfig, stage: str, job_type: str) -> WandbLogger:
    """A ``WandbLogger`` for one stage execution (``stage`` as DVC names it, e.g. ``train_lora@noise``)."""
    save_dir = Path(params.logger.dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        name=stage,
        project=params.logger.project,
        entity=params.logger.entity,
        save_dir=str(save_dir),
        group=experiment_group(),
        job_type=job_type,
        mode=wandb_mode(params),
        config=OmegaConf.to_container(params, resolve=True),
        log_model=False,
    )
    logger._wandb_init.pop("anonymous", None)  # Lightning always passes it; W&B warns that it has no effect
    return logger


def artifact_name(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", stage)


def log_model_folder(logger: WandbLogger, stage: str, folder: str | Path, metadata: dict[str, Any]) -> None:
    """Log a model folder (backbone or adapter) as a W&B ``model`` artifact."""
    import wandb

    run = logger.experiment
    if getattr(run, "disabled", False):
        return
    artifact = wandb.Artifact(artifact_name(stage), type="model", metadata=metadata)
    artifact.add_dir(str(folder))
    run.log_artifact(artifact)


def finish(logger: WandbLogger, stage: str, reports_dir: str | Path = "reports/wandb") -> dict[str, Any]:
    """Close the run and write ``reports/wandb/<stage>.json`` (id, mode, local folder, URL)."""
    import wandb

    run = logger.experiment
    pointer = {
        "stage": stage,
        "run_id": run.id,
        "name": run.name,
        "group": run.group,
        "job_type": run.job_type,
        "project": run.project,
        "mode": run.settings.mode,
        "dir": str(Path(run.dir).parent) if run.dir else None,
        "url": run.url if run.settings.mode == "online" else None,
    }
    wandb.finish()
    write_json(Path(reports_dir) / f"{stage}.json", pointer)
    return pointer
