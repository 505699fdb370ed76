"""Speed and memory: training throughput per stage, inference milliseconds per megapixel for K = 1
(merged / PEFT / composed), K = 2 and K = N, achieved GFLOP/s against this machine's fp32 matmul rate,
peak memory of a restore, and what the merged-weight LoRA paths bought (before/after in one run)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig
from peft import PeftModel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import adapter_settings, adapter_training, shared_adapter_settings, total_adapter_steps
from pipeline.models.adapters import attach_lora, lora_config, merged_lora_forward
from pipeline.models.backbone import OneStepReadout, load_backbone
from pipeline.models.composition import AdapterComposition
from pipeline.models.router import DegradationRouter, RouterConfig
from pipeline.training.backbone import ddpm_loss
from pipeline.training.restoration import charbonnier
from pipeline.training.router import router_loss


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """The fastest of ``repeats`` runs, in seconds (the least disturbed by other load on the machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / best_time(lambda: a @ b, repeats) / 1e9


def _restoration_step(network: torch.nn.Module, readout: OneStepReadout, batch: int, patch: int, t_star: int):
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-4)
    lq, gt = torch.rand(batch, 3, patch, patch) * 2 - 1, torch.rand(batch, 3, patch, patch) * 2 - 1
    t = torch.full((batch,), t_star)

    def step():
        loss = charbonnier(readout(network, lq, t), gt).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def training_throughput(params: DictConfig, models: Path, repeats: int) -> list[dict]:
    """Patches per second of each training stage's optimisation step at its own batch and patch size."""
    torch.manual_seed(0)
    rows = []
    patch = params.synthesis.patch_size
    names = list(params.degradations)

    def add(stage: str, variant: str, step: Callable[[], None], batch: int, steps: int):
        seconds = best_time(step, repeats)
        rows.append({"stage": stage, "variant": variant, "batch": batch, "seconds_per_step": seconds,
                     "patches_per_second": batch / seconds, "steps": steps, "stage_training_seconds": steps * seconds})

    unet, scheduler = load_backbone(models / "backbone")
    unet.requires_grad_(True).train()
    readout = OneStepReadout(scheduler)
    train = params.backbone.train
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    clean = torch.rand(train.batch_size, 3, train.patch_size, train.patch_size) * 2 - 1

    def ddpm_step():
        ddpm_loss(unet, scheduler, clean).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    add("pretrain_backbone", "DDPM", ddpm_step, train.batch_size, train.max_steps)

    seen = set()
    for name in names:
        settings = adapter_settings(params, name)
        key = (settings["rank"], tuple(settings["targets"]))
        training = adapter_training(params, name)
        unet, _ = load_backbone(models / "backbone")
        network = attach_lora(unet, lora_config(settings))
        label = f"rank {settings['rank']} on {'/'.join(settings['targets'])}"
        step = _restoration_step(network, readout, training.batch_size, patch, settings["t_star"])
        with merged_lora_forward(network):
            add(f"train_lora@{name}", f"{label}, merged weights", step, training.batch_size, training.max_steps)
        if key not in seen:  # the PEFT forward, once per adapter shape: the "before"
            add(f"train_lora@{name}", f"{label}, PEFT forward (before)", step, training.batch_size, training.max_steps)
            seen.add(key)

    total = total_adapter_steps(params)
    shared = shared_adapter_settings(params)
    unet, _ = load_backbone(models / "backbone")
    network = attach_lora(unet, lora_config(shared))
    step = _restoration_step(network, readout, params.baselines.shared_lora.train.batch_size, patch, params.baselines.shared_lora.t_star)
    with merged_lora_forward(network):
        add("train_shared_lora", f"rank {shared['rank']}, merged weights", step, params.baselines.shared_lora.train.batch_size, total)
    add("train_shared_lora", f"rank {shared['rank']}, PEFT forward (before)", step, params.baselines.shared_lora.train.batch_size,
        total)

    unet, _ = load_backbone(models / "backbone")
    unet.requires_grad_(True)
    add("train_multitask", "full fine-tune", _restoration_step(unet, readout, params.baselines.multitask.train.batch_size, patch,
                                                               params.baselines.multitask.t_star),
        params.baselines.multitask.train.batch_size, total)

    cfg = params.router
    router = DegradationRouter(RouterConfig(names=names, embed_dim=cfg.embed_dim, width=cfg.width))
    optimizer_r = torch.optim.AdamW(router.parameters(), lr=1e-4)
    images = torch.rand(cfg.train.batch_size, 3, patch, patch) * 2 - 1
    target = torch.softmax(torch.randn(cfg.train.batch_size, len(names)), -1)

    def router_step():
        router_loss(router, images, target).backward()
        optimizer_r.step()
        optimizer_r.zero_grad(set_to_none=True)

    add("fit_router", "encoder", router_step, cfg.train.batch_size, cfg.train.max_steps)
    return rows


