"""``python -m benchmarks.backbones``: backbone sizes on one training budget, judged as a denoiser.

Each architecture of ``SIZES`` is DDPM-trained from scratch for the same wall-clock budget (its step count
from its own measured step time, so the cosine schedule ends on time) on a prepared clean folder — by
default the embedded photos plus ``../shared/data/trainsets/CBSD432``, prepared by the ``prepare`` stage
exactly as a user's folder is. Each EMA model is then judged as the restoration method relies on it: the
bare backbone's one-step denoising at the oracle timestep t(σ) (where √(1−ᾱ)/√ᾱ equals σ in the model's
units) on every CBSD68 image at σ 15/25/50 (fixed seed per image, RGB PSNR), beside its PyTorch inference
ms/MP on this machine: the Pareto front the shipped backbone is chosen on. The trained backbone of
``models/`` (if any) is measured the same way, as it is.

Writes ``reports/backbones.json`` and ``.md`` and each trained backbone under ``--keep`` (``save_pretrained``).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import table, write_report
from benchmarks.speed import best_time
from benchmarks.testsets import DEFAULT_ROOT, gaussian_noise
from pipeline.config import load_params

CBSD432 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "trainsets" / "CBSD432"
SIGMAS = (15, 25, 50)
# name -> UNet2DModel architecture (the fields of params.backbone.architecture that change)
SIZES = {
    "S 8-16-32": {"block_out_channels": [8, 16, 32], "norm_num_groups": 4},
    "M 16-32-64 (default)": {"block_out_channels": [16, 32, 64], "norm_num_groups": 8},
    "M4 16-32-64-128": {"block_out_channels": [16, 32, 64, 128], "norm_num_groups": 8},
    "L 32-64-128": {"block_out_channels": [32, 64, 128], "norm_num_groups": 8},
}


def prepare_clean(params_file: Path, folders: list[Path], out: Path) -> Path:
    """The ``prepare`` stage with ``prepare.folders`` set to ``folders``, into ``out``."""
    import yaml

    from pipeline.stages import prepare

    params = yaml.safe_load(params_file.read_text())
    params["prepare"]["folders"] = [str(f) for f in folders]
    out.parent.mkdir(parents=True, exist_ok=True)
    changed = out.parent / f"{out.name}.params.yaml"
    changed.write_text(yaml.safe_dump(params))
    prepare.main(["--params", str(changed), "--out", str(out)])
    return out


def architecture(params, changes: dict) -> dict:
    from omegaconf import OmegaConf

    base = OmegaConf.to_container(params.backbone.architecture, resolve=True)
    levels = len(changes["block_out_channels"])
    base.update(changes, down_block_types=["DownBlock2D"] * levels, up_block_types=["UpBlock2D"] * levels)
    return base


def train_for(params, arch: dict, clean: Path, budget_s: float, seed: int):
    """An EMA UNet DDPM-trained for ``budget_s`` seconds with the backbone recipe of ``params``."""
    import lightning as L
    from omegaconf import OmegaConf

    from pipeline.data.datasets import CleanPatchDataModule
    from pipeline.models.backbone import build_scheduler, build_unet
    from pipeline.training.backbone import BackboneDDPM, ddpm_loss

    train = params.backbone.train
    torch.manual_seed(seed)
    unet, scheduler = build_unet(OmegaConf.create(arch)), build_scheduler(params.backbone.schedule)
    probe = copy.deepcopy(unet)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=train.lr)
    batch = torch.rand(train.batch_size, 3, train.patch_size, train.patch_size) * 2 - 1

    @torch.enable_grad()
    def step():
        ddpm_loss(probe, scheduler, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = max(1, int(0.9 * budget_s / best_time(step, repeats=5)))  # 10 % for data loading and the EMA
    module = BackboneDDPM(unet, scheduler, lr=train.lr, weight_decay=train.weight_decay, ema_decay=train.ema_decay,
                          warmup_steps=min(train.warmup_steps, steps // 10), max_steps=steps,
                          val_sigmas=list(train.val_sigmas))
    data = CleanPatchDataModule(clean, train.patch_size, train.batch_size, train.steps_per_epoch, 1, seed)
    trainer = L.Trainer(max_steps=steps, max_time={"seconds": int(budget_s * 1.2)}, logger=False,
                        enable_checkpointing=False, limit_val_batches=0, enable_model_summary=False,
                        enable_progress_bar=True, accelerator="cpu")
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return module.ema_unet.eval().requires_grad_(False), scheduler, int(trainer.global_step), time.perf_counter() - started


@torch.no_grad()
def judge(unet, scheduler, images: list[np.ndarray]) -> dict:
    """One-step denoising PSNR at the oracle t(σ) on ``images`` for each σ, and inference ms/MP (4 tiles of 256²)."""
    from pipeline.models.backbone import OneStepReadout, downsample_factor
    from pipeline.models.restorer import restore_tiled

    readout = OneStepReadout(scheduler)
    multiple = downsample_factor(unet)
    result = {"parameters": sum(p.numel() for p in unet.parameters())}
    for sigma in SIGMAS:
        t = readout.timestep_for_sigma(2 * sigma / 255)
        scores = []
        for index, clean in enumerate(images):
            noisy = torch.from_numpy(gaussian_noise(clean, sigma, index)).permute(2, 0, 1).float() / 255
            restored = restore_tiled(lambda y: readout(unet, y, torch.full((y.shape[0],), t)), noisy, multiple, tile=512)
            error = np.mean(((restored * 255).round().permute(1, 2, 0).numpy() - clean) ** 2)
            scores.append(10 * np.log10(255.0**2 / error))
        result[f"psnr_sigma{sigma}"] = float(np.mean(scores))
    y = torch.rand(4, 3, 256, 256) * 2 - 1
    t = torch.full((4,), 100)
    result["ms_per_megapixel"] = 1000 * best_time(lambda: readout(unet, y, t), repeats=3) / (4 * 256 * 256 / 1e6)
    return result


def markdown(result: dict) -> str:
    rows = [[row["name"], f"{row['parameters'] / 1e6:.2f} M", str(row.get("steps", "—")), f"{row['psnr_sigma15']:.2f}",
             f"{row['psnr_sigma25']:.2f}", f"{row['psnr_sigma50']:.2f}", f"{row['ms_per_megapixel']:.0f}"]
            for row in result["rows"]]
    return (f"Budget {result['budget_minutes']:g} min of training per size on this machine "
            f"({result['threads']} threads), data: {result['data']}; judged on all {result['images']} CBSD68 images "
            "(bare backbone, one step at the oracle t(σ), RGB PSNR dB); ms/MP: PyTorch eager, 4 tiles of 256².\n\n"
            + table(["backbone", "parameters", "steps", "σ=15", "σ=25", "σ=50", "ms / MP"], rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--budget-minutes", type=float, default=6.0, help="training wall-clock per size")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--trainset", type=Path, default=CBSD432, help="a folder of training photos (never a test set)")
    parser.add_argument("--testsets", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--work", type=Path, default=Path("checkpoints/backbones"), help="prepared data")
    parser.add_argument("--keep", type=Path, default=Path("checkpoints/backbones/models"))
    parser.add_argument("--out", type=Path, default=Path("reports/backbones"))
    args = parser.parse_args(argv)
    from pipeline.images import read_image
    from pipeline.models.backbone import load_backbone, save_backbone

    cbsd68 = args.testsets / "CBSD68"
    if not cbsd68.is_dir():
        raise SystemExit(f"benchmarks.backbones: {cbsd68} is absent: nothing to judge the backbones on")
    images = [read_image(f)[..., :3] for f in sorted(cbsd68.glob("*.png"))]
    params = load_params(args.params)
    folders = [args.trainset] if args.trainset.is_dir() else []
    clean = prepare_clean(args.params, folders, args.work / "clean")
    rows = []
    if Path("models/backbone").is_dir():
        unet, scheduler = load_backbone("models/backbone")
        rows.append({"name": "models/backbone of the last dvc repro", **judge(unet, scheduler, images)})
    for name in args.sizes:
        arch = architecture(params, SIZES[name])
        unet, scheduler, steps, seconds = train_for(params, arch, clean, 60 * args.budget_minutes, params.seed)
        save_backbone(args.keep / name.split()[0], unet, scheduler)
        rows.append({"name": name, "architecture": arch, "steps": steps, "train_seconds": seconds,
                     **judge(unet, scheduler, images)})
        print(rows[-1])
    result = {"budget_minutes": args.budget_minutes, "threads": torch.get_num_threads(), "images": len(images),
              "data": "embedded photos" + (f" + {args.trainset.name}" if folders else ""), "rows": rows}
    text = markdown(result)
    write_report(args.out, result, text)
    print(text)


if __name__ == "__main__":
    main()
