"""`uir restore`, `uir info` and the Python API on small generated images."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main as uir
from pipeline.images import read_image
from pipeline.models.folder import ModelsFolderError
from pipeline.models.restorer import RestorationCache, RestorationSettings, UniversalRestorer, bright_end, to_float
from pipeline.models.router import DegradationRouter, RouterConfig

from .conftest import ROOT
from .images import rgb, write_odd_files

TESTSETS = ROOT.parent / "shared" / "data" / "testsets"


@pytest.fixture(scope="module")
def restorer(tiny_models):
    return UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8)


@pytest.mark.parametrize("kind", ["numpy", "pil", "tensor"])
def test_restore_returns_the_kind_it_was_given(restorer, kind):
    image = rgb(40, 56)
    given = {"numpy": image, "pil": Image.fromarray(image), "tensor": torch.from_numpy(image).permute(2, 0, 1) / 255}[kind]
    out = restorer.restore(given)
    assert type(out) is type(given)
    back = {"numpy": lambda o: o, "pil": np.asarray, "tensor": lambda o: (o.permute(1, 2, 0) * 255).round().byte().numpy()}[kind](out)
    assert back.shape == image.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - image).mean() > 0.1, "a restored image differs from its input"


def test_route_returns_weights_by_name(restorer):
    weights = restorer.route(rgb(48, 48))
    assert set(weights) <= {"noise", "blur"} and sum(weights.values()) == pytest.approx(1.0)
    assert list(restorer.with_settings(policy="top1").route(rgb(48, 48)).values()) == [1.0]


@pytest.mark.parametrize("channels,dtype", [(1, np.uint8), (4, np.uint8), (3, np.uint16), (1, np.uint16)])
def test_grayscale_alpha_and_16_bit_are_kept(restorer, channels, dtype):
    image = rgb(40, 40).astype(dtype) * (257 if dtype == np.uint16 else 1)
    image = {1: image[..., :1], 3: image, 4: np.concatenate([image, np.full_like(image[..., :1], 123)], 2)}[channels]
    out = restorer.restore(image, weights={"noise": 1.0})
    assert out.shape == image.shape and out.dtype == dtype
    if channels == 4:
        assert np.array_equal(out[..., 3], image[..., 3]), "alpha must pass through untouched"
    if dtype == np.uint16:
        assert len(np.unique(out)) > 256, "16-bit output keeps more than 8 bits of levels"


def test_tiling_blends_tiles_back_exactly(tiny_models, monkeypatch):
    """With a pixel-wise stand-in for the network, tiles, overlaps and the ramp blend reconstruct the image."""
    restorer = UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8)
    monkeypatch.setattr(restorer.composition, "restore", lambda y, weights, noise_level, strengths, min_correction: torch.tanh(y * 1.5))
    assert restorer.tiles(image_shape=(70, 90)) == 3 * 4
    image = rgb(70, 90, seed=3)
    tiled = restorer.restore(image, weights={"noise": 1.0})
    expected = np.round((np.tanh((image / 127.5 - 1) * 1.5) + 1) * 127.5)
    assert np.abs(tiled.astype(int) - expected).max() <= 1


TRAINED = ROOT / "models"


@pytest.mark.skipif(not (TRAINED / "router/config.json").is_file(), reason="no trained models/ (run `make repro`)")
def test_tiled_result_matches_the_untiled_one_on_the_trained_models():
    """GroupNorm sees each tile's own statistics, so tiles cannot match exactly; the bound is measured."""
    import skimage.data

    image = skimage.data.coffee()[:256, :384]
    whole = UniversalRestorer.from_pretrained(TRAINED, tile=512).restore(image, weights={"noise": 1.0})
    tiled = UniversalRestorer.from_pretrained(TRAINED).restore(image, weights={"noise": 1.0})  # 256² tiles, 32 overlap
    difference = np.abs(whole.astype(int) - tiled.astype(int))
    # Measured on the default profile's models: mean 0.89, 99th percentile 4, max 6 levels of 255.
    assert difference.mean() < 1.5 and np.percentile(difference, 99) <= 8


def test_too_small_images_are_a_clear_error(restorer):
    with pytest.raises(ValueError, match="too small"):
        restorer.restore(rgb(8, 40))


def test_forced_mix_with_an_unknown_name(restorer):
    with pytest.raises(KeyError, match="no adapter for"):
        restorer.restore(rgb(32, 32), weights={"snow": 1.0})


def test_missing_or_incomplete_models_folder_names_the_stage(tmp_path, tiny_models):
    with pytest.raises(ModelsFolderError, match="dvc repro pretrain_backbone"):
        UniversalRestorer.from_pretrained(tmp_path)
    shutil.copytree(tiny_models, tmp_path / "models")
    shutil.rmtree(tmp_path / "models/loras/blur")
    with pytest.raises(ModelsFolderError, match=r"dvc repro train_lora@blur"):
        UniversalRestorer.from_pretrained(tmp_path / "models")


def test_mismatched_adapters_are_refused(tmp_path, tiny_models):
    shutil.copytree(tiny_models, tmp_path / "models")
    shutil.copy(tmp_path / "models/loras/noise/restoration.json", tmp_path / "models/loras/blur/restoration.json")
    with pytest.raises(ValueError, match="holds the adapter for 'noise', not 'blur'"):
        UniversalRestorer.from_pretrained(tmp_path / "models")


