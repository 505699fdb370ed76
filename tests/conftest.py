from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def params():
    """The committed params.yaml (default profile)."""
    return OmegaConf.load(ROOT / "params.yaml")


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photograph crop (shipped inside scikit-image), HxWx3 uint8."""
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut()[100:196, 150:246])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """A working folder with smoke-profile params (four embedded photos) and their prepared and
    synthesized noise/jpeg data: enough to run training stages in seconds."""
    from pipeline.config import compose_params
    from pipeline.stages import prepare, synthesize

    root = tmp_path_factory.mktemp("tiny")
    compose_params(root / "params.yaml", ROOT / "conf", ["profile=smoke", "logger.mode=disabled",
                                                         "prepare.embedded=[astronaut,coffee,chelsea,rocket]"])
    cwd = Path.cwd()
    os.chdir(root)
    try:
        prepare.main([])
        for name in ("noise", "jpeg"):
            synthesize.main([name, "--out", f"data/degraded/{name}"])
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A complete models folder (backbone, `noise` and `blur` LoRAs, router) with random weights:
    what `dvc repro` writes, in seconds."""
    import torch

    from pipeline.models.adapters import attach_lora, lora_config, save_adapter
    from pipeline.models.backbone import build_scheduler, build_unet, load_backbone, save_backbone
    from pipeline.models.router import DegradationRouter, RouterConfig

    root = tmp_path_factory.mktemp("models")
    params = OmegaConf.load(ROOT / "params.yaml")
    arch = {**params.backbone.architecture, "block_out_channels": [8, 16, 16], "norm_num_groups": 4,
            "down_block_types": ["DownBlock2D"] * 3, "up_block_types": ["UpBlock2D"] * 3}
    torch.manual_seed(0)
    save_backbone(root / "backbone", build_unet(arch), build_scheduler(params.backbone.schedule))
    for seed, (name, t_star) in enumerate([("noise", 200), ("blur", 120)]):
        unet, _ = load_backbone(root / "backbone")
        model = attach_lora(unet, lora_config({"rank": 2, "alpha": 2, "targets": ["conv1", "conv2"]}))
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.05)
        save_adapter(model, root / "loras" / name, name, t_star)
    torch.manual_seed(0)
    DegradationRouter(RouterConfig(names=["noise", "blur"], embed_dim=8, width=4)).save_pretrained(root / "router")
    return root