def inference_speed(params: DictConfig, models: Path, repeats: int, tile: int = 256, batch: int = 4) -> dict:
    """Milliseconds per megapixel of the UNet pass over a batch of ``tile``² tiles, per way of applying
    adapters, with achieved GFLOP/s (FLOPs of the bare backbone, the work every variant must do)."""
    names = list(params.degradations)
    composition = AdapterComposition.from_pretrained(models / "backbone", {n: models / "loras" / n for n in names})
    y = torch.rand(batch, 3, tile, tile) * 2 - 1
    t = torch.full((batch,), 120)
    megapixels = batch * tile * tile / 1e6
    n = len(names)
    one_hot = torch.nn.functional.one_hot(torch.tensor(0), n).float()
    two = torch.zeros(n)
    two[:2] = 0.5
    every = torch.full((n,), 1.0 / n)
    per_sample_two = torch.stack([torch.roll(two, i) for i in range(batch)])

    bare, _ = load_backbone(models / "backbone")
    merged, _ = load_backbone(models / "backbone")
    merged = PeftModel.from_pretrained(merged, str(models / "loras" / names[0])).merge_and_unload().eval()
    peft_one, _ = load_backbone(models / "backbone")
    peft_one = PeftModel.from_pretrained(peft_one, str(models / "loras" / names[0])).eval()
    peft_two, _ = load_backbone(models / "backbone")
    peft_two = PeftModel.from_pretrained(peft_two, str(models / "loras" / names[0]), adapter_name=names[0]).eval()
    peft_two.load_adapter(str(models / "loras" / names[1]), adapter_name=names[1])
    peft_two.base_model.set_adapter(names[:2])
    for module in peft_two.modules():
        if hasattr(module, "set_scale"):
            for name in names[:2]:
                if name in getattr(module, "lora_A", {}):
                    module.set_scale(name, 0.5)

    variants = {
        "bare backbone (no adapter)": lambda: bare(y, t),
        "K=1 merged into the weights": lambda: merged(y, t),
        "K=1 PEFT forward, unmerged (before)": lambda: peft_one(y, t),
        "K=1 composed weights": lambda: composition.epsilon(y, t, one_hot),
        "K=2 PEFT forward, two active adapters (before)": lambda: peft_two(y, t),
        "K=2 composed weights": lambda: composition.epsilon(y, t, two),
        "K=2 per-sample weights (grouped conv)": lambda: composition.epsilon(y, t, per_sample_two),
        f"K=N={n} composed weights": lambda: composition.epsilon(y, t, every),
    }
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        bare(y, t)
    flops = counter.get_total_flops()
    matmul = matmul_gflops()
    rows = []
    with torch.no_grad():
        for label, fn in variants.items():
            seconds = best_time(fn, repeats)
            rows.append({"variant": label, "ms_per_megapixel": 1000 * seconds / megapixels,
                         "gflops_per_second": flops / seconds / 1e9,
                         "fraction_of_matmul": flops / seconds / 1e9 / matmul})
    return {"tile": tile, "batch": batch, "gflop_per_megapixel": flops / 1e9 / megapixels,
            "matmul_gflops": matmul, "threads": torch.get_num_threads(), "variants": rows}


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _restore_peak(models: str, side: int, queue) -> None:
    from pipeline.models.restorer import UniversalRestorer

    restorer = UniversalRestorer.from_pretrained(models)
    image = (np.random.default_rng(0).random((side, side, 3)) * 255).astype(np.uint8)
    loaded = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    start = time.perf_counter()
    restorer.restore(image)
    seconds = time.perf_counter() - start
    queue.put({"side": side, "megapixels": side * side / 1e6, "seconds": seconds,
               "ms_per_megapixel": 1000 * seconds / (side * side / 1e6),
               "rss_loaded_mb": loaded, "peak_rss_mb": _status_mb("VmHWM")})