def test_an_adapter_of_another_backbone_is_refused(tmp_path, tiny_models, params):
    from pipeline.models.adapters import attach_lora, lora_config, save_adapter
    from pipeline.models.backbone import build_unet

    shutil.copytree(tiny_models, tmp_path / "models")
    other = build_unet({**params.backbone.architecture, "block_out_channels": [4, 8, 8], "norm_num_groups": 4,
                        "down_block_types": ["DownBlock2D"] * 3, "up_block_types": ["UpBlock2D"] * 3})
    shutil.rmtree(tmp_path / "models/loras/blur")
    save_adapter(attach_lora(other, lora_config({"rank": 2, "alpha": 2, "targets": ["conv1"]})),
                 tmp_path / "models/loras/blur", "blur", 120)
    with pytest.raises(ValueError, match="does not fit the backbone"):
        UniversalRestorer.from_pretrained(tmp_path / "models")


def test_router_must_route_to_the_loaded_adapters(tiny_models):
    from pipeline.models.composition import AdapterComposition

    composition = AdapterComposition.from_pretrained(tiny_models / "backbone", {"noise": tiny_models / "loras/noise"})
    router = DegradationRouter(RouterConfig(names=["noise", "blur"], embed_dim=8, width=4))
    with pytest.raises(ValueError, match="router was fitted for"):
        UniversalRestorer(composition, router)


def _run_cli(args, capsys):
    if args[0] == "restore" and "--engine" not in args:
        args = [*args, "--engine", "torch"]  # the ONNX engine has its own tests (test_export.py)
    try:
        uir(args)
        code = 0
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_restores_good_files_and_reports_each_bad_one(tmp_path, tiny_models, capsys):
    files = write_odd_files(tmp_path / "in", size=48)
    (tmp_path / "in/tiny.png").unlink()
    Image.fromarray(rgb(16, 16)[:10]).save(tmp_path / "in/tiny.png")  # too small for the network
    code, out, err = _run_cli(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--models",
                               str(tiny_models), "--tile", "32", "--overlap", "8", "--json"], capsys)
    assert code == 1, "any failed input makes the exit code non-zero"
    report = {Path(e["input"]).name: e for e in json.loads(out)}
    for name in ("plain.png", "gray.png", "rgba.png", "rgb16.png", "gray16.png"):
        assert "output" in report[name] and set(report[name]["weights"]) <= {"noise", "blur"}
        original, restored = read_image(tmp_path / "in" / name), read_image(tmp_path / "out/in" / name)
        assert original.shape == restored.shape and original.dtype == restored.dtype
    for name, reason in (("truncated.jpg", "truncated"), ("notes.png", "not an image"), ("tiny.png", "too small")):
        assert reason in report[name]["error"]
        assert err.count(f"{name}: error:") == 1
    assert "Traceback" not in err
    assert {p.name for p in (tmp_path / "out/in").iterdir()} == {"plain.png", "gray.png", "rgba.png", "rgb16.png", "gray16.png"}


def test_cli_honours_exif_orientation_and_never_overwrites_inputs(tmp_path, tiny_models, capsys):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90° clockwise
    Image.fromarray(rgb(32, 48)).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    before = (tmp_path / "phone.jpg").read_bytes()
    code, _, err = _run_cli(["restore", str(tmp_path / "phone.jpg"), "-o", str(tmp_path), "--models", str(tiny_models)], capsys)
    assert "would overwrite an input" in str(code) and (tmp_path / "phone.jpg").read_bytes() == before
    code, _, _ = _run_cli(["restore", str(tmp_path / "*.jpg"), "-o", str(tmp_path / "out"), "--models",
                           str(tiny_models), "--lora", "blur"], capsys)
    assert code == 0 and read_image(tmp_path / "out/phone.jpg").shape == (48, 32, 3)


