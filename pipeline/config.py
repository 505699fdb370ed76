"""``params.yaml``: what every stage reads; composed from the Hydra groups in ``conf/``.

``compose_params`` is DVC's own composition (the one ``dvc exp run -S group=option`` runs), so the
committed ``params.yaml`` and an experiment's are written the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = "params.yaml"


def load_params(path: str | Path = PARAMS_FILE) -> DictConfig:
    """Read ``params.yaml``, validated against ``pipeline.schema`` (a ``ParamsError`` names each bad key and
    its allowed range), as a read-only config in struct mode (a misspelt key is an error, not None)."""
    from pipeline.schema import validate

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run from the project root, or compose it with `make params`")
    params = OmegaConf.load(path)
    validate(OmegaConf.to_container(params, resolve=True), source=str(path))
    OmegaConf.set_struct(params, True)
    OmegaConf.set_readonly(params, True)
    return params


def stage_params(path: str | Path = PARAMS_FILE) -> DictConfig:
    """``load_params`` for a stage's ``main``: a missing or invalid file ends the process with its message
    alone (no traceback), before the stage imports its models or reads any data."""
    from pipeline.schema import ParamsError

    try:
        return load_params(path)
    except (FileNotFoundError, ParamsError) as error:
        raise SystemExit(str(error)) from None


def adapter_settings(params: DictConfig, degradation: str) -> dict:
    """The LoRA of one degradation (``rank``, ``alpha``, ``targets``, ``t_star``): ``lora.adapter``,
    overridden by ``degradations.<d>.adapter`` (its ``train`` entry excluded)."""
    if degradation not in params.degradations:
        raise KeyError(f"unknown degradation {degradation!r}; configured: {sorted(params.degradations)}")
    merged = {**OmegaConf.to_container(params.lora.adapter, resolve=True),
              **OmegaConf.to_container(params.degradations[degradation].adapter, resolve=True)}
    merged.pop("train", None)
    return merged


def adapter_training(params: DictConfig, degradation: str) -> DictConfig:
    """How one degradation's LoRA trains: ``lora.train``, overridden by ``degradations.<d>.adapter.train``,
    where ``step_multiplier`` scales the profile's ``max_steps`` (so every profile keeps its proportions)."""
    adapter_settings(params, degradation)  # the name check
    adapter = params.degradations[degradation].adapter
    overrides = OmegaConf.to_container(adapter.train, resolve=True) if "train" in adapter else {}
    multiplier = overrides.pop("step_multiplier", 1)
    return OmegaConf.create({**OmegaConf.to_container(params.lora.train, resolve=True), **overrides,
                             "max_steps": int(round(params.lora.train.max_steps * multiplier))})


def shared_adapter_settings(params: DictConfig) -> dict:
    """The shared-LoRA baseline: the rank and alpha of all per-degradation LoRAs together, on the union of
    their target layers."""
    per_task = [adapter_settings(params, d) for d in params.degradations]
    return {"rank": sum(s["rank"] for s in per_task), "alpha": sum(s["alpha"] for s in per_task),
            "targets": sorted({t for s in per_task for t in s["targets"]})}


def total_adapter_steps(params: DictConfig) -> int:
    """The steps of all per-degradation LoRAs together: the budget of the baselines trained on the union."""
    return sum(int(adapter_training(params, d).max_steps) for d in params.degradations)


def compose_params(output: str | Path, config_dir: str | Path, overrides: list[str] | None = None) -> None:
    """Compose ``config_dir/config.yaml`` with Hydra ``overrides`` into ``output``, as DVC does."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(Path(output), str(Path(config_dir).resolve()), None, "config", str(config_dir), overrides or [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compose conf/ into params.yaml (Hydra, as `dvc exp run` does).")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. profile=smoke")
    parser.add_argument("--conf", default="conf", help="Hydra config folder")
    parser.add_argument("--out", default=PARAMS_FILE, help="file to write")
    args = parser.parse_args(argv)
    compose_params(args.out, args.conf, args.overrides)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
