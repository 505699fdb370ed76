"""The restoration network as ONNX, run by ONNX Runtime or OpenVINO: the fast CPU paths of ``uir restore``.

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
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from diffusers import UNet2DModel
from peft.tuners.lora import LoraLayer

from pipeline.models.adapters import merged_weight
from pipeline.models.backbone import OneStepReadout
from pipeline.models.composition import AdapterComposition
from pipeline.models.router import DegradationRouter
from pipeline.models.severity import estimate_noise_sigma

ENGINES = ("torch", "onnxruntime", "openvino")
# What each engine runs the network in: int8 is ONNX Runtime's static quantisation (QDQ, per-channel
# weights), bf16 OpenVINO's inference precision (needs a CPU with native bf16; it costs PSNR, see README).
PRECISIONS = {"torch": ("fp32",), "onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16")}
EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}


def require_runtime(engine: str):
    """The runtime module of ``engine`` (``onnxruntime`` or ``openvino``), or an error naming the extra."""
    try:
        return __import__(engine)
    except ImportError:
        raise ImportError(f"the {engine} engine needs its runtime: pip install -e '.[{EXTRAS[engine]}]'") from None


def native_bf16() -> bool:
    """OpenVINO is installed and this CPU runs bf16 natively (AVX512-BF16 or AMX)."""
    try:
        import openvino
    except ImportError:
        return False
    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def check_engine(engine: str, precision: str, device: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if precision not in PRECISIONS[engine]:
        raise ValueError(f"the {engine} engine runs {' or '.join(PRECISIONS[engine])}, not {precision!r}")
    if engine != "torch" and torch.device(device).type != "cpu":
        raise ValueError(f"the {engine} engine runs on the CPU: use --device cpu or --engine torch")


class OneStepNetwork(torch.nn.Module):
    """A UNet and the one-step read-out as one module: ``(y, timestep) -> x0``."""

    def __init__(self, unet: UNet2DModel, readout: OneStepReadout):
        super().__init__()
        self.unet = unet
        self.readout = readout

    def forward(self, y: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.readout(self.unet, y, timestep)


def merged_unet(composition: AdapterComposition, mix: Mapping[str, float]) -> UNet2DModel:
    """A standalone copy of the backbone with the adapter ``mix`` merged into its weights (an empty mix: the bare
    backbone, what an adapter at strength 0 leaves)."""
    vector = composition.weights_for(mix) if mix else torch.zeros(len(composition.names))
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


def export_router(router: DegradationRouter, path: str | Path) -> Path:
    """The router as ONNX: ``image`` (B×3×H×W on [-1, 1], any size) -> ``logits`` (s/τ; B×N over
    ``router.names``) and ``presence_logits`` (B×N), the "clean" output a last column of the one that the
    ``clean_output`` property names (none where ``clean_class`` is false); softmax, sigmoid and the policy are
    the caller's."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # GroupNorm's batch-size check, a constant
        torch.onnx.export(router.eval(), (torch.zeros(1, 3, 64, 64),), str(path), input_names=["image"],
                          output_names=["logits", "presence_logits"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"},
                                        "presence_logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {"degradations": json.dumps(router.names), "clean_class": json.dumps(router.config.clean),
                                        "clean_output": json.dumps(router.config.clean_output)})
    onnx.save(model, str(path))
    return path


def export_onnx(composition: AdapterComposition, mix: Mapping[str, float], path: str | Path) -> Path:
    """Write ``path`` (ONNX, opset 17): the backbone with ``mix`` merged in, plus the read-out."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    network = OneStepNetwork(merged_unet(composition, mix), composition.readout).eval()
    multiple = 2 ** (len(network.unet.config.block_out_channels) - 1)
    example = (torch.zeros(1, 3, 4 * multiple, 4 * multiple), torch.zeros(1, dtype=torch.long))
    with torch.no_grad(), warnings.catch_warnings():
        # diffusers' shape asserts and size checks: traced as constants, harmless (tests cover several sizes)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
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


def calibration_tiles(side: int = 256, sigmas: tuple[int, ...] = (0, 10, 25, 50)) -> list[np.ndarray]:
    """Int8 calibration inputs (3×side×side on [-1, 1]): crops of photos that ship with scikit-image, clean and
    with Gaussian noise of each σ (8-bit units); fixed, so a quantised model does not depend on what it restores."""
    import skimage.data

    rng = np.random.default_rng(0)
    tiles = []
    for photo in (skimage.data.astronaut(), skimage.data.coffee()):
        crop = photo[:side, :side, :3].astype(np.float32) / 127.5 - 1
        for sigma in sigmas:
            noisy = crop + rng.normal(0, 2 * sigma / 255, crop.shape).astype(np.float32)
            tiles.append(np.ascontiguousarray(np.clip(noisy, -1, 1).transpose(2, 0, 1)))
    return tiles


def quantize_int8(fp32: Path, out: Path, composition: AdapterComposition, mix: Mapping[str, float]) -> Path:
    """ONNX Runtime static int8 quantisation of ``fp32`` (QDQ, per-channel weights, uint8 activations),
    calibrated on ``calibration_tiles`` at the timesteps ``mix``'s rules give them (an empty mix, the bare backbone
    a ``noise_sigma`` adapter at strength 0 leaves: at the timestep of each tile's noise level)."""
    def timesteps(tile: torch.Tensor) -> torch.Tensor:
        if not mix:
            return composition.readout.timesteps_for_sigma(estimate_noise_sigma(tile))
        return composition.timesteps(composition.weights_for(mix), tile)

    calibration = [(tile[None], timesteps(torch.from_numpy(tile[None])).numpy()) for tile in calibration_tiles()]
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"image": image, "timestep": timestep} for image, timestep in calibration])

        def get_next(self):
            return next(self.items, None)

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process and per-bias notes, once per model
    try:
        quantize_static(str(fp32), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    finally:
        logging.getLogger().setLevel(quiet)
    return out


def _onnxruntime_runner(path: Path, threads: int) -> Callable[[dict], np.ndarray]:
    runtime = require_runtime("onnxruntime")
    options = runtime.SessionOptions()
    options.graph_optimization_level = runtime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    session = runtime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)[0]