def test_cli_mix_and_missing_models(tmp_path, tiny_models, capsys):
    Image.fromarray(rgb(32, 32)).save(tmp_path / "a.png")
    code, out, _ = _run_cli(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--models", str(tiny_models),
                             "--mix", "noise=0.7,blur=0.3", "--json"], capsys)
    assert code == 0 and json.loads(out)[0]["weights"] == {"noise": 0.7, "blur": 0.3}
    code, _, _ = _run_cli(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--models", str(tiny_models),
                           "--lora", "snow"], capsys)
    assert code and "no adapter for" in str(code)
    code, _, _ = _run_cli(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--models", str(tmp_path)], capsys)
    assert "dvc repro pretrain_backbone" in str(code)


def test_cli_info_describes_the_models_folder(tiny_models, capsys):
    code, out, _ = _run_cli(["info", "--models", str(tiny_models), "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and set(info["adapters"]) == {"noise", "blur"}
    assert info["adapters"]["noise"]["rank"] == 2 and info["adapters"]["noise"]["t_star"] == 200
    assert 0 <= info["router"]["mix_threshold"] <= 1 and info["backbone"]["parameters"] > 0
    assert info["router"]["known_threshold"] is None  # none calibrated: the similarity alone flags unknown
    assert info["engine"]["engine"] in ("torch", "onnxruntime", "openvino")


def test_cli_info_prints_the_plans_of_planned_mixing_and_the_strengths(tiny_models, tmp_path, capsys):
    from pipeline.models.restorer import SETTINGS_FILE

    shutil.copytree(tiny_models, tmp_path / "models")
    RestorationSettings(composition="planned", plans={"blur+noise": [["blur", "noise"]]},
                        strengths={"noise": [[15, 0.5], [35, 1.0]]}).save(tmp_path / "models" / SETTINGS_FILE)
    code, out, _ = _run_cli(["info", "--models", str(tmp_path / "models")], capsys)
    assert code == 0 and "plans     blur+noise: blur+noise" in out
    assert "strength  noise by noise level σ: 0.5 at 15, 1 at 35" in out


def test_cli_confirmed_policy_reports_the_confirmation_and_restores_as_the_api(tmp_path, tiny_models, capsys):
    Image.fromarray(rgb(40, 56, seed=11)).save(tmp_path / "a.png")
    code, out, _ = _run_cli(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--models", str(tiny_models),
                             "--tile", "32", "--overlap", "8", "--policy", "confirmed", "--mix-threshold", "0", "--json"], capsys)
    entry = json.loads(out)[0]
    assert code == 0 and len(entry["weights"]) == 2 and len(entry["confirmation"]) == 1  # threshold 0: always confirmed
    api = UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8,
                                           settings=RestorationSettings(policy="confirmed", mix_threshold=0.0))
    assert np.array_equal(read_image(tmp_path / "o/a.png"), api.restore(read_image(tmp_path / "a.png")))


def test_uir_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "restore" in result.stdout and "info" in result.stdout


@pytest.mark.skipif(not (TESTSETS / "RNI15").is_dir(), reason="shared/data/testsets/RNI15 is absent")
def test_real_noisy_photos_of_rni15(tmp_path, tiny_models, capsys):
    inputs = sorted((TESTSETS / "RNI15").iterdir())[:3]
    code, out, _ = _run_cli(["restore", *map(str, inputs), "-o", str(tmp_path), "--models", str(tiny_models),
                             "--json", "--unknown", "route"], capsys)
    assert code == 0
    for entry in json.loads(out):
        original, restored = read_image(entry["input"]), read_image(entry["output"])
        assert original.shape == restored.shape
        assert np.abs(original.astype(int) - restored.astype(int)).mean() > 0.1


def test_two_inputs_never_share_an_output(tmp_path, tiny_models, capsys, monkeypatch):
    """Same-named files from two folders are refused before any work; a folder keeps its sub-folders."""
    for folder in ("a", "b", "a/sub"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb(32, 32)).save(tmp_path / folder / "x.png")
    loaded = []
    monkeypatch.setattr(UniversalRestorer, "from_pretrained", lambda *a, **k: loaded.append(1))
    code, _, _ = _run_cli(["restore", str(tmp_path / "a/x.png"), str(tmp_path / "b/x.png"), "-o", str(tmp_path / "out"),
                           "--models", str(tiny_models)], capsys)
    assert "same output" in str(code) and "a/x.png" in str(code) and "b/x.png" in str(code)
    assert not loaded and not (tmp_path / "out").exists(), "refused before loading models or writing anything"
    monkeypatch.undo()
    code, _, _ = _run_cli(["restore", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "out"),
                           "--models", str(tiny_models), "--lora", "noise"], capsys)
    assert code == 0
    assert {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png")} == {"a/x.png", "a/sub/x.png", "b/x.png"}


@pytest.mark.parametrize("args,message", [
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--mix", "noise=2,blur=-1"], "blur=-1.0 must be a finite number >= 0"),
    (["--mix", "noise=0"], "needs a positive weight"),
    (["--mix", "noise=nan"], "finite"),
    (["--lora", "snow"], "no adapter for ['snow']"),
    (["--device", "cuda"], "not available"),
    (["--tile", "8"], "--tile must be >= 16"),
    (["--mix-threshold", "1.5"], "--mix-threshold must be in [0, 1]"),
])
def test_bad_arguments_are_refused_before_any_model_loads(tmp_path, tiny_models, capsys, monkeypatch, args, message):
    Image.fromarray(rgb(32, 32)).save(tmp_path / "a.png")
    monkeypatch.setattr(UniversalRestorer, "from_pretrained", lambda *a, **k: pytest.fail("models were loaded"))
    code, _, err = _run_cli(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--models", str(tiny_models),
                             *args], capsys)
    assert message in str(code) and "Traceback" not in err


def test_a_forced_adapter_needs_no_router(tmp_path, tiny_models, capsys):
    shutil.copytree(tiny_models, tmp_path / "models")
    shutil.rmtree(tmp_path / "models/router")
    Image.fromarray(rgb(32, 32)).save(tmp_path / "a.png")
    code, _, _ = _run_cli(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--models",
                           str(tmp_path / "models"), "--lora", "noise"], capsys)
    assert code == 0 and (tmp_path / "o/a.png").is_file()
    code, _, _ = _run_cli(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "o2"), "--models",
                           str(tmp_path / "models")], capsys)
    assert "dvc repro fit_router" in str(code) and "--lora and --mix restore without a router" in str(code)


def test_negative_weights_are_refused_by_the_api(restorer):
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        restorer.restore(rgb(32, 32), weights={"noise": -1})


def test_gray_with_alpha_and_flat_arrays_keep_their_shape(restorer, tmp_path):
    flat = rgb(40, 40)[..., 0]
    assert restorer.restore(flat, weights={"noise": 1.0}).shape == (40, 40)
    gray_alpha = np.stack([flat, np.full_like(flat, 77)], axis=-1)
    out = restorer.restore(gray_alpha, weights={"noise": 1.0})
    assert out.shape == (40, 40, 2) and np.array_equal(out[..., 1], gray_alpha[..., 1])
    Image.fromarray(gray_alpha, "LA").save(tmp_path / "la.png")
    from pipeline.images import write_image

    write_image(tmp_path / "out.png", restorer.restore(read_image(tmp_path / "la.png"), weights={"noise": 1.0}))
    assert Image.open(tmp_path / "out.png").mode == "LA"
    assert restorer.restore(Image.open(tmp_path / "la.png"), weights={"noise": 1.0}).mode == "LA"


@pytest.mark.parametrize("settings", [{"policy": "top1"}, {"policy": "gated"}, {"policy": "confirmed", "mix_threshold": 0.0},
                                      {"policy": "topk", "composition": "weights"},
                                      {"policy": "topk", "composition": "sequential"}])
