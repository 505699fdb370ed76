"""The folder of a small trained module (router, noise level estimator): ``config.json`` (its dataclass config),
``model.safetensors`` and its card as README.md, written as one folder — the shape of diffusers'
``save_pretrained``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.files import atomic_dir

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_module(path: str | Path, config: Any, module: torch.nn.Module, card: str | None = None) -> None:
    """``config`` (a dataclass), the weights of ``module`` and ``card`` where given, written as one folder."""
    with atomic_dir(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")


def load_module_files(path: str | Path, what: str, stage: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config fields and the weights a ``save_module`` folder holds; a clear error naming ``what`` it should
    hold and the ``stage`` that writes it where either file is missing."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} holds no {what} ({CONFIG_FILE} / {WEIGHTS_FILE}): run `dvc repro {stage}`")
    return json.loads((path / CONFIG_FILE).read_text()), load_file(str(path / WEIGHTS_FILE))
