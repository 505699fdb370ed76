"""The methods the evaluation compares, each a function from a degraded batch (and its true
degradations) to a restored batch, all on the same frozen backbone and one-step read-out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from peft import PeftModel

from pipeline.files import read_json
from pipeline.models.adapters import read_restoration_settings
from pipeline.models.backbone import OneStepReadout, downsample_factor, load_backbone
from pipeline.models.composition import AdapterComposition
from pipeline.models.router import DegradationRouter

Restore = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


def pad_to_multiple(images: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad the bottom and right so both sides are multiples of ``multiple``."""
    h, w = images.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w) else "replicate")
    return images, (h, w)


@dataclass
class Models:
    """Everything a models folder holds, loaded once."""

    composition: AdapterComposition
    router: DegradationRouter
    multitask: torch.nn.Module
    multitask_t_star: int
    shared: torch.nn.Module
    shared_t_star: int
    readout: OneStepReadout
    multiple: int

    @classmethod
    def load(cls, models: str | Path, degradations: Sequence[str]) -> "Models":
        models = Path(models)
        composition = AdapterComposition.from_pretrained(models / "backbone",
                                                         {d: models / "loras" / d for d in degradations})
        router = DegradationRouter.from_pretrained(models / "router")
        router.check_adapters(composition.names)
        multitask, scheduler = load_backbone(models / "multitask")
        shared_base, _ = load_backbone(models / "backbone")
        # merged into the weights: the same function as the adapter, at the bare backbone's cost
        shared = PeftModel.from_pretrained(shared_base, str(models / "shared_lora")).merge_and_unload().eval()
        return cls(
            composition=composition, router=router, multitask=multitask,
            multitask_t_star=int(read_json(models / "multitask" / "restoration.json", "train_multitask")["t_star"]),
            shared=shared, shared_t_star=int(read_restoration_settings(models / "shared_lora")["t_star"]),
            readout=OneStepReadout(scheduler), multiple=downsample_factor(multitask),
        )

    def methods(self, top_k: int) -> dict[str, Restore]:
        """The compared methods, in report order."""
        n = len(self.composition.names)

        def oracle(lq: torch.Tensor, truths: Sequence[str]) -> torch.Tensor:
            weights = torch.zeros(lq.shape[0], n)
            for row, truth in enumerate(truths):
                components = truth.split("+")
                for name in components:
                    weights[row, self.composition.names.index(name)] = 1.0 / len(components)
            return self.composition.restore(lq, weights)

        def routed(k: int) -> Restore:
            def restore(lq: torch.Tensor, truths: Sequence[str]) -> torch.Tensor:
                routing = self.router.route(lq, top_k=k)
                return self.composition.restore(lq, routing.weights)

            return restore

        def fixed_t(network: torch.nn.Module, t_star: int) -> Restore:
            return lambda lq, truths: self.readout(network, lq, torch.full((lq.shape[0],), t_star))

        return {
            "input": lambda lq, truths: lq,
            "oracle_lora": oracle,
            "uir_lora": routed(top_k),
            "uir_lora_top1": routed(1),
            "multitask": fixed_t(self.multitask, self.multitask_t_star),
            "shared_lora": fixed_t(self.shared, self.shared_t_star),
        }

    @torch.no_grad()
    def run(self, method: Restore, lq: torch.Tensor, truths: Sequence[str]) -> torch.Tensor:
        """``method`` on a batch of any size: padded to the UNet's multiple, cropped back, clamped."""
        padded, (h, w) = pad_to_multiple(lq, self.multiple)
        return method(padded, truths)[..., :h, :w].clamp(-1, 1)