def test_a_cached_restorer_restores_exactly_as_without_its_cache(tiny_models, restorer, settings):
    cached = UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8, cache=RestorationCache())
    image = rgb(40, 56, seed=5)
    for _ in range(2):  # computed, then from the cache
        assert np.array_equal(cached.with_settings(**settings).restore(image), restorer.with_settings(**settings).restore(image))
    assert cached.cache.hits > 0


def _presence_on(restorer, monkeypatch, image, on_image: float, elsewhere: float):
    """The router's presence is ``on_image`` for every degradation of ``image`` itself and ``elsewhere`` for any
    other input (such as ``image`` restored by one adapter); its probabilities stay the router's own."""
    from pipeline.models.restorer import to_float

    route_crops, crops_of_image = restorer.router.route_crops, restorer._route_crops(to_float(image)[0] * 2 - 1)

    def route(crops):
        routing = route_crops(crops)
        routing.presence = torch.full_like(routing.presence, on_image if torch.equal(crops, crops_of_image) else elsewhere)
        return routing

    monkeypatch.setattr(restorer.router, "route_crops", route)


@pytest.mark.parametrize("elsewhere,confirmed", [(0.9, True), (0.1, False)])
def test_confirmed_routing_keeps_a_mix_only_if_the_first_adapters_restoration_still_shows_it(
        tiny_models, monkeypatch, elsewhere, confirmed):
    restorer = UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8,
                                                 settings=RestorationSettings(mix_threshold=0.5, composition="sequential"))
    image = rgb(40, 56, seed=8)
    _presence_on(restorer, monkeypatch, image, on_image=0.9, elsewhere=elsewhere)
    gated, checked = restorer.with_settings(policy="gated"), restorer.with_settings(policy="confirmed")
    mix = gated.analyse(image)
    assert len(mix.weights) == 2 and mix.confirmation == {}, "the gate finds a mix on the image itself"
    analysis = checked.analyse(image)
    first, second = mix.ranking[0], mix.ranking[1]
    assert analysis.confirmation == pytest.approx({second: elsewhere})
    if confirmed:  # exactly the gated restoration
        assert analysis.steps == mix.steps and np.array_equal(checked.restore(image), gated.restore(image))
    else:  # exactly the first adapter alone
        assert analysis.weights == {first: 1.0} and analysis.steps == [{first: 1.0}]
        assert np.array_equal(checked.restore(image), restorer.restore(image, weights={first: 1.0}))


def _clean_after_first(restorer, monkeypatch, image, on_image: bool = False):
    """The router calls every input other than ``image`` clean, and ``image`` itself clean if ``on_image``."""
    from pipeline.models.restorer import to_float

    route_crops, crops_of_image = restorer.router.route_crops, restorer._route_crops(to_float(image)[0] * 2 - 1)

    def route(crops):
        routing = route_crops(crops)
        routing.clean = torch.full_like(routing.clean, on_image or not torch.equal(crops, crops_of_image))
        return routing

    monkeypatch.setattr(restorer.router, "route_crops", route)


@pytest.mark.parametrize("on_image,gate,elsewhere,clean_after,expected", [
    (0.1, 0.0, 0.9, False, 2),  # a single on the image, a second degradation shows once the first is undone: two
    (0.1, 0.05, 0.9, False, 2),  # the same, its presence on the image reaching the gate
    (0.9, 0.0, 0.9, False, 2),  # a mix on the image that still shows: two, as confirmed
    (0.9, 0.0, 0.1, False, 1),  # a mix on the image gone once the first is undone: one
    (0.1, 0.0, 0.1, False, 1),  # a single that stays a single: one
    (0.1, 0.0, 0.9, True, 1),  # the first adapter's restoration is called clean: nothing more
    (0.1, 0.5, 0.9, False, 1),  # nothing on the image reaches the gate: nothing is read again
])
def test_cascade_routing_adds_what_the_first_adapters_restoration_shows(tiny_models, monkeypatch, on_image, gate,
                                                                           elsewhere, clean_after, expected):
    restorer = UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8, cache=RestorationCache(),
                                                 settings=RestorationSettings(policy="cascade", mix_threshold=0.5,
                                                                              cascade_gate=gate, composition="sequential"))
    image = rgb(40, 56, seed=11)
    _presence_on(restorer, monkeypatch, image, on_image=on_image, elsewhere=elsewhere)
    if clean_after:
        _clean_after_first(restorer, monkeypatch, image)
    analysis = restorer.analyse(image)
    first = analysis.ranking[0]
    if on_image >= gate:
        assert set(analysis.confirmation) == set(restorer.names) - {first}, "every other adapter is read again"
    else:
        assert analysis.confirmation == {} and restorer.cache.misses == 1, "the routing alone"
    assert len(analysis.weights) == expected and first in analysis.weights
    if expected == 2:  # the most present other on the restoration; all tie here, so the next by the router's rank
        second = analysis.ranking[1]
        assert set(analysis.weights) == {first, second}
        assert np.array_equal(restorer.restore(image, analysis=analysis),
                              restorer.restore(image, weights={first: 0.5, second: 0.5}))
    else:  # exactly the first adapter alone
        assert np.array_equal(restorer.restore(image, analysis=analysis), restorer.restore(image, weights={first: 1.0}))


