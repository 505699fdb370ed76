"""N LoRA adapters on one frozen backbone, composed with per-sample weights.

Every adapted layer computes ``base(x) + Σ_i w[b, i] · scale_i · B_i(A_i(x))`` for each sample ``b``.
PEFT's layers hold the adapters and compute ``B_i(A_i(x))``; PEFT has no per-sample weighted mixing,
so a forward hook on each LoRA layer adds the weighted deltas while PEFT's own adapter path is
disabled. When every sample shares one weight vector, PEFT does it alone: the adapters with a
non-zero weight are made active and their scales multiplied by the weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from pipeline.models.adapters import read_restoration_settings
from pipeline.models.backbone import OneStepReadout, load_backbone


class AdapterComposition(torch.nn.Module):
    """A ``PeftModel`` holding N named adapters, each with its one-step timestep ``t*``."""

    def __init__(self, model: PeftModel, names: Sequence[str], t_star: Sequence[int], readout: OneStepReadout):
        super().__init__()
        missing = [n for n in names if n not in model.peft_config]
        if missing:
            raise ValueError(f"adapters {missing} are not loaded in the model")
        self.model = model
        self.names = list(names)
        self.readout = readout
        self.register_buffer("t_star", torch.tensor(list(t_star), dtype=torch.float32), persistent=False)
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self._weights: torch.Tensor | None = None
        for layer in self.layers:
            layer.register_forward_hook(self._mix)
        model.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, backbone: str | Path, adapters: Mapping[str, str | Path]) -> "AdapterComposition":
        """The backbone folder plus adapter folders (PEFT format + ``restoration.json``), by degradation name."""
        if not adapters:
            raise ValueError("no adapters to compose")
        unet, scheduler = load_backbone(backbone)
        settings = {name: read_restoration_settings(path) for name, path in adapters.items()}
        for name, path in adapters.items():
            if settings[name].get("degradation") != name:
                raise ValueError(f"{path} holds the adapter for {settings[name].get('degradation')!r}, not {name!r}")
        model = None
        for name, path in adapters.items():
            try:
                if model is None:
                    model = PeftModel.from_pretrained(unet, str(path), adapter_name=name, is_trainable=False)
                else:
                    model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            except RuntimeError as error:  # shape mismatch: trained on another backbone
                raise ValueError(f"adapter {path} does not fit the backbone {backbone}: {str(error).splitlines()[0]}") from None
        return cls(model, list(adapters), [settings[n]["t_star"] for n in adapters], OneStepReadout(scheduler))

    def _mix(self, layer: LoraLayer, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self._weights is None:
            return output
        x = args[0]
        for index, name in enumerate(self.names):
            if name not in layer.lora_A:
                continue
            w = self._weights[:, index]
            if not bool(w.any()):
                continue
            delta = layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](x))) * layer.scaling[name]
            output = output + w.view(-1, *([1] * (delta.ndim - 1))).to(delta.dtype) * delta
        return output

    @contextmanager
    def _per_sample(self, weights: torch.Tensor) -> Iterator[None]:
        self.model.base_model.disable_adapter_layers()
        self._weights = weights
        try:
            yield
        finally:
            self._weights = None
            self.model.base_model.enable_adapter_layers()

    @contextmanager
    def _shared(self, weights: torch.Tensor) -> Iterator[None]:
        active = [name for name, w in zip(self.names, weights.tolist()) if w != 0]
        if not active:
            with self.model.disable_adapter():
                yield
            return
        self.model.base_model.set_adapter(active, inference_mode=True)
        for layer in self.layers:
            for name, w in zip(self.names, weights.tolist()):
                layer.set_scale(name, w)
        try:
            yield
        finally:
            for layer in self.layers:
                for name in self.names:
                    layer.set_scale(name, 1.0)

    def unet(self, x_t: torch.Tensor, timesteps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The composed UNet's noise prediction; ``weights`` is (B, N), or (N,) for every sample alike."""
        weights = self._check(weights, x_t.shape[0])
        shared = weights.ndim == 1 or bool((weights == weights[:1]).all())
        context = self._shared(weights if weights.ndim == 1 else weights[0]) if shared else self._per_sample(weights)
        with context:
            return self.model(x_t, timesteps).sample

    def timesteps(self, weights: torch.Tensor) -> torch.Tensor:
        """Per-sample ``t*``: the weight-averaged timesteps of the composed adapters (rounded).

        All-zero weights (no adapter) get the mean ``t*``."""
        weights = weights if weights.ndim == 2 else weights[None]
        total = weights.sum(dim=1, keepdim=True)
        uniform = torch.full_like(weights, 1.0 / weights.shape[1])
        normalised = torch.where(total > 0, weights / total.clamp_min(1e-12), uniform)
        return (normalised @ self.t_star).round().long()

    def restore(self, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One-step restoration of ``y`` (B×3×H×W on [-1, 1]) with the composed adapters."""
        weights = self._check(weights, y.shape[0])
        per_sample = weights if weights.ndim == 2 else weights.expand(y.shape[0], -1)
        timesteps = self.timesteps(per_sample)
        unet = lambda x_t, t: _Sample(self.unet(x_t, t, weights))  # noqa: E731
        return self.readout(unet, y, timesteps)

    def _check(self, weights: torch.Tensor, batch: int) -> torch.Tensor:
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape[-1] != len(self.names) or weights.ndim not in (1, 2) or (
            weights.ndim == 2 and weights.shape[0] != batch
        ):
            raise ValueError(f"weights must be ({batch}, {len(self.names)}) or ({len(self.names)},), got {tuple(weights.shape)}")
        return weights

    def weights_for(self, mix: Mapping[str, float]) -> torch.Tensor:
        """A weight vector from ``{degradation: weight}``; unknown names are an error."""
        unknown = sorted(set(mix) - set(self.names))
        if unknown:
            raise KeyError(f"no adapter for {unknown}; loaded: {self.names}")
        return torch.tensor([float(mix.get(n, 0.0)) for n in self.names])


class _Sample:
    """The ``.sample`` attribute that diffusers' UNet outputs carry, for ``OneStepReadout``."""

    def __init__(self, sample: torch.Tensor):
        self.sample = sample