def _openvino_runner(path: Path, precision: str, threads: int) -> Callable[[dict], np.ndarray]:
    openvino = require_runtime("openvino")
    hint = {"fp32": "f32", "bf16": "bf16"}[precision]
    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                "INFERENCE_PRECISION_HINT": hint,
                                                                "PERFORMANCE_HINT": "LATENCY"})
    granted = compiled.get_property("INFERENCE_PRECISION_HINT")
    if hint == "bf16" and granted != openvino.Type.bf16:
        raise ValueError(f"this CPU does not run bf16 natively (OpenVINO chose {granted}): use --precision fp32")
    request = compiled.create_infer_request()
    return lambda feeds: request.infer(feeds)[0].copy()


class OnnxEngine:
    """The restoration network exported to ONNX for each adapter mix a restorer applies (on first use, then
    cached) and run by ONNX Runtime or OpenVINO on the CPU, in ``precision``; as many threads as torch uses.

    ONNX Runtime runs with every graph optimisation; OpenVINO with its latency hint. int8 models are calibrated
    on ``calibration_tiles`` at the timesteps the mix's rules give them.
    """

    def __init__(self, composition: AdapterComposition, engine: str = "onnxruntime", precision: str = "fp32",
                 folder: str | Path | None = None):
        check_engine(engine, precision, "cpu")
        require_runtime(engine)
        self.composition, self.engine, self.precision = composition, engine, precision
        self._temporary = tempfile.TemporaryDirectory(prefix="uir-onnx-") if folder is None else None
        self.folder = Path(folder or self._temporary.name)
        self._runners: dict[tuple, Callable[[dict], np.ndarray]] = {}

    def runner(self, mix: Mapping[str, float]) -> Callable[[dict], np.ndarray]:
        key = tuple(sorted((name, round(float(w), 6)) for name, w in mix.items() if w))
        if key not in self._runners:
            file = self.folder / ("+".join(f"{n}={w:g}" for n, w in key) + ".onnx")
            if not file.is_file():
                export_onnx(self.composition, dict(key), file)
            if self.precision == "int8":
                file = quantize_int8(file, file.with_suffix(".int8.onnx"), self.composition, dict(key))
            threads = torch.get_num_threads()
            self._runners[key] = (_onnxruntime_runner(file, threads) if self.engine == "onnxruntime"
                                  else _openvino_runner(file, self.precision, threads))
        return self._runners[key]

    def restore(self, y: torch.Tensor, vector: torch.Tensor, noise_level: str = "analytic",
                strengths: Mapping[str, Sequence[Sequence[float]]] | None = None, min_correction: float = 0.0) -> torch.Tensor:
        """``AdapterComposition.restore`` for one mix (weights (N,)), by the runtime: with ``strengths``, the
        samples of each distinct strengthened mix together, by that mix's network."""
        sigmas = self.composition.noise_sigmas(y, noise_level, strengths or {}, min_correction)
        timesteps = self.composition.timesteps(vector, y, noise_level, sigmas, min_correction).cpu().numpy().astype(np.int64)
        rows = vector[None].expand(len(y), -1)
        if strengths:
            rows = rows * self.composition.strength(y, noise_level, strengths, sigmas).cpu()
        image = np.ascontiguousarray(y.detach().cpu().numpy(), dtype=np.float32)
        restored = np.empty_like(image)
        for row in torch.unique(rows, dim=0):
            where = (rows == row).all(dim=1).numpy()
            mix = {name: float(w) for name, w in zip(self.composition.names, row) if w}
            restored[where] = self.runner(mix)({"image": image[where], "timestep": timesteps[where]})
        return torch.from_numpy(restored)
