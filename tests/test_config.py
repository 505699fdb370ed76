import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ReadonlyConfigError

from pipeline.config import compose_params, load_params

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


def test_every_profile_sets_the_same_keys():
    profiles = sorted(p.stem for p in (ROOT / "conf/profile").glob("*.yaml"))
    assert {"smoke", "default", "gpu"} <= set(profiles)
    shapes = {p: OmegaConf.to_container(OmegaConf.load(ROOT / f"conf/profile/{p}.yaml")) for p in profiles}

    def keys(d, prefix=""):
        return {prefix + k for k, v in d.items()} | {
            x for k, v in d.items() if isinstance(v, dict) for x in keys(v, f"{prefix}{k}.")
        }

    assert len({frozenset(keys(s)) for s in shapes.values()}) == 1


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
