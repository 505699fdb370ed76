"""The restoration network as ONNX, run by ONNX Runtime: the fast CPU path of ``uir restore``.

For an adapter mix (one LoRA, or any weights over several) the adapters are merged into the backbone's
weights first (``W + Σ w_i·ΔW_i``, the same ``merged_weight`` as training and the PyTorch path), so the
exported graph is a plain UNet and a mix costs what one adapter costs. The graph maps a degraded tile
``y`` (B×3×H×W on [-1, 1], H and W multiples of the UNet's) and per-sample ``timestep`` (B, int64) to
the one-step read-out ``y − k_t·ε̂(sqrt(ᾱ_t)·y, t)``; batch, height and width are dynamic. What it
was made from (adapters, weights, ``t*``, timestep rules, input range) is in the model's metadata.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from diffusers import UNet2DModel
from peft.tuners.lora import LoraLayer

from pipeline.models.adapters import merged_weight
from pipeline.models.backbone import OneStepReadout
from pipeline.models.composition import AdapterComposition

ENGINES = ("torch", "onnxruntime")
INSTALL_HINT = "pip install -e '.[onnx]'"


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(f"the onnxruntime engine needs ONNX Runtime: {INSTALL_HINT}") from None
    return onnxruntime


class OneStepNetwork(torch.nn.Module):
    """A UNet and the one-step read-out as one module: ``(y, timestep) -> x0``."""

    def __init__(self, unet: UNet2DModel, readout: OneStepReadout):
        super().__init__()
        self.unet = unet
        self.readout = readout

    def forward(self, y: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.readout(self.unet, y, timestep)


def merged_unet(composition: AdapterComposition, mix: Mapping[str, float]) -> UNet2DModel:
    """A standalone copy of the backbone with the adapter ``mix`` merged into its weights."""
    vector = composition.weights_for(mix)
    base = composition.model.get_base_model()
    state = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            used = [i for i, adapter in enumerate(composition.names) if adapter in module.lora_A and vector[i] != 0]
            weight = module.get_base_layer().weight
            if used:
                weight = merged_weight(module, [composition.names[i] for i in used], vector[used])
            state[f"{name}.weight"] = weight.detach()
            if module.get_base_layer().bias is not None:
                state[f"{name}.bias"] = module.get_base_layer().bias.detach()
    plain = UNet2DModel.from_config(base.config)
    own = {k: v for k, v in base.state_dict().items() if "lora_" not in k and ".base_layer." not in k}
    own.update(state)
    plain.load_state_dict(own)
    return plain.requires_grad_(False).eval()


def export_onnx(composition: AdapterComposition, mix: Mapping[str, float], path: str | Path) -> Path:
    """Write ``path`` (ONNX, opset 17): the backbone with ``mix`` merged in, plus the read-out."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    network = OneStepNetwork(merged_unet(composition, mix), composition.readout).eval()
    multiple = 2 ** (len(network.unet.config.block_out_channels) - 1)
    example = (torch.zeros(1, 3, 4 * multiple, 4 * multiple), torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        torch.onnx.export(network, example, str(path), input_names=["image", "timestep"], output_names=["restored"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                                        "restored": {0: "batch", 2: "height", 3: "width"}},
                          opset_version=17, dynamo=False)
    model = onnx.load(str(path))
    used = {name: float(w) for name, w in mix.items() if w}
    metadata = {"adapters": json.dumps(list(used)), "weights": json.dumps(used),
                "t_star": json.dumps({n: int(composition.t_star[composition.names.index(n)]) for n in used}),
                "timestep_rules": json.dumps({n: composition.timestep_rules[composition.names.index(n)] for n in used}),
                "input_range": "[-1, 1]", "size_multiple": str(multiple),
                "maps": "degraded y, timestep t -> y - k_t * eps(sqrt(alpha_bar_t) * y, t)"}
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


class OnnxEngine:
    """ONNX Runtime sessions for the adapter mixes a restorer applies, exported on first use and cached.

    Graph optimisations on, as many intra-op threads as torch uses (the cores it was given).
    """

    def __init__(self, composition: AdapterComposition, folder: str | Path | None = None):
        self.runtime = require_onnxruntime()
        self.composition = composition
        self._temporary = tempfile.TemporaryDirectory(prefix="uir-onnx-") if folder is None else None
        self.folder = Path(folder or self._temporary.name)
        self._sessions: dict[tuple, object] = {}

    def session(self, mix: Mapping[str, float]):
        key = tuple(sorted((name, round(float(w), 6)) for name, w in mix.items() if w))
        if key not in self._sessions:
            file = self.folder / ("+".join(f"{n}={w:g}" for n, w in key) + ".onnx")
            if not file.is_file():
                export_onnx(self.composition, dict(key), file)
            options = self.runtime.SessionOptions()
            options.graph_optimization_level = self.runtime.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = torch.get_num_threads()
            self._sessions[key] = self.runtime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        return self._sessions[key]

    def restore(self, y: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """``AdapterComposition.restore`` for one mix (weights (N,)), by ONNX Runtime."""
        mix = {name: float(w) for name, w in zip(self.composition.names, vector) if w}
        timesteps = self.composition.timesteps(vector, y)
        inputs = {"image": np.ascontiguousarray(y.detach().cpu().numpy(), dtype=np.float32),
                  "timestep": timesteps.cpu().numpy().astype(np.int64)}
        return torch.from_numpy(self.session(mix).run(None, inputs)[0])