@pytest.mark.parametrize("on_image", [0.1, 0.9])  # a single on the image, or a mix the gate already sees there
@pytest.mark.parametrize("pairs,mixes,expected", [
    ("any", (), 2),  # any second adapter
    ("validated", ("blur+noise",), 2),  # the pair is a validated mix
    ("validated", ("blur+jpeg+noise",), 2),  # ... or part of one
    ("validated", ("blur+jpeg", "jpeg+noise"), 1),  # never validated together: not read again, not added
])
def test_cascade_adds_only_pairs_of_validated_mixes_when_asked(tiny_models, monkeypatch, on_image, pairs, mixes,
                                                                 expected):
    settings = RestorationSettings(policy="cascade", mix_threshold=0.5, composition="sequential",
                                   cascade_pairs=pairs, validated_mixes=mixes)
    restorer = UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8, cache=RestorationCache(), settings=settings)
    image = rgb(40, 56, seed=12)
    _presence_on(restorer, monkeypatch, image, on_image=on_image, elsewhere=0.9)  # shows once the first is undone
    analysis = restorer.analyse(image)
    assert set(analysis.weights) == set(analysis.ranking[:expected])
    if expected == 1:
        assert analysis.confirmation == {} and restorer.cache.misses == 1, "the routing alone, no restoration"
        assert np.array_equal(restorer.restore(image, analysis=analysis),
                              restorer.restore(image, weights={analysis.ranking[0]: 1.0}))


def test_validated_cascade_pairs_need_the_validated_mixes(tmp_path):
    with pytest.raises(ValueError, match="validated_mixes"):
        RestorationSettings(policy="cascade", cascade_pairs="validated")
    with pytest.raises(ValueError, match="cascade_pairs"):
        RestorationSettings(cascade_pairs="some")
    settings = RestorationSettings(policy="cascade", cascade_pairs="validated", validated_mixes=["blur+noise"])
    settings.save(tmp_path / "restoration.json")
    assert RestorationSettings.load(tmp_path / "restoration.json") == settings


def test_bright_end_is_the_995th_percentile_of_the_box_filtered_channel_maximum():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.random((3, 40, 56), dtype=np.float32))
    peak = x.amax(0).numpy()
    smoothed = np.lib.stride_tricks.sliding_window_view(peak, (3, 3)).mean(axis=(-1, -2)).ravel()
    reference = np.sort(smoothed)[round(0.995 * smoothed.size) - 1]
    assert bright_end(x) == pytest.approx(reference, abs=1e-6)
    assert bright_end(x * 0.5) == pytest.approx(0.5 * reference, abs=1e-6)
    dark = torch.full((3, 40, 56), 0.2)
    dark[:, 20, 30] = 1.0  # one hot pixel is neither the 99.5th percentile nor survives the box filter
    assert bright_end(dark) == pytest.approx(0.2)


def test_a_ceiling_is_the_brightest_training_input_of_each_named_degradation_the_run_has(tmp_path):
    from pipeline.evaluation.selection import ceilings

    folder = tmp_path / "lowlight" / "train"
    (folder / "lq").mkdir(parents=True)
    for name, value in (("dark", 40), ("brighter", 120)):
        Image.fromarray(np.full((24, 24, 3), value, np.uint8)).save(folder / "lq" / f"{name}.png")
    (folder / "manifest.jsonl").write_text("".join(json.dumps({"lq": f"lq/{n}.png"}) + "\n" for n in ("dark", "brighter")))
    found = ceilings(tmp_path, ["lowlight", "haze"], ["noise", "lowlight"])
    assert found == {"lowlight": pytest.approx(120 / 255)}, "haze is not a degradation of this run: skipped"


@pytest.mark.parametrize("policy", ["cascade", "confirmed"])
@pytest.mark.parametrize("margin,expected", [(1e-3, 2), (-1e-3, 1)])
def test_a_second_adapter_is_not_added_to_a_restoration_brighter_than_its_ceiling(tiny_models, monkeypatch, policy,
                                                                                  margin, expected):
    restorer = UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8, cache=RestorationCache(),
                                                 settings=RestorationSettings(policy=policy, mix_threshold=0.5,
                                                                              composition="sequential"))
    image = rgb(40, 56, seed=13)
    _presence_on(restorer, monkeypatch, image, on_image=0.9, elsewhere=0.9)
    unlimited = restorer.analyse(image)
    first, second = unlimited.ranking[0], unlimited.ranking[1]
    assert set(unlimited.weights) == {first, second}
    brightness = bright_end(restorer.restore_tensor(to_float(image)[0], [{first: 1.0}]))
    limited = restorer.with_settings(ceilings={second: brightness + margin, first: 0.0}).analyse(image)
    assert len(limited.weights) == expected and first in limited.weights, "the first adapter is never limited"
    if expected == 1:
        assert np.array_equal(restorer.restore(image, analysis=limited), restorer.restore(image, weights={first: 1.0}))


def test_cascade_routing_of_a_clean_image_restores_nothing(tiny_models, monkeypatch):
    restorer = UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8, cache=RestorationCache(),
                                                 settings=RestorationSettings(policy="cascade", mix_threshold=0.5))
    image = rgb(40, 56, seed=12)
    _presence_on(restorer, monkeypatch, image, on_image=0.9, elsewhere=0.9)
    _clean_after_first(restorer, monkeypatch, image, on_image=True)
    analysis = restorer.analyse(image)
    assert analysis.unchanged and analysis.confirmation == {} and restorer.cache.misses == 1, "the routing alone"
    assert np.array_equal(restorer.restore(image, analysis=analysis), image)


def _cached_confirming(tiny_models, monkeypatch, image, on_image: float) -> UniversalRestorer:
    restorer = UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8, cache=RestorationCache(),
                                                 settings=RestorationSettings(policy="confirmed", mix_threshold=0.5))
    _presence_on(restorer, monkeypatch, image, on_image=on_image, elsewhere=0.9)
    return restorer


def test_confirmed_routing_of_a_single_costs_no_restoration(tiny_models, monkeypatch):
    image = rgb(40, 56, seed=9)
    restorer = _cached_confirming(tiny_models, monkeypatch, image, on_image=0.2)
    analysis = restorer.analyse(image)
    assert len(analysis.weights) == 1 and analysis.confirmation == {}
    assert restorer.cache.misses == 1, "the routing alone"


