"""``ModelsFolder``: the one place that knows the layout of a models folder, as ``dvc repro`` writes it.

    backbone/                  UNet2DModel (save_pretrained) + scheduler config      pretrain_backbone
    loras/<degradation>/       PEFT adapter + restoration.json (degradation, t*)     train_lora@<d>
    router/                    config.json + model.safetensors                       fit_router
    noise_level/<degradation>/ config.json + model.safetensors, for adapters whose    fit_noise_level
                               timestep follows the noise level (``noise_sigma``)
    baselines/<name>/          a compared method + restoration.json (kind, t*, label) train_<name>

Every check names the DVC stage that writes what is missing.

``weights/uir-lora-cbsd432`` (in the repository) is such a folder, shipped: what ``uir`` restores with before
any ``dvc repro``; the ``models/`` of the last ``dvc repro`` takes precedence (``resolve_models``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.files import write_json

RESTORATION_FILE = "restoration.json"
BASELINE_KINDS = ("unet", "lora")  # a full UNet2DModel; or a LoRA on the backbone, merged into it


SHIPPED = Path(__file__).resolve().parents[2] / "weights" / "uir-lora-cbsd432"
TRAINED = Path("models")  # where `dvc repro` writes, relative to the project


def resolve_models(requested: str | Path | None) -> Path:
    """The models folder to use: ``requested`` if given; else ``models/`` when the last ``dvc repro`` left a
    backbone and a router there; else the shipped set (else ``models/``, whose checks name the stage to run)."""
    if requested is not None:
        return Path(requested)
    complete = all((TRAINED / part / "config.json").is_file() for part in ("backbone", "router"))
    return TRAINED if complete or not (SHIPPED / "backbone" / "config.json").is_file() else SHIPPED


class ModelsFolderError(FileNotFoundError):
    """A models folder that lacks what restoration needs; the message names the DVC stage to run."""


class ModelsFolder:
    def __init__(self, root: str | Path = "models"):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelsFolder({str(self.root)!r})"

    @property
    def backbone(self) -> Path:
        return self.root / "backbone"

    @property
    def router(self) -> Path:
        return self.root / "router"

    def lora(self, name: str) -> Path:
        return self.root / "loras" / name

    def noise_level(self, name: str) -> Path:
        return self.root / "noise_level" / name

    def noise_levels(self, names: list[str]) -> dict[str, Path]:
        """The noise level estimators present for the adapters ``names``, by adapter."""
        return {n: self.noise_level(n) for n in names if (self.noise_level(n) / "config.json").is_file()}

    def baseline(self, name: str) -> Path:
        return self.root / "baselines" / name

    def adapter_names(self) -> list[str]:
        """The adapters present, in name order."""
        folder = self.root / "loras"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def baseline_names(self) -> list[str]:
        folder = self.root / "baselines"
        return sorted(p.name for p in folder.iterdir() if (p / RESTORATION_FILE).is_file()) if folder.is_dir() else []

    def require_backbone(self) -> None:
        if not (self.backbone / "config.json").is_file():
            raise ModelsFolderError(f"{self.backbone} is missing: run `dvc repro pretrain_backbone` (models folder {self.root})")

    def require_router(self) -> list[str]:
        """The degradations the router was fitted for."""
        if not (self.router / "config.json").is_file():
            raise ModelsFolderError(f"{self.router} is missing: run `dvc repro fit_router` (models folder {self.root}); "
                                    "--lora and --mix restore without a router")
        return list(json.loads((self.router / "config.json").read_text())["names"])

    def require_adapters(self, names: list[str]) -> None:
        for name in names:
            if not (self.lora(name) / "adapter_model.safetensors").is_file():
                raise ModelsFolderError(f"{self.lora(name)} is missing: run `dvc repro train_lora@{name}`")

    def check(self, router: bool = True) -> list[str]:
        """The adapter names to load: the router's (all present), or, without a router, every adapter present."""
        self.require_backbone()
        names = self.require_router() if router else self.adapter_names()
        if not names:
            raise ModelsFolderError(f"{self.root / 'loras'} holds no adapter: run `dvc repro train_lora`")
        self.require_adapters(names)
        return names

    # --- restoration settings of one model folder (an adapter or a baseline) -------------------------

    @staticmethod
    def write_settings(folder: str | Path, **settings: Any) -> None:
        write_json(Path(folder) / RESTORATION_FILE, settings)

    @staticmethod
    def read_settings(folder: str | Path, stage: str) -> dict[str, Any]:
        file = Path(folder) / RESTORATION_FILE
        if not file.is_file():
            raise ModelsFolderError(f"{file} is missing: run `dvc repro {stage}`")
        return json.loads(file.read_text())
