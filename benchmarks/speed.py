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




ENGINE_VARIANTS = (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"),
                   ("openvino", "bf16"))
ENGINE_LABELS = {"torch": "PyTorch eager", "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}


def _engines(composition: AdapterComposition) -> dict[str, Callable]:
    """``restore(y, vector)`` of every engine and precision that runs on this machine, by label."""
    from pipeline.models.export import OnnxEngine

    engines = {"PyTorch eager fp32": composition.restore}
    for engine, precision in ENGINE_VARIANTS[1:]:
        label = f"{ENGINE_LABELS[engine]} {precision}"
        try:
            runner = OnnxEngine(composition, engine, precision)
            runner.restore(torch.zeros(1, 3, 32, 32), composition.weights_for({composition.names[0]: 1.0}))
        except (ImportError, ValueError) as error:
            print(f"benchmarks: {label} skipped: {error}")
            continue
        engines[label] = runner.restore
    return engines


def engine_speed(params: DictConfig, models: Path, repeats: int, testsets: Path | None = None,
                 degraded: Path = Path("data/degraded"), tile: int = 256, batch: int = 4) -> dict:
    """Milliseconds per megapixel of one restoration step over a batch of ``tile``² tiles for every engine
    and precision that runs here (PyTorch eager; ONNX Runtime fp32 / int8; OpenVINO fp32 / bf16), for one
    adapter (K=1) and a two-adapter weight-space mix (K=2, merged before export: the same graph); where ONNX
    Runtime spends its time, by operator type; and what each engine's precision costs in PSNR: Kodak24 at
    σ=25 (noise adapter) when present, and each adapter's own test crops (``<degraded>/<d>/test``)."""
    names = [n for n in params.degradations if (models / "loras" / n).is_dir()]
    composition = AdapterComposition.from_pretrained(models / "backbone", {n: models / "loras" / n for n in names})
    y = torch.rand(batch, 3, tile, tile) * 2 - 1
    megapixels = batch * tile * tile / 1e6
    mixes = {"K=1": {names[0]: 1.0}, "K=2": {names[0]: 0.5, names[1]: 0.5}}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        composition.restore(y, composition.weights_for(mixes["K=1"]))
    flops = counter.get_total_flops()
    matmul = matmul_gflops()
    engines = _engines(composition)
    rows = []
    with torch.no_grad():
        for k, mix in mixes.items():
            vector = composition.weights_for(mix)
            for label, restore in engines.items():
                seconds = best_time(lambda: restore(y, vector), repeats)
                rows.append({"engine": label, "adapters": k, "ms_per_megapixel": 1000 * seconds / megapixels,
                             "fraction_of_matmul": flops / seconds / 1e9 / matmul})
        quality = _engine_quality(composition, engines, testsets, degraded)
    return {"tile": tile, "batch": batch, "threads": torch.get_num_threads(), "matmul_gflops": matmul,
            "gflop_per_megapixel": flops / megapixels / 1e9, "adapter": names[0], "rows": rows,
            "operators": _operator_profile(composition, mixes["K=1"], y), "quality": quality}


def _operator_profile(composition: AdapterComposition, mix: dict, y: torch.Tensor, top: int = 6) -> dict:
    """ONNX Runtime's own profile of one batch, fp32 and int8: the share of node time by operator type."""
    import json
    import tempfile

    import onnxruntime

    from pipeline.models.export import export_onnx, quantize_int8

    vector = composition.weights_for(mix)
    shares = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(composition, mix, Path(tmp) / "fp32.onnx")
        int8 = quantize_int8(fp32, Path(tmp) / "int8.onnx", composition, mix)
        feeds = {"image": y.numpy(), "timestep": composition.timesteps(vector, y).numpy()}
        for label, model in (("fp32", fp32), ("int8", int8)):
            options = onnxruntime.SessionOptions()
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = torch.get_num_threads()
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / label)
            session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
            for _ in range(3):
                session.run(None, feeds)
            events = json.loads(Path(session.end_profiling()).read_text())
            by_op: dict[str, float] = {}
            for event in events:
                if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                    op = event["args"]["op_name"]
                    by_op[op] = by_op.get(op, 0.0) + event["dur"]
            total = sum(by_op.values())
            ranked = sorted(by_op.items(), key=lambda item: -item[1])
            shares[label] = {op: value / total for op, value in ranked[:top]}
            shares[label]["other"] = 1 - sum(shares[label].values())
    return shares