def test_a_confirmed_mix_reuses_its_first_step_through_the_cache(tiny_models, monkeypatch):
    image = rgb(40, 56, seed=10)
    restorer = _cached_confirming(tiny_models, monkeypatch, image, on_image=0.9)
    analysis = restorer.analyse(image)
    restorer.restore(image, analysis=analysis)
    shared = analysis.steps[0] == {analysis.ranking[0]: 1.0}  # the mix starts with the adapter that confirmed it
    # two routings (the image, its first restoration), the first adapter alone, each step not already done
    assert restorer.cache.misses == 2 + 1 + len(analysis.steps) - shared


def test_the_cache_reuses_steps_and_keeps_images_and_tilings_apart(tiny_models):
    cache = RestorationCache()
    restorer = UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8, cache=cache)
    image = rgb(40, 56, seed=6)
    restorer.with_settings(composition="sequential").restore(image, weights={"noise": 0.5, "blur": 0.5})
    misses = cache.misses
    restorer.restore(image, weights={"noise": 1.0})  # the sequential mix's first step (undo_order: noise first)
    assert cache.misses == misses
    restorer.restore(image[::-1].copy(), weights={"noise": 1.0})  # other pixels
    assert cache.misses == misses + 1
    UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=4, cache=cache).restore(image, weights={"noise": 1.0})
    assert cache.misses == misses + 2


def test_methods_timed_apart_restore_as_the_shared_ones_and_pay_their_own_network_passes(tiny_models):
    from pipeline.evaluation.methods import load_methods

    (shared, shared_restorer), (apart, apart_restorer) = (load_methods(tiny_models, share_restorations=s) for s in (True, False))
    assert shared_restorer.cache is not None and apart_restorer.cache is None
    image = rgb(40, 56, seed=7)
    for a, b in zip(shared, apart):
        assert a.name == b.name and np.array_equal(a.restore(image, "noise"), b.restore(image, "noise"))
    assert shared_restorer.cache.hits > 0  # the oracles' restorations served the routed variants


def test_the_cache_drops_the_least_recently_used_beyond_its_size():
    value = lambda v: (lambda: torch.full((3, 8, 8), float(v)))  # noqa: E731 -- 768 bytes each
    cache = RestorationCache(max_bytes=2 * 768)
    cache.get(("a",), value(1))
    cache.get(("b",), value(2))
    cache.get(("a",), value(9))  # a hit: b is now the oldest
    cache.get(("c",), value(3))
    assert len(cache) == 2
    assert cache.get(("a",), value(9))[0, 0, 0] == 1 and cache.get(("b",), value(7))[0, 0, 0] == 7
    with pytest.raises(ValueError, match="max_bytes"):
        RestorationCache(max_bytes=-1)


def test_selection_ships_the_candidate_best_on_validation(tiny_models, tmp_path):
    from pipeline.evaluation.selection import PairedImages, choose, per_image
    from pipeline.models.restorer import SETTINGS_FILE

    restorer = UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8)
    sets = [PairedImages("noise", "single", [rgb(32, 32, seed=1)], [rgb(32, 32, seed=2)]),
            PairedImages("noise+blur", "mixed", [rgb(32, 48, seed=3)], [rgb(32, 48, seed=4)])]
    candidates = [{"policy": "top1"}, {"policy": "topk", "composition": "weights"}, {"policy": "gated", "mix_threshold": 0.0}]
    chosen, rows, best = choose(restorer, RestorationSettings(), candidates, sets)
    expected = [np.mean([np.mean(v) for v in per_image(restorer.with_settings(**{"composition": "sequential", **c}), sets)[0].values()])
                for c in candidates]
    assert [r["mean_psnr"] for r in rows] == pytest.approx(expected)
    assert [r["adapters_per_image"] for r in rows] == [1.0, 2.0, 2.0]
    # one image per set: no spread to measure, so no standard error; the best mean goes
    assert [r["standard_error_to_best"] for r in rows] == [0.0, 0.0, 0.0]
    assert best == int(np.argmax(expected)) and chosen.policy == candidates[best]["policy"]
    chosen.save(tmp_path / SETTINGS_FILE)
    assert RestorationSettings.load(tmp_path / SETTINGS_FILE) == chosen


_BEST = {"a": np.array([30.0, 31.0, 32.0, 33.0]), "b": np.array([20.0, 20.0, 21.0, 21.0])}


@pytest.mark.parametrize("others,adapters,expected", [
    # within one standard error and fewer adapters: the simpler goes
    ([{"a": _BEST["a"] + [0.3, -0.3, 0.2, -0.4], "b": _BEST["b"]}], [1.5, 1.2], 1),
    # the same difference on every image has no spread: a real loss, the best goes
    ([{"a": _BEST["a"] - 0.1, "b": _BEST["b"]}], [1.5, 1.2], 0),
    # within one standard error but more adapters: the best goes
    ([{"a": _BEST["a"] + [0.3, -0.3, 0.2, -0.4], "b": _BEST["b"]}], [1.2, 1.5], 0),
    # beyond one standard error, however simple
    ([{"a": _BEST["a"] - [0.0, 0.0, 3.0, 9.0], "b": _BEST["b"] - 1.0}], [1.5, 0.0], 0),
    # two within reach, equally simple: the better of them
    ([{"a": _BEST["a"] + [0.3, -0.3, 0.2, -0.4], "b": _BEST["b"]}, {"a": _BEST["a"] + [0.2, -0.2, 0.1, -0.2], "b": _BEST["b"]}],
     [1.5, 1.0, 1.0], 2),
])
def test_the_one_standard_error_rule(others, adapters, expected):
    from pipeline.evaluation.selection import one_standard_error_choice

    chosen, errors = one_standard_error_choice([_BEST, *others], adapters)
    assert chosen == expected and errors[0] == 0.0
    difference = others[0]["a"] - _BEST["a"]  # set b: no difference
    assert errors[1] == pytest.approx(np.std(difference, ddof=1) / 2 / 2)  # over √4 images, over 2 sets


