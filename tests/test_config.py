from collections import Counter

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ReadonlyConfigError

from pipeline.config import compose_params, load_params
from pipeline.data.sources import read_pinned_splits
from pipeline.schema import validate

from .conftest import ROOT


def test_params_yaml_is_the_composition_of_conf_defaults(tmp_path):
    composed = tmp_path / "params.yaml"
    compose_params(composed, ROOT / "conf")
    assert composed.read_text() == (ROOT / "params.yaml").read_text(), "params.yaml is stale: run `make params`"


def _compose(*overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


def test_smoke_profile_overrides_the_sizes():
    default, smoke = _compose(), _compose("profile=smoke")
    smoke_file = yaml.safe_load((ROOT / "conf/profile/smoke.yaml").read_text())
    assert smoke["profile_name"] == "smoke" and default["profile_name"] == "default"
    assert smoke["synthesis"] == smoke_file["synthesis"]
    assert smoke["synthesis"]["train_patches"] < default["synthesis"]["train_patches"]
    # everything the profile does not set is shared
    assert smoke["degradations"] == default["degradations"] and smoke["prepare"] == default["prepare"]


def test_every_profile_composes_to_the_same_keys():
    profiles = sorted(p.stem for p in (ROOT / "conf/profile").glob("*.yaml"))
    assert {"smoke", "default", "gpu", "pretrain", "pretrain_gpu"} <= set(profiles)
    shapes = {p: _compose(f"profile={p}") for p in profiles}

    def keys(d, prefix=""):
        return {prefix + k for k, v in d.items()} | {
            x for k, v in d.items() if isinstance(v, dict) for x in keys(v, f"{prefix}{k}.")
        }

    assert len({frozenset(keys(s)) for s in shapes.values()}) == 1
    for name, params in shapes.items():
        validate(params, source=f"profile={name}")  # every profile composes a valid params.yaml
        assert params["profile_name"] == name


def test_the_backbone_recipe_trains_on_cbsd432_and_the_default_profile_uses_the_shipped_backbone():
    default, recipe, gpu = _compose(), _compose("profile=pretrain"), _compose("profile=pretrain_gpu")
    assert default["backbone"]["pretrained"] == "weights/uir-lora-cbsd432/backbone"
    assert (ROOT / default["backbone"]["pretrained"] / "config.json").is_file(), "the shipped backbone is in the repo"
    assert recipe["backbone"]["pretrained"] is None and gpu["backbone"]["pretrained"] is None
    assert recipe["prepare"]["folders"] == ["../shared/data/trainsets/CBSD432"] == gpu["prepare"]["folders"]
    assert not any("testsets" in f for f in recipe["prepare"]["folders"]), "never train on the test sets"
    assert recipe["backbone"]["architecture"] == default["backbone"]["architecture"] == gpu["backbone"]["architecture"]
    assert gpu["trainer"]["precision"] == "bf16-mixed" and gpu["trainer"]["accelerator"] == "gpu"
    assert _compose("profile=smoke")["backbone"]["pretrained"] is None, "the smoke run trains its own, in seconds"


def test_the_shipped_adapters_recipe_splits_the_photos_as_the_backbone_recipe_did():
    """Its validation photos, which choose the shipped restoration settings, are unseen by the shipped backbone."""
    default, backbone, adapters = _compose(), _compose("profile=pretrain"), _compose("profile=pretrain_adapters")
    assert adapters["prepare"] == backbone["prepare"] and adapters["seed"] == backbone["seed"]
    pin = read_pinned_splits(ROOT / backbone["prepare"]["split"]["pinned"])
    assert len(pin) == 444 and sorted(Counter(pin.values()).values()) == [75, 112, 257], "the shipped backbone's split"
    assert not any("testsets" in f for f in adapters["prepare"]["folders"]), "never train on the test sets"
    for section in ("backbone", "router"):
        assert adapters[section]["pretrained"] == default[section]["pretrained"] is not None, "trained on the shipped ones"
    assert adapters["degradations"] == default["degradations"] and adapters["lora"] == default["lora"]


def test_the_router_recipe_pins_the_split_the_shipped_router_was_calibrated_on():
    pin = read_pinned_splits(ROOT / _compose("profile=pretrain_router")["prepare"]["split"]["pinned"])
    assert len(pin) == 432 and sorted(Counter(pin.values()).values()) == [22, 86, 324]


def test_load_params_is_strict_and_read_only():
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(ConfigAttributeError, match="no_such_key"):
        params.synthesis.no_such_key
    with pytest.raises(ReadonlyConfigError):
        params.seed = 1


def test_missing_params_file_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make params"):
        load_params(tmp_path / "params.yaml")


def test_per_degradation_adapter_and_training_overrides():
    from pipeline.config import adapter_settings, adapter_training, total_adapter_steps

    params = load_params(ROOT / "params.yaml")
    blur, noise = adapter_settings(params, "blur"), adapter_settings(params, "noise")
    assert "train" not in blur and blur["rank"] == params.degradations.blur.adapter.rank
    assert noise["rank"] == params.lora.adapter.rank and noise["t_star"] == params.degradations.noise.adapter.t_star
    multiplier = params.degradations.blur.adapter.train.step_multiplier
    assert adapter_training(params, "blur").max_steps == round(multiplier * params.lora.train.max_steps)
    assert adapter_training(params, "blur").lr == params.degradations.blur.adapter.train.lr
    assert adapter_training(params, "noise").max_steps == params.lora.train.max_steps
    assert adapter_training(params, "noise").batch_size == adapter_training(params, "blur").batch_size
    assert total_adapter_steps(params) == sum(adapter_training(params, d).max_steps for d in params.degradations)
    with pytest.raises(KeyError, match="unknown degradation 'snow'"):
        adapter_training(params, "snow")


@pytest.mark.parametrize("key,value,message", [
    ("degradations.noise.adapter.t_star", -5, "degradations.noise.adapter.t_star = -5: must be in [0, 999]"),
    ("lora.train.max_steps", 0, "lora.train.max_steps = 0: Input should be greater than or equal to 1"),
    ("restoration.policy", "top3", "restoration.policy = 'top3'"),
    ("restoration.top_k", 0, "restoration.top_k = 0"),
    ("router.temperature", -1.0, "router.temperature = -1.0"),
    ("synthesis.eval_crop", 130, "synthesis.eval_crop = 130: must be a multiple of 4"),
    ("mixed", [["noise", "snow"]], "unknown: ['snow']"),
    ("lora.train.lr", "fast", "lora.train.lr = 'fast'"),
    ("lora.adapter.rankk", 8, "lora.adapter.rankk = 8: Extra inputs are not permitted"),
    ("router.train.tone_patches", 512, "router.train.tone_patches > 0 needs router.train.tone"),
    ("router.train.tone", {"gamma": [1.4, 0.7], "gain": [0.8, 1.0]}, "tone.gamma must be a range [low, high]"),
])
def test_bad_params_are_refused_with_the_key_and_the_allowed_range(tmp_path, key, value, message):
    from pipeline.schema import ParamsError

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    *parents, leaf = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[leaf] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError) as error:
        load_params(tmp_path / "params.yaml")
    assert message in str(error.value)


def test_a_stage_refuses_bad_params_before_importing_torch(tmp_path):
    """The stage validates first: with torch made unimportable it still ends with the schema's one line."""
    import subprocess
    import sys

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["degradations"]["noise"]["adapter"]["t_star"] = -5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code = ("import sys; sys.modules['torch'] = None; from pipeline.stages import train_lora; "
            f"train_lora.main(['noise', '--params', {str(tmp_path / 'params.yaml')!r}, '--data', 'd', '--out', 'o', "
            "'--metrics', 'm', '--checkpoints', 'c'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().endswith("degradations.noise.adapter.t_star = -5: must be in [0, 999] "
                                          "(backbone.schedule.num_train_timesteps - 1)")
    assert "Traceback" not in result.stderr


def test_restoration_defaults_in_conf_and_in_code_agree(params):
    from pipeline.models.restorer import RestorationSettings

    assert RestorationSettings.from_params(params.restoration) == RestorationSettings()
