import numpy as np
import json

import pytest
import torch
from diffusers import UNet2DModel

from pipeline.models.backbone import (
    OneStepReadout, build_scheduler, build_unet, downsample_factor, load_backbone, save_backbone,
)
from pipeline.models.sampling import sample


@pytest.fixture(scope="module")
def tiny(params):
    arch = {**params.backbone.architecture, "block_out_channels": [8, 16], "norm_num_groups": 4,
            "down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2}
    torch.manual_seed(0)
    return build_unet(arch), build_scheduler(params.backbone.schedule)


def test_save_and_load_round_trip_in_safetensors(tmp_path, tiny):
    unet, scheduler = tiny
    save_backbone(tmp_path, unet, scheduler)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded, loaded_scheduler = load_backbone(tmp_path)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, loaded(x, t).sample)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded_scheduler.config.beta_schedule == scheduler.config.beta_schedule


def test_load_backbone_errors_name_the_stage_or_the_problem(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="dvc repro pretrain_backbone"):
        load_backbone(tmp_path / "missing")
    gray = UNet2DModel(in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    gray.save_pretrained(tmp_path / "gray")
    with pytest.raises(ValueError, match="RGB to RGB"):
        load_backbone(tmp_path / "gray")
    (tmp_path / "other").mkdir()
    (tmp_path / "other/config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="not a UNet2DModel"):
        load_backbone(tmp_path / "other")


def test_a_user_backbone_without_scheduler_config_gets_ddpm_defaults(tmp_path, tiny):
    unet, _ = tiny
    unet.save_pretrained(tmp_path)
    _, scheduler = load_backbone(tmp_path)
    assert scheduler.config.num_train_timesteps == 1000


def test_one_step_readout_is_the_x0_prediction(tiny):
    unet, scheduler = tiny
    readout = OneStepReadout(scheduler)
    y, t = torch.randn(2, 3, 16, 16), torch.tensor([100, 400])
    with torch.no_grad():
        epsilon = unet(readout.sqrt_alpha_bar[t].view(-1, 1, 1, 1) * y, t).sample
        expected = scheduler.step(epsilon[:1], int(t[0]), (readout.sqrt_alpha_bar[t[0]] * y[:1])).pred_original_sample
        assert torch.allclose(readout(unet, y, t)[:1], expected, atol=1e-5)


def test_zero_noise_prediction_returns_the_input():
    class Zero(torch.nn.Module):
        def forward(self, x, t):
            return type("Out", (), {"sample": torch.zeros_like(x)})()

    readout = OneStepReadout(build_scheduler({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}))
    y = torch.rand(1, 3, 8, 8)
    assert torch.equal(readout(Zero(), y, torch.tensor([500])), y)


@pytest.mark.parametrize("sigma", [15, 25, 50])
def test_timestep_for_sigma_matches_the_noise_level(tiny, sigma):
    readout = OneStepReadout(tiny[1])
    t = readout.timestep_for_sigma(2 * sigma / 255)
    assert abs(float(readout.k[t]) - 2 * sigma / 255) < 0.01


def test_sample_draws_images_of_the_asked_size(tiny):
    unet, scheduler = tiny
    images = sample(unet, scheduler, count=2, size=16, steps=3, seed=0)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    assert torch.equal(images, sample(unet, scheduler, count=2, size=16, steps=3, seed=0))
    with pytest.raises(ValueError, match="multiple of"):
        sample(unet, scheduler, 1, 15, 3, 0)
    assert downsample_factor(unet) == 2


@pytest.mark.parametrize("sigma", [15, 25, 50])
def test_the_noise_level_is_estimated_within_its_stated_error(photo, sigma):
    """σ̂ of additive Gaussian noise on photo crops (0-255 scale): within 15 % + 2 of the truth (unclipped)."""
    from pipeline.models.severity import estimate_noise_sigma

    rng = np.random.default_rng(sigma)
    clean = photo.astype(np.float64) * 0.6 + 50  # away from black and white: no clipping
    noisy = torch.from_numpy(clean + rng.normal(0, sigma, clean.shape)).permute(2, 0, 1)[None]
    assert abs(float(estimate_noise_sigma(noisy)[0]) - sigma) <= 0.15 * sigma + 2


def test_noise_sigma_rule_picks_the_matching_timestep(params):
    from pipeline.models.backbone import OneStepReadout, build_scheduler
    from pipeline.models.severity import rule_timesteps

    readout = OneStepReadout(build_scheduler(params.backbone.schedule))
    torch.manual_seed(0)
    smooth = torch.linspace(-0.3, 0.3, 64).view(1, 1, 1, 64).expand(2, 3, 64, 64)
    y = smooth + torch.tensor([0.1, 0.4]).view(2, 1, 1, 1) * torch.randn(2, 3, 64, 64)
    t = rule_timesteps("noise_sigma", 999, y, readout)
    assert torch.allclose(readout.k[t], torch.tensor([0.1, 0.4]), rtol=0.15)
    assert rule_timesteps("fixed", 123, y, readout).tolist() == [123, 123]
