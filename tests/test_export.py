"""ONNX export and the ONNX Runtime engine: the same restoration as PyTorch, within 1e-3."""

import json
import sys

import numpy as np
import pytest
import torch

from pipeline.models.restorer import RestorationSettings, UniversalRestorer

from .images import rgb

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def restorers(tiny_models):
    torch_engine = UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8)
    return torch_engine, UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8, engine="onnxruntime")


def _photo(h: int, w: int) -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(skimage.data.chelsea()[:h, :w])


@pytest.mark.parametrize("image", ["random 40x56", "odd 37x53", "tiled 70x90", "photo 64x96", "photo odd 45x67"])
@pytest.mark.parametrize("mix,composition", [({"noise": 1.0}, "weights"), ({"noise": 0.6, "blur": 0.4}, "weights"),
                                             ({"noise": 0.6, "blur": 0.4}, "sequential")])
def test_onnxruntime_restores_as_pytorch_does(restorers, image, mix, composition):
    kind, size = image.rsplit(" ", 1)
    h, w = map(int, size.split("x"))
    array = _photo(h, w) if kind.startswith("photo") else rgb(h, w, seed=h)
    x = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    outputs = []
    for restorer in restorers:
        restorer = restorer.with_settings(composition=composition)
        outputs.append(restorer.restore_tensor(x, restorer.steps(mix)))
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-3


def test_routing_with_the_onnx_engine_restores_as_pytorch_does(restorers):
    image = rgb(48, 64, seed=5)
    a, b = (r.restore(image) for r in restorers)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_uir_export_writes_each_adapter_and_the_router_with_metadata(tiny_models, tmp_path):
    import onnxruntime

    from pipeline.cli import main as uir

    uir(["export", "--models", str(tiny_models), "-o", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["blur=1.onnx", "noise=1.onnx", "router.onnx"]
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "noise=1.onnx")).metadata_props}
    assert json.loads(meta["weights"]) == {"noise": 1.0} and json.loads(meta["t_star"]) == {"noise": 200}
    assert meta["input_range"] == "[-1, 1]"
    session = onnxruntime.InferenceSession(str(tmp_path / "noise=1.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"image": np.zeros((2, 3, 24, 40), np.float32), "timestep": np.array([10, 500])})[0]
    assert out.shape == (2, 3, 24, 40), "batch, height and width are dynamic"
    uir(["export", "--models", str(tiny_models), "-o", str(tmp_path / "mix"), "--mix", "noise=0.6,blur=0.4", "--no-router"])
    assert [p.name for p in (tmp_path / "mix").iterdir()] == ["blur=0.4+noise=0.6.onnx"]


def test_a_missing_runtime_names_the_extra_to_install(tiny_models, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main as uir

    from PIL import Image

    Image.fromarray(rgb(32, 32)).save(tmp_path / "a.png")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(SystemExit) as exit:
        uir(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--models", str(tiny_models),
             "--engine", "onnxruntime"])
    assert "pip install -e '.[onnx]'" in str(exit.value.code)
    from pipeline.restore_cli import resolve_engine

    assert resolve_engine("auto", "cpu") == "torch", "auto falls back to torch without the runtime"


def test_the_onnx_engine_is_cpu_only(tiny_models):
    with pytest.raises(ValueError, match="runs on the CPU"):
        UniversalRestorer.from_pretrained(tiny_models, engine="onnxruntime", device="meta")
