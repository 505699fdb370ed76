"""ONNX export and the runtime engines (ONNX Runtime, OpenVINO): fp32 restores as PyTorch does, within 1e-3;
int8 and bf16 close to it."""

import json
import sys

import numpy as np
import pytest
import torch

from pipeline.models.restorer import RestorationSettings, UniversalRestorer
from pipeline.models.router import DegradationRouter

from .images import rgb

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
RUNTIMES = ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("openvino") is None, reason="openvino not installed"))]


@pytest.fixture(scope="module")
def torch_restorer(tiny_models):
    return UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8)


@pytest.fixture(scope="module", params=RUNTIMES)
def restorers(request, tiny_models, torch_restorer):
    return torch_restorer, UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8, engine=request.param)


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
    router = DegradationRouter.from_pretrained(tiny_models / "router")
    images = torch.rand(2, 3, 40, 24) * 2 - 1
    session = onnxruntime.InferenceSession(str(tmp_path / "router.onnx"), providers=["CPUExecutionProvider"])
    logits, presence = session.run(None, {"image": images.numpy()})
    with torch.no_grad():
        expected = router(images)
    assert np.abs(logits - expected[0].numpy()).max() < 1e-4 and np.abs(presence - expected[1].numpy()).max() < 1e-4
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "router.onnx")).metadata_props}
    assert json.loads(meta["degradations"]) == router.names
    uir(["export", "--models", str(tiny_models), "-o", str(tmp_path / "mix"), "--mix", "noise=0.6,blur=0.4", "--no-router"])
    assert [p.name for p in (tmp_path / "mix").iterdir()] == ["blur=0.4+noise=0.6.onnx"]


@pytest.mark.parametrize("engine,precision", [("onnxruntime", "int8"), ("openvino", "bf16")])
def test_reduced_precision_restores_close_to_fp32(tiny_models, torch_restorer, engine, precision):
    pytest.importorskip(engine)
    try:
        fast = UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8, engine=engine, precision=precision)
        x = torch.from_numpy(_photo(64, 96)).permute(2, 0, 1).float() / 255
        for mix in ({"noise": 1.0}, {"noise": 0.6, "blur": 0.4}):
            exact = torch_restorer.restore_tensor(x, [mix])
            error = (fast.restore_tensor(x, [mix]) - exact).pow(2).mean()
            assert 10 * torch.log10(1 / error) > 30, f"{engine} {precision} {mix}: within 30 dB PSNR of fp32"
    except ValueError as error:
        if "does not run bf16 natively" not in str(error):
            raise
        pytest.skip(str(error))


@pytest.mark.parametrize("engine,extra", [("onnxruntime", "onnx"), ("openvino", "openvino")])
def test_a_missing_runtime_names_the_extra_to_install(tiny_models, tmp_path, monkeypatch, engine, extra):
    from pipeline.cli import main as uir

    from PIL import Image

    Image.fromarray(rgb(32, 32)).save(tmp_path / "a.png")
    monkeypatch.setitem(sys.modules, engine, None)
    with pytest.raises(SystemExit) as exit:
        uir(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--models", str(tiny_models),
             "--engine", engine])
    assert f"pip install -e '.[{extra}]'" in str(exit.value.code)
    assert not (tmp_path / "o").exists()


def test_auto_picks_the_engine_for_the_precision(monkeypatch):
    from pipeline.models import export
    from pipeline.restore_cli import resolve_engine

    assert resolve_engine("auto", "int8", "cpu") == ("onnxruntime", "int8")
    assert resolve_engine("auto", "bf16", "cpu") == ("openvino", "bf16")
    assert resolve_engine("auto", None, "cuda") == ("torch", "fp32")
    assert resolve_engine("openvino", None, "cpu") == ("openvino", "fp32"), "a named engine runs fp32 unless told"
    monkeypatch.setattr(export, "native_bf16", lambda: True)
    assert resolve_engine("auto", None, "cpu") == ("openvino", "bf16")
    assert resolve_engine("auto", "fp32", "cpu") == ("onnxruntime", "fp32")
    monkeypatch.setattr(export, "native_bf16", lambda: False)
    assert resolve_engine("auto", None, "cpu") == ("onnxruntime", "fp32")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert resolve_engine("auto", None, "cpu") == ("torch", "fp32"), "auto falls back to torch without the runtimes"


@pytest.mark.parametrize("engine,precision,device,message", [
    ("onnxruntime", "fp32", "meta", "runs on the CPU"),
    ("openvino", "fp32", "meta", "runs on the CPU"),
    ("torch", "int8", "cpu", "runs fp32, not 'int8'"),
    ("onnxruntime", "bf16", "cpu", "runs fp32 or int8, not 'bf16'"),
    ("openvino", "int8", "cpu", "runs fp32 or bf16, not 'int8'"),
    ("tensorrt", "fp32", "cpu", "engine must be one of"),
])
def test_engine_and_precision_are_checked(tiny_models, engine, precision, device, message):
    with pytest.raises(ValueError, match=message):
        UniversalRestorer.from_pretrained(tiny_models, engine=engine, precision=precision, device=device)


def test_uir_export_int8_writes_a_quantised_model(tiny_models, tmp_path):
    from pipeline.cli import main as uir

    uir(["export", "--models", str(tiny_models), "-o", str(tmp_path), "--lora", "noise", "--precision", "int8",
         "--no-router"])
    assert [p.name for p in tmp_path.iterdir()] == ["noise=1.int8.onnx"]
    ops = {node.op_type for node in onnx.load(str(tmp_path / "noise=1.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_strengths_by_noise_level_restore_as_pytorch_does(tiny_models):
    """Tiles of other noise levels get other strengths: each group of tiles by its own merged network."""
    from pipeline.models.composition import AdapterComposition

    settings = RestorationSettings(noise_level="analytic", strengths={"noise": [[0.0, 0.0], [60.0, 1.0]]})
    restorers = []
    for engine in ("torch", "onnxruntime"):
        loaded = UniversalRestorer.from_pretrained(tiny_models, router=False).composition
        composition = AdapterComposition(loaded.model, loaded.names, loaded.t_star.long().tolist(), loaded.readout,
                                         timestep_rules=["noise_sigma" if n == "noise" else "fixed" for n in loaded.names])
        restorers.append(UniversalRestorer(composition, settings=settings, tile=32, overlap=8, engine=engine))
    image = _photo(70, 90).copy()
    image[:, 45:] = rgb(70, 45, seed=9)  # a noisy half beside a smooth one
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    outputs = [r.restore_tensor(x, [{"noise": 1.0}]) for r in restorers]
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-3
    assert len(restorers[1]._onnx._runners) >= 2, "tiles of different strengths ran through different networks"