def test_plans_are_chosen_per_pair_on_validation_and_saved(tiny_models, tmp_path):
    from pipeline.evaluation.selection import PairedImages, choose_plans, psnr
    from pipeline.models.restorer import SETTINGS_FILE

    restorer = UniversalRestorer.from_pretrained(tiny_models, tile=32, overlap=8)
    mix = PairedImages("noise+blur", "mixed", [rgb(32, 48, seed=3), rgb(24, 24, seed=5)],
                       [rgb(32, 48, seed=4), rgb(24, 24, seed=6)])
    sets = [PairedImages("noise", "single", [rgb(32, 32, seed=1)], [rgb(32, 32, seed=2)]), mix]
    plans, rows = choose_plans(restorer, sets)
    options = {"blur then noise": [["blur"], ["noise"]], "noise then blur": [["noise"], ["blur"]],
               "weights": [["blur", "noise"]]}
    expected = {}
    for label, plan in options.items():
        forced = restorer.with_settings(composition="planned", plans={"blur+noise": plan})
        expected[label] = np.mean([psnr(forced.restore(lq, weights={"noise": 0.5, "blur": 0.5}), gt)
                                   for lq, gt in zip(mix.degraded, mix.clean)])
    best = max(expected, key=expected.get)
    assert rows == [{"mix": "blur+noise", "chosen": best, "val_psnr": pytest.approx(expected)}]
    assert {k: [list(step) for step in v] for k, v in plans.items()} == {"blur+noise": options[best]}
    settings = RestorationSettings(composition="planned", plans=plans)
    settings.save(tmp_path / SETTINGS_FILE)
    assert RestorationSettings.load(tmp_path / SETTINGS_FILE) == settings
    steps = restorer.with_settings(composition="planned", plans=plans).steps({"noise": 0.3, "blur": 0.7})
    assert steps == [{name: 1 / len(step) for name in step} for step in options[best]]  # the plan, in equal parts


@pytest.mark.parametrize("plans", [
    {"noise+blur": [["noise"], ["blur"]]},  # key not sorted
    {"blur+noise": [["noise"]]},  # an adapter missing
    {"blur+noise": [["noise"], ["noise"], ["blur"]]},  # applied twice
    {"blur+noise": [["blur", "noise"], []]},  # an empty step
])
def test_a_plan_must_apply_each_adapter_of_its_key_once(plans):
    with pytest.raises(ValueError, match="must apply each adapter"):
        RestorationSettings(composition="planned", plans=plans)


def test_the_models_folder_settings_are_what_restore_uses(tiny_models, tmp_path):
    from pipeline.models.restorer import SETTINGS_FILE

    shutil.copytree(tiny_models, tmp_path / "models")
    RestorationSettings(policy="topk", composition="weights", top_k=2).save(tmp_path / "models" / SETTINGS_FILE)
    assert UniversalRestorer.from_pretrained(tmp_path / "models").settings.policy == "topk"
    assert UniversalRestorer.from_pretrained(tmp_path / "models", settings=RestorationSettings()).settings.policy == "gated"


@pytest.mark.parametrize("unknown", ["identity", "route"])
def test_an_image_the_router_finds_clean_is_left_as_it_is(tiny_models, tmp_path, capsys, unknown):
    """Whatever ``unknown`` says: that setting is for unrecognised degradations, not for clean images."""
    shutil.copytree(tiny_models, tmp_path / "models")
    torch.manual_seed(0)
    DegradationRouter(RouterConfig(names=["noise", "blur"], embed_dim=8, width=4, clean=True,
                                   clean_threshold=0.0)).save_pretrained(tmp_path / "models" / "router")
    restorer = UniversalRestorer.from_pretrained(tmp_path / "models", tile=32, overlap=8)
    image = rgb(40, 48)
    analysis = restorer.with_settings(unknown=unknown).analyse(image)
    assert analysis.clean and analysis.unchanged and not analysis.unknown
    assert np.array_equal(restorer.with_settings(unknown=unknown).restore(image), image)
    Image.fromarray(image).save(tmp_path / "x.png")
    code, out, _ = _run_cli(["restore", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"), "--models",
                             str(tmp_path / "models"), "--json", "--unknown", unknown], capsys)
    entry = json.loads(out)[0]
    assert code == 0 and entry["clean"] is True
    assert np.array_equal(read_image(entry["output"]), image)


@pytest.mark.parametrize("unknown,unchanged", [("identity", True), ("route", False)])
def test_an_unrecognised_degradation_is_left_or_routed_as_the_settings_say(tiny_models, tmp_path, unknown, unchanged):
    shutil.copytree(tiny_models, tmp_path / "models")
    torch.manual_seed(0)
    DegradationRouter(RouterConfig(names=["noise", "blur"], embed_dim=8, width=4, clean=True, threshold=1.01,
                                   clean_threshold=1.01)).save_pretrained(tmp_path / "models" / "router")
    restorer = UniversalRestorer.from_pretrained(tmp_path / "models", tile=32, overlap=8).with_settings(unknown=unknown)
    image = rgb(40, 48)
    analysis = restorer.analyse(image)
    assert analysis.unknown and not analysis.clean and analysis.unchanged is unchanged
    assert np.array_equal(restorer.restore(image), image) is unchanged
    assert analysis.steps and sum(analysis.weights.values()) == pytest.approx(1.0)  # what route applies