def _psnr(restored: torch.Tensor, clean: torch.Tensor) -> float:
    """PSNR in dB of 3×H×W images on [0, 1], after 8-bit rounding (as a saved file would be)."""
    error = ((restored * 255).round() - (clean * 255).round()).pow(2).mean().item()
    return 10 * np.log10(255.0**2 / error)


def _engine_quality(composition: AdapterComposition, engines: dict, testsets: Path | None, degraded: Path) -> dict:
    """Mean PSNR of each engine: Kodak24 with σ=25 noise (fixed seed per image, noise adapter), and each
    adapter's test crops."""
    from benchmarks.testsets import gaussian_noise
    from pipeline.images import read_image
    from pipeline.models.restorer import restore_tiled

    multiple = 2 ** (len(composition.model.get_base_model().config.block_out_channels) - 1)
    sets: dict[str, list[tuple[torch.Tensor, torch.Tensor, str]]] = {}
    kodak = testsets / "Kodak24" if testsets is not None else None
    if kodak is not None and kodak.is_dir() and "noise" in composition.names:
        for index, file in enumerate(sorted(kodak.glob("*.png"))):
            clean = read_image(file)[..., :3]
            pair = [torch.tensor(a).permute(2, 0, 1).float() / 255 for a in (gaussian_noise(clean, 25, index), clean)]
            sets.setdefault("Kodak24 σ=25", []).append((*pair, "noise"))
    for name in composition.names:
        for lq in sorted((degraded / name / "test" / "lq").glob("*.png")):
            # torch.tensor copies: the decoded array is read-only
            pair = [torch.tensor(read_image(f)[..., :3]).permute(2, 0, 1).float() / 255
                    for f in (lq, lq.parent.parent / "gt" / lq.name)]
            sets.setdefault(f"{name} test", []).append((*pair, name))
    scores = {}
    for set_name, items in sets.items():
        for label, restore in engines.items():
            values = [_psnr(restore_tiled(lambda t, v=composition.weights_for({adapter: 1.0}): restore(t, v), lq, multiple),
                            gt) for lq, gt, adapter in items]
            scores.setdefault(set_name, {})[label] = float(np.mean(values))
    return scores


def _restore_engine_peak(models: str, height: int, width: int, engine: str, precision: str, queue) -> None:
    from pipeline.models.restorer import UniversalRestorer

    restorer = UniversalRestorer.from_pretrained(models, engine=engine, precision=precision)
    image = (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)
    restorer.restore(image[:256, :256], weights={restorer.names[0]: 1.0})  # ONNX export and session set-up
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    restorer.restore(image, weights={restorer.names[0]: 1.0})
    seconds = time.perf_counter() - start
    queue.put({"engine": f"{ENGINE_LABELS[engine]} {precision}", "megapixels": height * width / 1e6,
               "seconds": seconds, "ms_per_megapixel": 1000 * seconds / (height * width / 1e6),
               "peak_rss_mb": _status_mb("VmHWM")})


def restore_by_engine(models: Path, labels: list[str], size: tuple[int, int] = (3000, 4000)) -> list[dict]:
    """A 12 MP photo through ``UniversalRestorer.restore`` (one adapter, 256² tiles) with each engine of
    ``labels`` (those ``engine_speed`` could run), each in a fresh process (its own peak memory); the one-off
    ONNX export is done before the clock starts."""
    context = multiprocessing.get_context("spawn")
    rows = []
    for engine, precision in ENGINE_VARIANTS:
        if f"{ENGINE_LABELS[engine]} {precision}" not in labels:
            continue
        queue = context.Queue()
        process = context.Process(target=_restore_engine_peak, args=(str(models), *size, engine, precision, queue))
        process.start()
        rows.append(queue.get())
        process.join()
    return rows