def restore_end_to_end(models: Path, sides=(1024, 2048)) -> list[dict]:
    """``UniversalRestorer.restore`` (router, K=2 composition, 256² tiles) on one image per size, each in a
    fresh process so that its peak resident memory is its own."""
    context = multiprocessing.get_context("spawn")
    rows = []
    for side in sides:
        queue = context.Queue()
        process = context.Process(target=_restore_peak, args=(str(models), side, queue))
        process.start()
        rows.append(queue.get())
        process.join()
    return rows


def storage(models: Path) -> list[dict]:
    from safetensors import safe_open

    rows = []
    folders = [("backbone", models / "backbone"), ("multi-task model", models / "baselines" / "multitask"),
               ("shared LoRA", models / "baselines" / "shared_lora"), ("router", models / "router")]
    folders += [(f"LoRA {p.name}", p) for p in sorted((models / "loras").iterdir())]
    for label, folder in folders:
        if not folder.is_dir():
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        parameters = 0
        for weights in folder.glob("*.safetensors"):
            with safe_open(str(weights), "pt") as f:
                parameters += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
        rows.append({"model": label, "megabytes": size / 1e6, "parameters": parameters})
    return rows


def growth(params: DictConfig, training: list[dict]) -> dict:
    """What adding a degradation costs in training time, from this run's measured step times: one new
    LoRA (the mean LoRA) plus refitting the router, against retraining the multi-task baseline and
    against every training stage of a full ``dvc repro``."""
    merged = [r for r in training if "(before)" not in r["variant"]]
    by_stage = {r["stage"]: r for r in merged}
    loras = [r["stage_training_seconds"] for r in merged if r["stage"].startswith("train_lora@")]
    new = float(np.mean(loras)) + by_stage["fit_router"]["stage_training_seconds"]
    multitask = by_stage["train_multitask"]["stage_training_seconds"]
    everything = sum(r["stage_training_seconds"] for r in merged)
    return {"new_degradation_seconds": new, "multitask_retrain_seconds": multitask,
            "all_training_seconds": everything, "new_over_multitask": new / multitask,
            "new_over_all_training": new / everything}