def _noise_sigma_restorer(tiny_models, settings: RestorationSettings | None = None) -> UniversalRestorer:
    """The tiny models with the ``noise`` adapter under the noise_sigma timestep rule (no noise level estimator:
    the analytic σ̂)."""
    from pipeline.models.composition import AdapterComposition

    loaded = UniversalRestorer.from_pretrained(tiny_models, router=False).composition
    composition = AdapterComposition(loaded.model, loaded.names, loaded.t_star.long().tolist(), loaded.readout,
                                     timestep_rules=["noise_sigma" if n == "noise" else "fixed" for n in loaded.names])
    return UniversalRestorer(composition, tile=32, overlap=8, settings=settings or RestorationSettings(noise_level="analytic"))


@pytest.mark.parametrize("strengths,message", [
    ({"noise": []}, "strengths of noise"),
    ({"noise": [[20, 0.5], [10, 1.0]]}, "σ increasing"),
    ({"noise": [[10, 0.5], [10, 1.0]]}, "σ increasing"),
    ({"noise": [[10, 1.5]]}, "strength in \\[0, 1\\]"),
])
def test_strengths_are_checked(strengths, message):
    with pytest.raises(ValueError, match=message):
        RestorationSettings(strengths=strengths)


def test_strengths_round_trip(tmp_path):
    settings = RestorationSettings(strengths={"noise": [[15, 0.5], [35, 1.0]]})
    settings.save(tmp_path / "restoration.json")
    assert RestorationSettings.load(tmp_path / "restoration.json") == settings
    assert json.loads((tmp_path / "restoration.json").read_text())["strengths"] == {"noise": [[15.0, 0.5], [35.0, 1.0]]}


@pytest.mark.parametrize("weights,steps,strengthened", [
    ({"noise": 1.0}, 1, True),  # an adapter restoring alone
    ({"noise": 0.5, "blur": 0.5}, 2, False),  # a sequential mix: the later step would amplify what it leaves
])
def test_strengths_apply_to_an_adapter_restoring_alone(tiny_models, monkeypatch, weights, steps, strengthened):
    strengths = {"noise": ((0.0, 0.5),)}
    restorer = _noise_sigma_restorer(tiny_models, settings=RestorationSettings(
        composition="sequential", noise_level="analytic", strengths=strengths))
    seen = []
    monkeypatch.setattr(restorer.composition, "restore",
                        lambda y, vector, noise_level, given, min_correction: seen.append(dict(given)) or y)
    restorer.restore(rgb(40, 40, seed=2), weights=weights)
    assert seen == [strengths if strengthened else {}] * steps


def test_a_strengthened_adapter_restores_as_its_weight_times_the_strength(tiny_models):
    image = rgb(40, 56, seed=4)
    half = _noise_sigma_restorer(tiny_models, settings=RestorationSettings(
        noise_level="analytic", strengths={"noise": [[0, 0.5]]}))
    plain = _noise_sigma_restorer(tiny_models)
    assert np.array_equal(half.restore(image, weights={"noise": 1.0}), plain.restore(image, weights={"noise": 0.5}))
    assert not np.array_equal(half.restore(image, weights={"noise": 1.0}), plain.restore(image, weights={"noise": 1.0}))


@pytest.mark.parametrize("psnrs,sigmas,expected", [
    # light noise is best left to the backbone, heavy noise to the adapter: a ramp
    ([[30, 29, 28, 27, 26], [20, 21, 22, 23, 24]], [10, 50], (0.0, 1.0)),
    # the adapter at full strength is best everywhere
    ([[26, 27, 28, 29, 30], [20, 21, 22, 23, 24]], [10, 50], (1.0, 1.0)),
    # a tie: the strongest (the plain adapter)
    ([[25, 25, 25, 25, 25], [20, 21, 22, 23, 24]], [10, 50], (1.0, 1.0)),
    # between the knots, linear: half strength in the middle
    ([[24, 23, 22, 21, 20], [20, 21, 22, 21, 20], [20, 21, 22, 23, 24]], [10, 30, 50], (0.0, 1.0)),
])
def test_strength_knots_are_the_monotone_quarters_best_on_validation(psnrs, sigmas, expected):
    from pipeline.evaluation.selection import fit_knots

    assert fit_knots(np.array(psnrs, dtype=float), np.array(sigmas, dtype=float), [10, 50]) == expected


def test_strengths_are_fitted_on_the_noise_sigma_adapters_own_validation_set(tiny_models):
    from pipeline.evaluation.selection import PairedImages, choose_strengths
    from pipeline.models.composition import STRENGTH_LEVELS

    restorer = _noise_sigma_restorer(tiny_models)
    sets = [PairedImages("noise", "single", [rgb(32, 32, seed=s) for s in (1, 3, 5)], [rgb(32, 32, seed=s) for s in (2, 4, 6)]),
            PairedImages("blur", "single", [rgb(32, 32, seed=7)], [rgb(32, 32, seed=8)]),
            PairedImages("noise+blur", "mixed", [rgb(32, 48, seed=3)], [rgb(32, 48, seed=4)])]
    strengths, rows = choose_strengths(restorer, sets, [15.0, 50.0])
    assert list(strengths) == ["noise"] and [k for k, _ in strengths["noise"]] == [15.0, 50.0]
    assert [row["adapter"] for row in rows] == ["noise"]
    at_one = rows[0]["val_psnr_by_strength"]
    assert list(at_one) == [str(level) for level in STRENGTH_LEVELS]
    assert rows[0]["val_psnr_fitted"] >= max(at_one.values()) - 1e-9, "one strength everywhere is among the fits"
