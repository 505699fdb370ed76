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
