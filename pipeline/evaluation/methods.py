"""The methods the evaluation compares, each a function from one degraded image (H×W×3 uint8) and its true
degradation (``noise``, ``noise+blur``) to the restored image, all through the restorer's one path.

UIR-LoRA is ``UniversalRestorer.restore`` exactly as ``uir restore`` runs it (the settings chosen on
validation, unknown-degradation fallback included), beside its variants — top-1 routing; gated routing
with each composition; confirmed routing; the paper's top-K weight-space mix; the noise adapter's timestep from the analytic σ̂
instead of its learned estimator — and the oracle (the true adapters) with each composition. A baseline is data: every ``models/baselines/<name>/`` folder with a
``restoration.json`` (``kind``: ``unet`` for a full UNet2DModel, ``lora`` for a PEFT adapter on the
backbone; ``t_star``; ``label``) is evaluated, so adding one takes its stage, its params and its
``dvc.yaml`` entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.models.backbone import OneStepReadout, load_backbone
from pipeline.models.folder import BASELINE_KINDS, ModelsFolder
from pipeline.models.restorer import (RestorationCache, RestorationSettings, UniversalRestorer, from_float, restore_tiled,
                                      to_float)
from pipeline.models.router import MIX_THRESHOLD_POLICIES

Restore = Callable[[np.ndarray, str], np.ndarray]


@dataclass
class Method:
    name: str  # stable: metric names are built from it
    label: str  # for tables and charts
    restore: Restore


def oracle_weights(truth: str) -> dict[str, float]:
    """The true adapter, or equal weights over a mix's components."""
    components = truth.split("+")
    return {name: 1.0 / len(components) for name in components}


def baseline_method(folder: ModelsFolder, name: str, multiple: int, device: str = "cpu") -> Method:
    """A compared network at its fixed timestep, restored like every other method (``restore_tiled``)."""
    from peft import PeftModel

    path = folder.baseline(name)
    settings = ModelsFolder.read_settings(path, f"train_{name}")
    if settings.get("kind") not in BASELINE_KINDS:
        raise ValueError(f"{path}: restoration.json kind must be one of {BASELINE_KINDS}, got {settings.get('kind')!r}")
    if settings["kind"] == "unet":
        network, scheduler = load_backbone(path)
    else:  # merged into the weights: the same function as the adapter, at the bare backbone's cost
        base, scheduler = load_backbone(folder.backbone)
        network = PeftModel.from_pretrained(base, str(path)).merge_and_unload().eval()
    network.to(device)
    readout = OneStepReadout(scheduler).to(device)
    t_star = int(settings["t_star"])

    def restore(image: np.ndarray, truth: str) -> np.ndarray:
        x, back = to_float(image)
        run = lambda y: readout(network, y, torch.full((y.shape[0],), t_star, device=y.device))  # noqa: E731
        return from_float(restore_tiled(run, x, multiple, device=device), back)

    return Method(name, settings.get("label", name), restore)


def load_methods(models: str | Path, settings: RestorationSettings | None = None, device: str = "cpu",
                 share_restorations: bool = True) -> tuple[list[Method], UniversalRestorer]:
    """Every compared method, in report order, and the UIR-LoRA restorer they share (``settings``: default
    the models folder's, as ``uir restore`` uses them). ``share_restorations``: with one ``RestorationCache``,
    so the variants restore each set of adapter steps an image gets once (same outputs); without, for timing
    each method by its own network passes."""
    folder = ModelsFolder(models)
    restorer = UniversalRestorer.from_pretrained(folder.root, settings=settings, device=device,
                                                 cache=RestorationCache() if share_restorations else None)
    shipped = restorer.settings
    variants = {
        "uir_lora_top1": ("UIR-LoRA, top-1 routing", restorer.with_settings(policy="top1")),
        **{f"uir_lora_gated_{c}": (f"UIR-LoRA, gated routing, {c} mixing", restorer.with_settings(policy="gated", composition=c))
           for c in ("sequential", "weights", "planned")},
        "uir_lora_confirmed": ("UIR-LoRA, confirmed routing (a mix confirmed on the first adapter's restoration), planned mixing",
                               restorer.with_settings(policy="confirmed", composition="planned")),
        "uir_lora_paper": (f"UIR-LoRA as in the paper (top-{shipped.top_k}, weight-space mixing)",
                           restorer.with_settings(policy="topk", composition="weights")),
        "uir_lora_analytic": ("UIR-LoRA as shipped, the noise timestep from the analytic σ̂",
                              restorer.with_settings(noise_level="analytic")),
    }
    oracles = {c: restorer.with_settings(composition=c) for c in ("sequential", "weights", "planned")}
    threshold = "" if shipped.policy not in MIX_THRESHOLD_POLICIES else f" at {shipped.mix_threshold if shipped.mix_threshold is not None else 'the router' + chr(39) + 's'} threshold"
    methods = [
        Method("input", "degraded input", lambda image, truth: image),
        *[Method(f"oracle_{c}", f"oracle: the true adapters, {c} mixing",
                 lambda image, truth, r=r: r.restore(image, weights=oracle_weights(truth))) for c, r in oracles.items()],
        Method("oracle_analytic", "oracle: the true adapters, planned mixing, the noise timestep from the analytic σ̂",
               lambda image, truth, r=oracles["planned"].with_settings(noise_level="analytic"):
               r.restore(image, weights=oracle_weights(truth))),
        Method("uir_lora", f"**UIR-LoRA** as shipped ({shipped.policy}{threshold}, {shipped.composition} mixing)",
               lambda image, truth: restorer.restore(image)),
        *[Method(name, label, lambda image, truth, r=r: r.restore(image)) for name, (label, r) in variants.items()],
    ]
    methods += [baseline_method(folder, name, restorer.multiple, device) for name in folder.baseline_names()]
    return methods, restorer
