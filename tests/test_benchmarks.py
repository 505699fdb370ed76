"""The benchmark building blocks: test-set protocols, classical baselines, storage and speed figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from benchmarks import classical, speed
from benchmarks.report import markdown
from benchmarks.testsets import DEFAULT_ROOT, Case, benchmarks, gaussian_noise, jpeg

from .conftest import ROOT, psnr


def test_noise_protocol_is_seeded_per_image_and_has_the_stated_sigma(photo):
    a, b = gaussian_noise(photo, 25, seed=1), gaussian_noise(photo, 25, seed=1)
    assert np.array_equal(a, b) and not np.array_equal(a, gaussian_noise(photo, 25, seed=2))
    residual = a.astype(float) - photo.astype(float)
    assert abs(residual[(photo > 40) & (photo < 215)].std() - 25) < 1.5


def test_jpeg_protocol_loses_more_at_lower_quality(photo):
    assert psnr(photo, jpeg(photo, 10)) < psnr(photo, jpeg(photo, 40)) < 60


def test_missing_test_sets_are_skipped_with_a_reason(tmp_path):
    params = OmegaConf.load(ROOT / "params.yaml")
    sets, skipped = benchmarks(tmp_path, OmegaConf.to_container(params.degradations), [], limit=2)
    assert sets == [] and len(skipped) == 3 and all("not found" in s for s in skipped)


@pytest.mark.skipif(not (DEFAULT_ROOT / "Kodak24").is_dir(), reason="shared/data/testsets is absent")
def test_real_test_sets_give_every_benchmark_and_known_blur_kernels():
    params = OmegaConf.load(ROOT / "params.yaml")
    sets, skipped = benchmarks(DEFAULT_ROOT, OmegaConf.to_container(params.degradations), ["noise+blur"], limit=1)
    names = {s.name for s in sets}
    assert {"CBSD68 noise σ=25", "Kodak24 noise σ=50", "LIVE1 JPEG q=10", "Kodak24 blur", "Kodak24 noise+blur"} <= names
    (blur,) = [s for s in sets if s.name == "Kodak24 blur"]
    kernel = blur.cases[0].extra["kernel"]
    assert kernel.ndim == 2 and abs(kernel.sum() - 1) < 1e-9


@pytest.mark.parametrize("method", ["non_local_means", "total_variation", "cbm3d"])
def test_classical_denoisers_improve_a_noisy_photo(photo, method):
    if method == "cbm3d":
        pytest.importorskip("bm3d")
    case = Case("astronaut", photo, gaussian_noise(photo, 25, seed=0), "noise", {"sigma": 25})
    restored = getattr(classical, method)(case)
    assert restored.shape == photo.shape and restored.dtype == np.uint8
    assert psnr(photo, restored) > psnr(photo, case.degraded) + 2


@pytest.mark.parametrize("method", ["wiener", "richardson_lucy"])
def test_known_kernel_deconvolution_sharpens_a_blurred_photo(photo, method):
    from scipy.signal import fftconvolve

    kernel = np.outer(np.hanning(7), np.hanning(7))
    kernel /= kernel.sum()
    blurred = np.stack([fftconvolve(photo[..., c].astype(float), kernel, mode="same") for c in range(3)], -1)
    case = Case("astronaut", photo, np.clip(blurred, 0, 255).round().astype(np.uint8), "blur", {"kernel": kernel})
    inner = (slice(8, -8), slice(8, -8))  # borders: the convolution's boundary, not the method
    restored = getattr(classical, method)(case)
    assert psnr(photo[inner], restored[inner]) > psnr(photo[inner], case.degraded[inner])


def test_y_channel_psnr_follows_the_bt601_protocol(photo):
    from benchmarks.quality import luma, score

    assert luma(np.full((1, 1, 3), 255, np.uint8))[0, 0] == pytest.approx(235)
    assert luma(np.zeros((1, 1, 3), np.uint8))[0, 0] == pytest.approx(16)
    degraded = jpeg(photo, 10)
    rgb, ssim, y = score(photo, degraded)
    assert rgb == pytest.approx(psnr(photo, degraded)) and 0 < ssim < 1
    assert y > rgb, "Y spans 219 of 255 levels and JPEG keeps luma best: its PSNR is higher"


def test_noise_benchmarks_add_the_bare_backbone_at_the_oracle_timestep(photo, tiny_models):
    from benchmarks.quality import BARE, run
    from benchmarks.testsets import Benchmark

    crop = photo[:40, :56]
    noisy = Benchmark("noise σ=25", [Case("a", crop, gaussian_noise(crop, 25, seed=0), "noise", {"sigma": 25})])
    jpeg_set = Benchmark("JPEG q=10", [Case("a", crop, jpeg(crop, 10), "jpeg")])
    rows = run([noisy, jpeg_set], [], classical=None, backbone=tiny_models / "backbone")
    assert {(r["benchmark"], r["method"]) for r in rows} == {
        ("noise σ=25", "degraded input"), ("noise σ=25", BARE), ("JPEG q=10", "degraded input")}
    assert all(np.isfinite(r["psnr_y"]) for r in rows)
    rows = run([noisy], [], classical="NLM", backbone=None)  # a regex picks the classical methods
    assert [r["method"] for r in rows] == ["degraded input", "NLM (skimage)"]


def test_rows_carry_their_paired_difference_to_uir_lora_on_the_same_images(photo):
    from benchmarks.quality import REFERENCE, _run_one
    from benchmarks.testsets import Benchmark

    crops = [photo[:40, :56], photo[40:80, 56:112]]
    bench = Benchmark("noise σ=25", [Case(str(i), c, gaussian_noise(c, 25, seed=i), "noise", {"sigma": 25})
                                     for i, c in enumerate(crops)])
    rows = {r["method"]: r for r in _run_one(bench, {REFERENCE: lambda case: case.degraded}, None, "NLM")}
    assert "vs_reference" not in rows[REFERENCE]
    assert rows["degraded input"]["vs_reference"] == {"mean": 0.0, "standard_error": 0.0}
    nlm = rows["NLM (skimage)"]
    assert nlm["vs_reference"]["mean"] == pytest.approx(nlm["psnr"] - rows[REFERENCE]["psnr"]) and nlm["vs_reference"]["mean"] > 0
    assert len(nlm["psnr_per_image"]) == 2 and nlm["vs_reference"]["standard_error"] > 0


@pytest.mark.parametrize("values, reference, mean, standard_error", [
    ([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], 2.0, 1 / np.sqrt(3)),
    ([5.0, 5.0], [4.0, 4.0], 1.0, 0.0),
    ([2.0], [3.0], -1.0, 0.0),
])
def test_paired_difference_is_the_mean_of_per_image_differences_with_its_standard_error(values, reference, mean,
                                                                                       standard_error):
    from benchmarks.quality import paired_difference

    assert paired_difference(values, reference) == pytest.approx({"mean": mean, "standard_error": standard_error})


def test_storage_lists_each_model_with_its_size_and_parameters(tiny_models):
    rows = speed.storage(tiny_models)
    assert {r["model"] for r in rows} == {"backbone", "router", "LoRA noise", "LoRA blur"}
    assert all(r["megabytes"] > 0 and r["parameters"] > 0 for r in rows)
    lora = next(r for r in rows if r["model"] == "LoRA noise")
    backbone = next(r for r in rows if r["model"] == "backbone")
    assert lora["parameters"] < backbone["parameters"]


def test_report_renders_every_section():
    result = {
        "machine": {"cpu": "cpu", "cores": 2, "torch_threads": 2, "torch": "2"}, "profile": "smoke", "runs": [{"sections": ["quality"], "seconds": 60}],
        "images_per_set": 1,
        "quality": [{"benchmark": "CBSD68 noise σ=25", "method": "CBM3D", "psnr": 30.1, "ssim": 0.8, "seconds_per_image": 9.0,
                     "vs_reference": {"mean": -0.25, "standard_error": 0.1}}],
        "training": [{"stage": "train_lora@noise", "variant": "v", "batch": 16, "seconds_per_step": 0.1,
                      "patches_per_second": 160, "stage_training_seconds": 20}],
        "growth": {"new_degradation_seconds": 30, "multitask_retrain_seconds": 300, "all_training_seconds": 900,
                   "new_over_multitask": 0.1, "new_over_all_training": 0.03},
        "inference": {"tile": 256, "batch": 4, "gflop_per_megapixel": 10, "matmul_gflops": 100,
                      "variants": [{"variant": "K=1", "ms_per_megapixel": 500, "gflops_per_second": 20, "fraction_of_matmul": 0.2}]},
        "restore": [{"side": 1024, "seconds": 1, "ms_per_megapixel": 950, "rss_loaded_mb": 800, "peak_rss_mb": 900}],
        "storage": [{"model": "backbone", "megabytes": 2.5, "parameters": 620000}],
        "engines": {"tile": 256, "batch": 4, "threads": 2, "matmul_gflops": 100, "gflop_per_megapixel": 180,
                    "adapter": "noise",
                    "rows": [{"engine": "ONNX Runtime fp32", "adapters": "K=2", "ms_per_megapixel": 812, "fraction_of_matmul": 0.3}],
                    "quality": {"Kodak24 σ=25": {"ONNX Runtime fp32": 30.0, "ONNX Runtime int8": 29.5}},
                    "operators": {"fp32": {"Conv": 0.8, "other": 0.2}, "int8": {"Conv": 0.5, "QuantizeLinear": 0.3, "other": 0.2}}},
        "engine_restore": [{"engine": "ONNX Runtime int8", "megapixels": 12, "seconds": 10, "ms_per_megapixel": 833,
                            "peak_rss_mb": 700}],
        "routing": [{"benchmark": "LIVE1 JPEG q=10", "truth": "jpeg", "images": 4, "as_truth": 3, "unchanged": 1,
                     "decisions": {"jpeg": 3, "clean": 1}}],
        "growth_repro": {"degradation": "speckle", "stages": {"train_lora@speckle": 40.0, "evaluate": 300.0},
                         "restored": ["synthesize@speckle"], "total_seconds": 400.0, "uir_lora_seconds": 40.0,
                         "multitask_seconds": 700.0, "trained_loras": ["train_lora@speckle"]},
    }
    text = markdown(result)
    for needle in ("| CBSD68 noise σ=25 | CBM3D | 30.10 | -0.25 ± 0.10 | — | 0.800 |",
                   "| CBSD68 noise σ=25 | CBM3D |  |  |  |  |  | 30.71 |",
                   "published, not run here", "Cost of growth", "of matmul rate", "620,000", "1024²",
                   "| ONNX Runtime fp32 | K=2 | 812 |", "| Kodak24 σ=25 | 30.00 | 29.50 |", "| QuantizeLinear | 0 % | 30 % |",
                   "| other | 20 % | 20 % |", "180 GFLOP per megapixel", "| ONNX Runtime int8 | 12 MP | 10.0 | 833 | 700 |",
                   "| LIVE1 JPEG q=10 | 4 | 3 (75 %) | 1 | jpeg 3, clean 1 |", "| train_lora@speckle | 40 |",
                   "not timed here): synthesize@speckle."):
        assert needle in text


def test_growth_adds_one_degradation_trained_like_noise():
    import yaml

    from benchmarks.growth import NEW, add_degradation

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    grown = add_degradation(params)
    assert set(grown["degradations"]) == set(params["degradations"]) | {NEW}
    assert grown["degradations"][NEW]["adapter"] == params["degradations"]["noise"]["adapter"]
    assert grown["router"]["pretrained"] is None, "a pretrained router knows only the degradations it was trained on"
    assert NEW not in params["degradations"] and params["router"]["pretrained"], "the input is left alone"


def test_growth_counts_every_stage_but_the_baselines_and_the_evaluation_as_uir_loras():
    from benchmarks.growth import summary

    stages = {"train_lora@speckle": 40.0, "fit_noise_level": 500.0, "train_multitask": 700.0, "train_shared_lora": 800.0,
              "fit_router": 300.0, "select_restoration": 100.0, "evaluate": 300.0}
    assert summary(stages) == {"uir_lora_seconds": 940.0, "multitask_seconds": 700.0, "trained_loras": ["train_lora@speckle"]}


def test_engine_benchmark_times_every_engine_for_one_and_two_adapters(tiny_models, params, tmp_path):
    pytest.importorskip("onnxruntime")
    from PIL import Image

    from .images import rgb

    for folder in ("lq", "gt"):
        (tmp_path / "noise" / "test" / folder).mkdir(parents=True)
        Image.fromarray(rgb(32, 48, seed=len(folder))).save(tmp_path / "noise" / "test" / folder / "0.png")
    result = speed.engine_speed(params, tiny_models, repeats=1, degraded=tmp_path, tile=32, batch=1)
    engines = {r["engine"] for r in result["rows"]}
    assert {"PyTorch eager fp32", "ONNX Runtime fp32", "ONNX Runtime int8"} <= engines
    assert {(e, k) for e in engines for k in ("K=1", "K=2")} == {(r["engine"], r["adapters"]) for r in result["rows"]}
    assert all(r["ms_per_megapixel"] > 0 for r in result["rows"])
    assert set(result["quality"]) == {"noise test"} and set(result["quality"]["noise test"]) == engines
    fp32, int8 = result["operators"]["fp32"], result["operators"]["int8"]
    assert "Conv" in fp32 and sum(fp32.values()) == pytest.approx(1)
    assert any(op.startswith("QLinear") or op.endswith("QuantizeLinear") for op in int8), "the int8 graph runs int8 kernels"


def test_backbone_sizes_train_on_one_budget_and_are_judged_at_the_oracle_timestep(tiny_project, photo):
    from benchmarks import backbones
    from pipeline.config import load_params

    params = load_params(tiny_project / "params.yaml")
    arch = backbones.architecture(params, {"block_out_channels": [8, 16], "norm_num_groups": 4})
    assert arch["down_block_types"] == ["DownBlock2D"] * 2 and arch["sample_size"] == params.backbone.architecture.sample_size
    unet, scheduler, steps, seconds = backbones.train_for(params, arch, tiny_project / "data/clean", budget_s=3, seed=0)
    assert steps >= 1 and seconds < 30
    judged = backbones.judge(unet, scheduler, [photo[:40, :56]])
    assert set(judged) == {"parameters", "psnr_sigma15", "psnr_sigma25", "psnr_sigma50", "ms_per_megapixel"}
    row = {"name": "XS", "steps": steps, **judged}
    text = backbones.markdown({"budget_minutes": 0.05, "threads": 2, "data": "embedded", "images": 1, "rows": [row]})
    assert f"| XS | {judged['parameters'] / 1e6:.2f} M | {steps} |" in text


def test_routing_counts_each_decision_as_uir_restore_acts_on_it(photo, tiny_models, tmp_path):
    import shutil

    import torch

    from benchmarks import routing
    from benchmarks.testsets import Benchmark
    from pipeline.models.restorer import UniversalRestorer
    from pipeline.models.router import DegradationRouter, RouterConfig

    shutil.copytree(tiny_models, tmp_path / "models")
    torch.manual_seed(0)
    DegradationRouter(RouterConfig(names=["noise", "blur"], embed_dim=8, width=4, clean=True,
                                   clean_threshold=0.0)).save_pretrained(tmp_path / "models" / "router")
    everything_clean = UniversalRestorer.from_pretrained(tmp_path / "models")
    noisy = Benchmark("noise σ=25", [Case("a", photo, gaussian_noise(photo, 25, 0), "noise")] * 2)
    rows = routing.run([noisy], {"photos": [photo] * 3}, everything_clean)
    assert rows == [
        {"benchmark": "photos clean", "truth": "clean", "images": 3, "as_truth": 3, "unchanged": 3, "decisions": {"clean": 3}},
        {"benchmark": "noise σ=25", "truth": "noise", "images": 2, "as_truth": 0, "unchanged": 2, "decisions": {"clean": 2}}]
    never_clean = UniversalRestorer.from_pretrained(tiny_models).with_settings(policy="top1")  # no clean class
    (row,) = routing.run([noisy], {}, never_clean)
    assert row["unchanged"] == 0 and sum(row["decisions"].values()) == 2 and "clean" not in row["decisions"]
    assert row["as_truth"] == row["decisions"].get("noise", 0)


def test_backbone_step_benchmark_times_every_variant_and_writes_its_table(tmp_path):
    from benchmarks import backbone_step

    backbone_step.main(["--params", str(ROOT / "params.yaml"), "--device", "cpu", "--batches", "2", "--precisions",
                        "fp32", "bf16", "--steps", "1", "--repeats", "1", "--out", str(tmp_path / "step")])
    rows = json.loads((tmp_path / "step.json").read_text())["rows"]
    assert [(r["precision"], r["ema"]) for r in rows] == [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]
    assert all(r["seconds_per_step"] > 0 for r in rows)
    assert "| 2 | bf16 | yes | no |" in (tmp_path / "step.md").read_text()


def test_noise_level_benchmark_measures_each_rule_on_the_pinned_validation_photos(tiny_models, tmp_path, capsys):
    import torch
    from PIL import Image

    from benchmarks import noise_level
    from pipeline.data.sources import load_folder

    from .images import rgb
    from .test_noise_level import _with_noise_estimator

    models = _with_noise_estimator(tiny_models, tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        Image.fromarray(rgb(40, 48, seed=index)).save(photos / f"p{index}.png")
    names = sorted(image.name for image in load_folder(photos, 16)[0])
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"splits": {names[0]: "train", names[1]: "val", names[2]: "val"}}))
    noise_level.main(["--models", str(models), "--photos", str(photos), "--split", str(split), "--sigmas", "25",
                      "--min-corrections", "0", "2", "--out", str(tmp_path / "nl")])
    result = json.loads((tmp_path / "nl.json").read_text())
    rows = {r["rule"]: r for r in result["rows"]}
    assert result["photos"] == 2 and list(rows) == ["analytic σ̂", "learned, min correction 0", "learned, min correction 2"]
    assert rows["learned, min correction 0"]["vs_reference"] == 0.0
    # the estimator's correction (log 3) is below 2: that rule is the analytic σ̂, image for image
    assert rows["learned, min correction 2"]["psnr"] == rows["analytic σ̂"]["psnr"] != rows["learned, min correction 0"]["psnr"]
    assert "| 25 | analytic σ̂ |" in (tmp_path / "nl.md").read_text()
    assert torch.is_grad_enabled(), "the benchmark must not switch autograd off for the process"

    noise_level.main(["--photos", str(tmp_path / "absent"), "--out", str(tmp_path / "none")])
    assert "skipped" in capsys.readouterr().out and not (tmp_path / "none.json").exists()
