"""DDP on CPU (gloo): two processes train the same LoRA as one process does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from pipeline.models.backbone import build_scheduler, build_unet, save_backbone

pytestmark = pytest.mark.slow

STEPS = 8


def _train(tiny_project: Path, tmp_path: Path, name: str, **trainer) -> tuple[dict, dict, str]:
    params = OmegaConf.load(tiny_project / "params.yaml")
    params = OmegaConf.merge(params, {"trainer": trainer, "logger": {"mode": "offline", "dir": str(tmp_path / name)},
                                      "lora": {"train": {"max_steps": STEPS, "val_every": 4}}})
    OmegaConf.save(params, tmp_path / f"{name}.yaml")
    out = tmp_path / name
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.train_lora", "noise", "--params", str(tmp_path / f"{name}.yaml"),
         "--data", str(tiny_project / "data/degraded/noise"), "--backbone", str(tmp_path / "backbone"),
         "--out", str(out / "adapter"), "--metrics", str(out / "metrics.json"), "--checkpoints", str(out / "checkpoints")],
        cwd=tmp_path, env={**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return (load_file(out / "adapter/adapter_model.safetensors"), json.loads((out / "metrics.json").read_text()),
            result.stdout)


def test_ddp_on_two_cpu_processes_matches_one_process(tiny_project, tmp_path):
    """Each rank takes half of the same global batch and gradients are averaged, so two processes follow
    the single process up to float summation order: adapter weights within 1e-4, PSNR within 0.01 dB.
    Only rank 0 writes the adapter, the metrics and the one W&B run."""
    params = OmegaConf.load(tiny_project / "params.yaml")
    torch.manual_seed(0)
    save_backbone(tmp_path / "backbone", build_unet(params.backbone.architecture), build_scheduler(params.backbone.schedule))

    single, single_metrics, _ = _train(tiny_project, tmp_path, "single")
    ddp, ddp_metrics, stdout = _train(tiny_project, tmp_path, "ddp", strategy="ddp", devices=2)

    assert set(single) == set(ddp)
    worst = max(float((single[k] - ddp[k]).abs().max()) for k in single)
    assert worst < 1e-4, f"largest weight difference {worst:g}"
    assert abs(single_metrics["val/psnr"] - ddp_metrics["val/psnr"]) < 0.01
    assert ddp_metrics["step"] == single_metrics["step"]
    assert stdout.count("train_lora@noise: val PSNR") == 1, "only rank 0 reports and writes"
    assert len(list((tmp_path / "ddp/wandb").glob("offline-run-*"))) == 1, "one W&B run for the two processes"
