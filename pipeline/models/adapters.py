"""LoRA adapters on the frozen backbone, in PEFT's own format (``adapter_config.json`` +
``adapter_model.safetensors``, loadable by ``PeftModel.from_pretrained``), plus the restoration
settings an adapter needs beside its weights (``restoration.json``: degradation, ``t*``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import UNet2DModel
from peft import LoraConfig, PeftModel, get_peft_model

from pipeline.files import write_json

RESTORATION_FILE = "restoration.json"


def lora_config(settings: Mapping[str, Any]) -> LoraConfig:
    """A ``LoraConfig`` from ``rank``, ``alpha`` and ``targets`` (module-name suffixes of the UNet)."""
    return LoraConfig(
        r=int(settings["rank"]),
        lora_alpha=float(settings["alpha"]),
        target_modules=list(settings["targets"]),
        lora_dropout=0.0,
        init_lora_weights=True,  # B = 0: a fresh adapter leaves the backbone's output unchanged
    )


def attach_lora(unet: UNet2DModel, config: LoraConfig, name: str = "default") -> PeftModel:
    """Wrap the frozen ``unet`` with a trainable LoRA adapter; only ``lora_`` parameters require grad."""
    unet.requires_grad_(False)
    model = get_peft_model(unet, config, adapter_name=name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if not trainable or any("lora_" not in n for n in trainable):
        raise RuntimeError("after attaching LoRA, exactly the lora_ parameters must be trainable")
    return model


def save_adapter(model: PeftModel, path: str | Path, degradation: str, t_star: int, name: str = "default") -> None:
    """PEFT's ``save_pretrained`` plus the adapter's restoration settings."""
    path = Path(path)
    model.save_pretrained(path, selected_adapters=[name], safe_serialization=True)
    write_json(path / RESTORATION_FILE, {"degradation": degradation, "t_star": int(t_star)})


def read_restoration_settings(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / RESTORATION_FILE
    if not file.is_file() or not (path / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a complete adapter folder ({RESTORATION_FILE} or weights missing)")
    return json.loads(file.read_text())


def adapter_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
