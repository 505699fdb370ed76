import numpy as np
import pytest

from pipeline.data.degradations import AtmosphericHaze, Degradation, build_transform, sample_seed

from .conftest import psnr

# PSNR (dB) of the degraded against the clean crop: every sample must fall in the band.
BANDS = [
    ("noise", 14, 27),
    ("blur", 17, 33),
    ("jpeg", 23, 37),
    ("lowlight", 3, 17),
    ("haze", 7, 23),
    ("rain", 13, 25),
    ("noise+blur", 16, 30),
    ("blur+noise+jpeg", 14, 30),
]


@pytest.mark.parametrize("name,low,high", BANDS)
def test_degradation_changes_the_image_within_its_band(params, photo, name, low, high):
    degradation = Degradation.from_params(params.degradations, name)
    for seed in range(8):
        degraded, applied = degradation(photo, seed)
        assert degraded.shape == photo.shape and degraded.dtype == np.uint8
        assert low <= psnr(degraded, photo) <= high, (name, seed, psnr(degraded, photo))
        assert applied and {a["degradation"] for a in applied} <= set(name.split("+"))


@pytest.mark.parametrize("name", ["noise", "blur", "jpeg", "lowlight", "haze", "rain", "haze+rain"])
def test_degradation_is_deterministic_under_its_seed(params, photo, name):
    first = Degradation.from_params(params.degradations, name)
    second = Degradation.from_params(params.degradations, name)  # a fresh pipeline, as in another process
    a, params_a = first(photo, 7)
    b, params_b = second(photo, 7)
    c, _ = first(photo, 8)
    assert np.array_equal(a, b) and params_a == params_b
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("shape", [(37, 53), (32, 32), (129, 67), (200, 33)])
@pytest.mark.parametrize("name", ["noise", "blur", "jpeg", "lowlight", "haze", "rain"])
def test_degradation_accepts_odd_sizes(params, name, shape):
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    degraded, _ = Degradation.from_params(params.degradations, name)(image, 3)
    assert degraded.shape == image.shape


def test_applied_parameters_record_what_was_sampled(params, photo):
    _, applied = Degradation.from_params(params.degradations, "jpeg")(photo, 1)
    (record,) = applied
    assert record["transform"] == "ImageCompression" and 10 <= record["quality"] <= 40
    _, applied = Degradation.from_params(params.degradations, "noise")(photo, 1)
    sigma = applied[0]["noise_map"]["std"]  # realised noise level on the 0..255 scale
    assert 13 <= sigma <= 52


def test_unknown_degradation_is_a_clear_error(params):
    with pytest.raises(KeyError, match="unknown degradation.*'snow'.*configured"):
        Degradation.from_params(params.degradations, "noise+snow")


def test_bad_transform_spec_names_the_degradation():
    with pytest.raises(ValueError, match="degradation 'bad'"):
        build_transform("bad", {"transform": {"__class_fullname__": "NoSuchTransform", "p": 1.0}})
    with pytest.raises(ValueError, match="no 'transform'"):
        build_transform("bad", {"description": "x"})


def test_degradation_rejects_non_rgb8_input(params):
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        Degradation.from_params(params.degradations, "noise")(np.zeros((8, 8), np.uint8), 0)


def test_haze_follows_the_scattering_model(photo):
    haze = AtmosphericHaze(beta_range=(1.0, 1.0), airlight_range=(0.9, 0.9))
    haze.set_random_seed(0)
    hazy = haze(image=photo)["image"].astype(np.float64) / 255
    t = haze.params["transmission"][..., None]
    expected = photo / 255 * t + 0.9 * (1 - t)
    assert np.abs(hazy - expected).max() <= 1 / 255 + 1e-9
    assert 0 < t.min() < t.max() <= 1


def test_sample_seed_is_stable():
    assert sample_seed(1, "noise", "test", 3) == sample_seed(1, "noise", "test", 3)
    assert sample_seed(1, "noise", "test", 3) != sample_seed(1, "noise", "test", 4)
    assert sample_seed(1, "noise") == 2016012899  # fixed across processes and machines