def _int8_model(fp32: Path, out: Path, calibration: list[np.ndarray], timestep: int) -> Path:
    """ONNX Runtime static int8 quantisation (QDQ, per-channel weights), calibrated on degraded tiles."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Tiles(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"image": tile[None], "timestep": np.array([timestep])} for tile in calibration])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(fp32), str(out), Tiles(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return out


def engine_speed(params: DictConfig, models: Path, repeats: int, testsets: Path | None = None,
                 tile: int = 256, batch: int = 4) -> dict:
    """Milliseconds per megapixel of one restoration step over a batch of ``tile``² tiles: PyTorch eager
    against ONNX Runtime (graph optimisations on, threads = torch's), fp32 and static int8, for one adapter
    (K=1) and a two-adapter weight-space mix (K=2, merged before export: the same graph). With Kodak24
    present, the PSNR int8 costs on it at σ=25 (noise adapter)."""
    import tempfile

    import onnxruntime

    from pipeline.models.export import export_onnx

    names = [n for n in params.degradations if (models / "loras" / n).is_dir()]
    composition = AdapterComposition.from_pretrained(models / "backbone", {n: models / "loras" / n for n in names})
    y = torch.rand(batch, 3, tile, tile) * 2 - 1
    t = torch.full((batch,), 120)
    megapixels = batch * tile * tile / 1e6
    mixes = {"K=1": {names[0]: 1.0}, "K=2": {names[0]: 0.5, names[1]: 0.5}}
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        composition.restore(y, composition.weights_for(mixes["K=1"]))
    flops = counter.get_total_flops()
    matmul = matmul_gflops()
    rows, quality = [], {}
    rng = np.random.default_rng(0)
    calibration = [np.clip(rng.random((3, tile, tile), dtype=np.float32) * 2 - 1, -1, 1) for _ in range(8)]
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for k, mix in mixes.items():
            vector = composition.weights_for(mix)
            fp32 = export_onnx(composition, mix, Path(tmp) / f"{k}.onnx")
            int8 = _int8_model(fp32, Path(tmp) / f"{k}-int8.onnx", calibration, 120)
            feeds = {"image": y.numpy(), "timestep": t.numpy()}
            sessions = {f"ONNX Runtime fp32": onnxruntime.InferenceSession(str(fp32), options, providers=["CPUExecutionProvider"]),
                        f"ONNX Runtime int8 (static, QDQ)": onnxruntime.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])}
            variants = {"PyTorch eager": lambda: composition.restore(y, vector),
                        **{label: (lambda s=s: s.run(None, feeds)) for label, s in sessions.items()}}
            for label, fn in variants.items():
                seconds = best_time(fn, repeats)
                rows.append({"engine": label, "adapters": k, "ms_per_megapixel": 1000 * seconds / megapixels,
                             "fraction_of_matmul": flops / seconds / 1e9 / matmul})
            if k == "K=1" and testsets is not None and (testsets / "Kodak24").is_dir():
                quality = _int8_quality(composition, sessions, testsets / "Kodak24")
    return {"tile": tile, "batch": batch, "threads": torch.get_num_threads(), "matmul_gflops": matmul,
            "adapter": names[0], "rows": rows, "int8_quality": quality}


def _int8_quality(composition: AdapterComposition, sessions: dict, folder: Path) -> dict:
    """Mean PSNR on Kodak24 with σ=25 noise (fixed seed per image) of each ONNX session (noise adapter's graph)."""
    from benchmarks.testsets import gaussian_noise
    from pipeline.images import read_image
    from pipeline.models.restorer import restore_tiled

    if composition.names[0] != "noise":
        return {}
    multiple = 2 ** (len(composition.model.get_base_model().config.block_out_channels) - 1)
    scores = {label: [] for label in sessions}
    for index, file in enumerate(sorted(folder.glob("*.png"))):
        clean = read_image(file)[..., :3]
        noisy = gaussian_noise(clean, 25, index)
        x = torch.from_numpy(noisy).permute(2, 0, 1).float() / 255
        for label, session in sessions.items():
            def network(tiles, s=session):
                timesteps = composition.timesteps(composition.weights_for({"noise": 1.0}), tiles)
                return torch.from_numpy(s.run(None, {"image": tiles.numpy(), "timestep": timesteps.numpy()})[0])

            restored = (restore_tiled(network, x, multiple) * 255).round().permute(1, 2, 0).numpy()
            scores[label].append(10 * np.log10(255.0**2 / np.mean((restored - clean) ** 2)))
    return {label: float(np.mean(v)) for label, v in scores.items()}


def _restore_engine_peak(models: str, height: int, width: int, engine: str, queue) -> None:
    from pipeline.models.restorer import UniversalRestorer

    restorer = UniversalRestorer.from_pretrained(models, engine=engine)
    image = (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)
    restorer.restore(image[:256, :256], weights={restorer.names[0]: 1.0})  # ONNX export and session set-up
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    restorer.restore(image, weights={restorer.names[0]: 1.0})
    seconds = time.perf_counter() - start
    queue.put({"engine": engine, "megapixels": height * width / 1e6, "seconds": seconds,
               "ms_per_megapixel": 1000 * seconds / (height * width / 1e6), "peak_rss_mb": _status_mb("VmHWM")})


def restore_by_engine(models: Path, size: tuple[int, int] = (3000, 4000)) -> list[dict]:
    """A 12 MP photo through ``UniversalRestorer.restore`` (one adapter, 256² tiles) with each engine, each in
    a fresh process (its own peak memory); the one-off ONNX export is done before the clock starts."""
    context = multiprocessing.get_context("spawn")
    rows = []
    for engine in ("torch", "onnxruntime"):
        queue = context.Queue()
        process = context.Process(target=_restore_engine_peak, args=(str(models), *size, engine, queue))
        process.start()
        rows.append(queue.get())
        process.join()
    return rows
