"""LoRA adapters on the frozen backbone, in PEFT's own format (``adapter_config.json`` +
``adapter_model.safetensors``, loadable by ``PeftModel.from_pretrained``), plus the restoration
settings an adapter needs beside its weights (``restoration.json``: degradation, ``t*``, timestep rule)."""

from __future__ import annotations

import json
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from pipeline.models.folder import RESTORATION_FILE, ModelsFolder


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


def save_adapter(model: PeftModel, path: str | Path, degradation: str, t_star: int, timestep: str = "fixed",
                 name: str = "default") -> None:
    """PEFT's ``save_pretrained`` plus the adapter's restoration settings."""
    path = Path(path)
    model.save_pretrained(path, selected_adapters=[name], safe_serialization=True)
    # PEFT writes target_modules from a set, in an order that changes with the process's hash seed;
    # sorted, the same adapter gives the same bytes (and the same DVC hash) in every run.
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    ModelsFolder.write_settings(path, degradation=degradation, t_star=int(t_star), timestep=timestep)


def read_restoration_settings(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / RESTORATION_FILE
    if not file.is_file() or not (path / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a complete adapter folder ({RESTORATION_FILE} or weights missing)")
    return json.loads(file.read_text())


def adapter_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def merged_weight(layer: LoraLayer, names: list[str], mixing: torch.Tensor) -> torch.Tensor:
    """``W + Σ_i mixing[..., i] · ΔW_i`` with PEFT's ``get_delta_weight`` (``scale·B·A``) for adapters ``names``:
    one weight for ``mixing`` (N,), one per sample for (B, N). The one place adapter weights are merged."""
    deltas = torch.stack([layer.get_delta_weight(name) for name in names])
    return layer.get_base_layer().weight + torch.tensordot(mixing.to(deltas.dtype), deltas, dims=1)


def apply_weight(base: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``base``'s convolution or matmul on ``x`` with ``weight`` in place of its own; a weight with one more
    dimension than ``base.weight`` holds one per sample (a grouped convolution, or a batched matmul)."""
    if weight.ndim == base.weight.ndim:
        if isinstance(base, torch.nn.Conv2d):
            return base._conv_forward(x, weight, base.bias)
        return F.linear(x, weight, base.bias)
    batch = x.shape[0]
    if isinstance(base, torch.nn.Conv2d):
        if base.padding_mode != "zeros" or isinstance(base.padding, str):
            return torch.cat([apply_weight(base, x[b : b + 1], weight[b]) for b in range(batch)])
        out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), weight.reshape(-1, *weight.shape[2:]),
                       None if base.bias is None else base.bias.repeat(batch),
                       base.stride, base.padding, base.dilation, base.groups * batch)
        return out.view(batch, -1, *out.shape[2:])
    out = torch.einsum("b...i,boi->b...o", x, weight)
    return out if base.bias is None else out + base.bias


def _merged_forward(layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if layer.disable_adapters or layer.merged or args or kwargs:
        return type(layer).forward(layer, x, *args, **kwargs)
    names = [name for name in layer.active_adapters if name in layer.lora_A]
    if not names:
        return layer.get_base_layer()(x)
    weight = merged_weight(layer, names, torch.ones(len(names), device=x.device))
    return apply_weight(layer.get_base_layer(), x, weight)


@contextmanager
def merged_lora_forward(model: torch.nn.Module) -> Iterator[None]:
    """Every LoRA layer of ``model`` computes ``base(x; W + Σ scale·B·A)`` over its active adapters: one
    convolution or matmul (``merged_weight``, as the composition of adapters at inference).

    The same function and gradients as PEFT's ``base(x) + scale·B(A(x))`` (LoRA dropout is 0), up to float
    rounding. It pays in training on a small backbone, where the adapter path costs more than the layer
    it adapts (a rank-64 3×3 ``A`` on a 16-channel layer has four times the layer's multiply-adds) while
    composing the weights costs almost nothing.
    """
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)
              and isinstance(m.get_base_layer(), (torch.nn.Conv2d, torch.nn.Linear))]
    for layer in layers:
        if any(not isinstance(d, torch.nn.Identity) for d in layer.lora_dropout.values()):
            raise ValueError("merged LoRA forward needs lora_dropout=0")
        layer.forward = types.MethodType(_merged_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
