"""The learned noise level: features that do not depend on image size or JPEG grid position, an estimator that
starts as the analytic σ̂, patches whose references lack exactly the adapter's degradation, regret, training, and
the composition's use of it."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.models.noise_level import NoiseLevelConfig, NoiseLevelEstimator, noise_features, quarter_turned
from pipeline.models.severity import estimate_noise_sigma
from pipeline.training.noise_level import (LabelledFeatures, NoiseLevelTraining, noise_combos, noise_patches, regret)


def _smooth(size: int, seed: int = 0) -> torch.Tensor:
    """A smooth colour image 1×3×size×size on [-1, 1] (no texture: σ̂ reads the noise alone)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=g) * 1.2 - 0.6
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)


def _jpeg(image: torch.Tensor, quality: int, shift: int = 0) -> torch.Tensor:
    """``image`` (1×3×H×W on [-1, 1]) JPEG-compressed with its block grid starting ``shift`` pixels in."""
    array = ((image[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    padded = np.pad(array, ((shift, 0), (shift, 0), (0, 0)), mode="reflect")
    buffer = io.BytesIO()
    Image.fromarray(padded).save(buffer, "JPEG", quality=quality)
    decoded = np.asarray(Image.open(buffer))[shift:, shift:]
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.mark.parametrize("size", [48, 128, 256])
def test_white_noise_features_do_not_depend_on_the_image_size(size):
    torch.manual_seed(size)
    noisy = _smooth(size) + torch.randn(1, 3, size, size) * (25 / 127.5)
    features = noise_features(noisy)[0]
    assert abs(float(features[0].exp()) * 127.5 - 25) < 3  # the analytic σ̂
    assert abs(float(features[1]) - np.log(0.5)) < 0.15  # white noise halves under a 2× average
    assert abs(float(features[2]) - np.log(0.25)) < 0.3
    assert abs(float(features[3])) < 0.15 and abs(float(features[4])) < 0.15  # no block grid


@pytest.mark.parametrize("shift", [0, 3, 5])
def test_blockiness_finds_a_jpeg_grid_wherever_it_starts(shift):
    torch.manual_seed(1)
    noisy = _smooth(128, 1) + torch.randn(1, 3, 128, 128) * (30 / 127.5)
    features = noise_features(_jpeg(noisy, 15, shift))[0]
    assert float(features[3]) > 0.3 and float(features[4]) > 0.3
    assert float(features[0].exp()) * 127.5 < 15  # what fools the analytic σ̂: compression removed the high frequencies


def test_an_untrained_estimator_is_the_analytic_estimate_and_round_trips(tmp_path):
    torch.manual_seed(2)
    noisy = _smooth(64) + torch.randn(4, 3, 64, 64) * torch.tensor([5.0, 15, 30, 50]).view(4, 1, 1, 1) / 127.5
    estimator = NoiseLevelEstimator(NoiseLevelConfig(adapter="noise", hidden=8))
    with torch.no_grad():
        assert torch.allclose(estimator(noisy), estimate_noise_sigma(noisy.float()), rtol=1e-5)
        estimator.mlp[-1].bias.fill_(0.5)
        estimator.save_pretrained(tmp_path / "noise", card="# card\n")
        loaded = NoiseLevelEstimator.from_pretrained(tmp_path / "noise")
        assert loaded.config == estimator.config and torch.equal(loaded(noisy), estimator(noisy))
        assert torch.allclose(loaded(noisy), estimate_noise_sigma(noisy) * np.exp(0.5), rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="dvc repro fit_noise_level"):
        NoiseLevelEstimator.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="at least 16×16"):
        estimator(torch.zeros(1, 3, 8, 64))


@pytest.mark.parametrize("correction,min_correction,kept", [
    (np.log(2.0), 0.0, True), (np.log(2.0), 0.5, True), (np.log(2.0), 1.0, False),
    (-np.log(2.0), 0.5, True), (-np.log(2.0), 1.0, False), (0.05, 0.1, False),
])
def test_a_correction_below_the_minimum_keeps_the_analytic_estimate(correction, min_correction, kept):
    torch.manual_seed(3)
    noisy = _smooth(48) + torch.randn(3, 3, 48, 48) * torch.tensor([10.0, 25, 50]).view(3, 1, 1, 1) / 127.5
    estimator = NoiseLevelEstimator(NoiseLevelConfig(adapter="noise", hidden=8))
    with torch.no_grad():
        estimator.mlp[-1].bias.fill_(float(correction))
        expected = estimate_noise_sigma(noisy) * (np.exp(correction) if kept else 1.0)
        assert torch.allclose(estimator(noisy, min_correction), expected, rtol=1e-5)


def test_quarter_turned_features_are_those_of_the_turned_image():
    torch.manual_seed(3)
    image = _jpeg(_smooth(96, 3) + torch.randn(1, 3, 96, 96) * 0.2, 40)[:, :, :, :80]
    turned = torch.rot90(image, 1, dims=(-2, -1))
    # equal up to the last incomplete block and pooling window, which a turn moves to the other end
    assert torch.allclose(quarter_turned(noise_features(image)), noise_features(turned), atol=0.03)
    assert not torch.allclose(noise_features(image), noise_features(turned), atol=0.03)


def test_noise_combos_put_the_noise_before_and_after_every_other_degradation():
    assert noise_combos(["noise", "blur", "jpeg"], "noise") == [
        ("noise",), ("noise", "blur"), ("blur", "noise"), ("noise", "jpeg"), ("jpeg", "noise")]
    assert noise_combos(["noise"], "noise") == [("noise",)]


def test_references_lack_exactly_the_adapters_degradation(tiny_project, params):
    from pipeline.data.degradations import Degradation, sample_seed
    from pipeline.data.synthesis import crop, image_sizes, load_clean, train_boxes
    from pipeline.data.tensors import to_tensor

    images = load_clean(tiny_project / "data/clean", "train")
    names = ["noise", "blur", "jpeg"]
    patches = noise_patches(params.degradations, names, "noise", images, 32, 40, 0.3, 7, "test")
    assert patches.degraded.shape == patches.reference.shape == (40, 3, 32, 32)
    assert set(patches.combos) == {"+".join(c) for c in noise_combos(names, "noise")}
    assert torch.equal(noise_patches(params.degradations, names, "noise", images, 32, 40, 0.3, 7, "test").degraded,
                       patches.degraded)  # seeded
    boxes = train_boxes(image_sizes(images), 32, 40, sample_seed(7, "test", "boxes"))
    for row, ((name, box), combo) in enumerate(zip(boxes, patches.combos)):
        clean, draw = crop(images[name], box), sample_seed(7, "test", row)
        others = [n for n in combo.split("+") if n != "noise"]
        expected = Degradation.from_params(params.degradations, others)(clean, draw)[0] if others else clean
        assert torch.equal(patches.reference[row], to_tensor(expected)), combo
        degraded = Degradation.from_params(params.degradations, combo.split("+"))(clean, draw)[0]
        assert torch.equal(patches.degraded[row], to_tensor(degraded)), combo


@pytest.mark.parametrize("log_sigma,expected", [
    # grid log σ = [0, 1, 2]; curve = [30, 32, 31]: the best is at 1
    (1.0, 0.0),
    (0.2, 2.0),    # nearest grid point 0: 32 − 30
    (1.8, 1.0),    # nearest 2: 32 − 31
    (5.0, 1.0),    # beyond the grid: its last point
])
def test_regret_is_the_psnr_lost_at_the_nearest_grid_timestep(log_sigma, expected):
    curves = torch.tensor([[30.0, 32.0, 31.0]])
    assert float(regret(curves, torch.tensor([log_sigma]), torch.tensor([0.0, 1.0, 2.0]))[0]) == pytest.approx(expected)


def test_training_learns_a_correction_the_analytic_estimate_misses(tmp_path, params):
    """Patches whose best σ is 4× the analytic σ̂ when their blockiness is high: the trained estimator's regret
    falls far below the analytic one's."""
    import lightning as L

    from pipeline.data.loaders import ShuffledD4Sampler, evaluation_loader, training_loader

    generator = torch.Generator().manual_seed(4)
    grid = torch.exp(torch.linspace(np.log(0.01), np.log(0.8), 24))
    count = 512
    analytic = torch.exp(torch.empty(count).uniform_(np.log(0.03), np.log(0.3), generator=generator))
    blocky = torch.rand(count, generator=generator) < 0.5
    features = torch.zeros(count, 5)
    features[:, 0] = analytic.log()
    features[:, 1:3] = torch.tensor([np.log(0.5), np.log(0.25)])
    features[blocky, 3:] = 0.8
    best = torch.where(blocky, analytic * 4, analytic).clamp(max=0.8)
    curves = 35 - 4 * (grid.log()[None] - best.log()[:, None]).abs()
    data = LabelledFeatures(features, curves)
    assert torch.equal(data[count + 3]["features"], quarter_turned(features[3]))  # D4 element 1: a quarter turn

    estimator = NoiseLevelEstimator(NoiseLevelConfig(adapter="noise", hidden=16))
    estimator.standardise(features)
    module = NoiseLevelTraining(estimator, grid, lr=0.01, weight_decay=0.0, warmup_steps=5, max_steps=300)
    trainer = L.Trainer(max_steps=300, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=300,
                        check_val_every_n_epoch=None, default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=training_loader(data, ShuffledD4Sampler(count, 64, 0), 0),
                val_dataloaders=evaluation_loader(data, 128))
    metrics = trainer.callback_metrics
    assert float(metrics["val/regret_db_analytic"]) > 2.0
    assert float(metrics["val/regret_db_estimator"]) < 0.5


def test_the_composition_sets_the_noise_timestep_by_the_estimator_it_is_asked_for(tmp_path, params):
    from pipeline.models.adapters import attach_lora, lora_config, save_adapter
    from pipeline.models.backbone import build_scheduler, build_unet, load_backbone, save_backbone
    from pipeline.models.composition import AdapterComposition

    arch = {**params.backbone.architecture, "block_out_channels": [8, 16], "norm_num_groups": 4,
            "down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2}
    save_backbone(tmp_path / "backbone", build_unet(arch), build_scheduler(params.backbone.schedule))
    for name, rule in (("noise", "noise_sigma"), ("blur", "fixed")):
        unet, _ = load_backbone(tmp_path / "backbone")
        save_adapter(attach_lora(unet, lora_config({"rank": 2, "alpha": 2, "targets": ["conv1"]})),
                     tmp_path / name, name, 120, rule)
    estimator = NoiseLevelEstimator(NoiseLevelConfig(adapter="noise", hidden=8))
    with torch.no_grad():
        estimator.mlp[-1].bias.fill_(float(np.log(2.0)))  # twice the analytic σ̂
    estimator.save_pretrained(tmp_path / "estimator")
    adapters = {n: tmp_path / n for n in ("noise", "blur")}
    composition = AdapterComposition.from_pretrained(tmp_path / "backbone", adapters, {"noise": tmp_path / "estimator"})
    torch.manual_seed(5)
    y = (_smooth(32) + torch.randn(2, 3, 32, 32) * 0.15).clamp(-1, 1)
    noise = composition.weights_for({"noise": 1.0})
    analytic = composition.timesteps(noise, y, "analytic")
    learned = composition.timesteps(noise, y, "learned")
    readout = composition.readout
    assert torch.equal(analytic, readout.timesteps_for_sigma(estimate_noise_sigma(y)))
    assert torch.equal(learned, readout.timesteps_for_sigma(2 * estimate_noise_sigma(y)))
    assert (learned > analytic).all()
    blur = composition.weights_for({"blur": 1.0})
    assert composition.timesteps(blur, y, "learned").tolist() == [120, 120]

    without = AdapterComposition.from_pretrained(tmp_path / "backbone", adapters)
    assert without.timesteps(blur, y, "learned").tolist() == [120, 120]  # no noise adapter in the mix: no estimator needed
    with pytest.raises(ValueError, match="fit_noise_level"):
        without.timesteps(noise, y, "learned")
    with pytest.raises(ValueError, match="noise_level must be one of"):
        composition.timesteps(noise, y, "oracle")
    with pytest.raises(ValueError, match="not adapters here"):
        AdapterComposition(composition.model, ["noise", "blur"], [120, 120], readout, noise_levels={"rain": estimator})


def _with_noise_estimator(tiny_models, tmp_path):
    """``tiny_models`` with its noise adapter on the ``noise_sigma`` rule and an estimator at 3× the analytic σ̂."""
    import json
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    settings_file = models / "loras" / "noise" / "restoration.json"
    settings_file.write_text(json.dumps({**json.loads(settings_file.read_text()), "timestep": "noise_sigma"}))
    estimator = NoiseLevelEstimator(NoiseLevelConfig(adapter="noise", hidden=8))
    with torch.no_grad():
        estimator.mlp[-1].bias.fill_(float(np.log(3.0)))
    estimator.save_pretrained(models / "noise_level" / "noise", card="# estimator\n")
    return models


def test_restoration_uses_the_estimator_the_settings_name_and_caches_them_apart(tiny_models, tmp_path):
    from pipeline.models.restorer import RestorationCache, UniversalRestorer

    from .images import rgb

    models = _with_noise_estimator(tiny_models, tmp_path)
    image = rgb(40, 56, seed=8)
    cached = UniversalRestorer.from_pretrained(models, tile=32, overlap=8, cache=RestorationCache())
    learned = cached.restore(image, weights={"noise": 1.0})
    analytic = cached.with_settings(noise_level="analytic").restore(image, weights={"noise": 1.0})
    assert not np.array_equal(learned, analytic)
    fresh = UniversalRestorer.from_pretrained(models, tile=32, overlap=8)
    assert np.array_equal(fresh.with_settings(noise_level="analytic").restore(image, weights={"noise": 1.0}), analytic)
    assert np.array_equal(fresh.restore(image, weights={"noise": 1.0}), learned)
    (models / "noise_level" / "noise" / "config.json").unlink()
    without = UniversalRestorer.from_pretrained(models, tile=32, overlap=8)
    with pytest.raises(ValueError, match="fit_noise_level"):
        without.restore(image, weights={"noise": 1.0})
    assert without.with_settings(noise_level="analytic").restore(image, weights={"noise": 1.0}).shape == image.shape


def test_a_minimum_correction_above_the_estimators_restores_as_the_analytic_estimate(tiny_models, tmp_path):
    from pipeline.models.restorer import RestorationCache, RestorationSettings, UniversalRestorer

    from .images import rgb

    models = _with_noise_estimator(tiny_models, tmp_path)  # its correction: log 3 ≈ 1.10
    image = rgb(40, 56, seed=9)
    restorer = UniversalRestorer.from_pretrained(models, tile=32, overlap=8, cache=RestorationCache())
    learned = restorer.restore(image, weights={"noise": 1.0})
    analytic = restorer.with_settings(noise_level="analytic").restore(image, weights={"noise": 1.0})
    assert np.array_equal(restorer.with_settings(min_noise_correction=1.0).restore(image, weights={"noise": 1.0}), learned)
    assert np.array_equal(restorer.with_settings(min_noise_correction=1.2).restore(image, weights={"noise": 1.0}), analytic)
    assert not np.array_equal(learned, analytic)
    with pytest.raises(ValueError, match="min_noise_correction must be >= 0"):
        RestorationSettings(min_noise_correction=-0.1)


def test_uir_ship_and_info_carry_the_noise_level_estimator(tiny_models, tmp_path, capsys):
    import json
    import shutil

    from .test_restore import _run_cli

    trained, target = _with_noise_estimator(tiny_models, tmp_path), tmp_path / "shipped"
    shutil.copytree(tiny_models / "backbone", target / "backbone")
    (trained / "restoration.json").write_text(json.dumps({"policy": "gated"}))
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "fit_noise_level.json").write_text(json.dumps({"noise": {"val/regret_db_estimator": 0.21,
                                                                        "val/regret_db_analytic": 0.46}}))
    code, out, _ = _run_cli(["ship", "--models", str(trained), "--to", str(target), "--reports", str(reports)], capsys)
    assert code == 0, out
    assert (target / "noise_level" / "noise" / "model.safetensors").read_bytes() == \
        (trained / "noise_level" / "noise" / "model.safetensors").read_bytes()
    assert "| noise | 0.210 | 0.460 |" in (target / "README.md").read_text()
    code, out, _ = _run_cli(["info", "--models", str(target)], capsys)
    assert code == 0 and "t(σ) learned" in out and "noise timestep: learned (corrections to σ̂ from 0.2)" in out


@pytest.mark.parametrize("flags,same_as", [
    (["--min-noise-correction", "2"], "analytic"),  # above the estimator's correction (log 3): σ̂
    (["--min-noise-correction", "0"], "learned"),
    (["--noise-level", "analytic"], "analytic"),
])
def test_uir_restore_flags_choose_the_noise_level(tiny_models, tmp_path, capsys, flags, same_as):
    from PIL import Image

    from pipeline.images import read_image
    from pipeline.models.restorer import UniversalRestorer

    from .images import rgb
    from .test_restore import _run_cli

    models = _with_noise_estimator(tiny_models, tmp_path)
    image = rgb(40, 56, seed=11)
    Image.fromarray(image).save(tmp_path / "noisy.png")
    code, out, _ = _run_cli(["restore", str(tmp_path / "noisy.png"), "-o", str(tmp_path / "out"), "--models", str(models),
                             "--lora", "noise", "--tile", "32", "--overlap", "8", *flags], capsys)
    assert code == 0, out
    restorer = UniversalRestorer.from_pretrained(models, tile=32, overlap=8).with_settings(noise_level=same_as)
    assert np.array_equal(read_image(tmp_path / "out" / "noisy.png"), restorer.restore(image, weights={"noise": 1.0}))
