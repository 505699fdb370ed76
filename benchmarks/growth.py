"""The wall time of ``dvc repro`` after adding one degradation, stage by stage, in a throw-away clone.

The clone shares this workspace's DVC cache, checks out the trained outputs, gets one new
degradation in ``params.yaml`` (multiplicative speckle noise, trained like ``noise``) and runs
``dvc repro``; each ``Running stage`` line is timestamped as it is printed.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import yaml

NEW = "speckle"


def add_degradation(params: dict, like: str = "noise") -> dict:
    """``params`` with ``speckle`` added: ``like``'s adapter settings, a MultiplicativeNoise transform. A
    ``router.pretrained`` routes only to the degradations it was trained on (``fit_router`` refuses it), so the
    router is trained in the run instead, on its ``router.train`` settings: part of what one more costs."""
    params = copy.deepcopy(params)
    params["router"]["pretrained"] = None
    entry = copy.deepcopy(params["degradations"][like])
    entry["description"] = "multiplicative speckle noise"
    entry["transform"] = {"__class_fullname__": "Compose", "p": 1.0, "transforms": [
        {"__class_fullname__": "MultiplicativeNoise", "p": 1.0, "multiplier": [0.7, 1.3], "per_channel": True,
         "elementwise": True}]}
    params["degradations"][NEW] = entry
    return params


def _run(args: list[str], cwd: Path, env: dict) -> None:
    subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True, text=True)


def timed_repro(project: Path) -> dict:
    """Per-stage and total wall time of the growth ``dvc repro`` (seconds)."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "WANDB_MODE": "offline"}
    dvc = [sys.executable, "-m", "dvc"]
    with tempfile.TemporaryDirectory(prefix="uir-growth-") as tmp:
        clone = Path(tmp) / "clone"
        _run(["git", "clone", "-q", str(project), str(clone)], Path(tmp), env)
        _run([*dvc, "cache", "dir", "--local", str((project / ".dvc" / "cache").resolve())], clone, env)
        _run([*dvc, "checkout"], clone, env)
        params_file = clone / "params.yaml"
        params_file.write_text(yaml.safe_dump(add_degradation(yaml.safe_load(params_file.read_text())), sort_keys=False))
        stages, current, started, tail = {}, None, time.perf_counter(), deque(maxlen=40)
        process = subprocess.Popen([*dvc, "repro"], cwd=clone, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        restored = []
        for line in process.stdout:
            tail.append(line)
            cached = line.startswith("Stage '") and "is cached" in line  # outputs restored from DVC's run cache
            if line.startswith("Running stage '") or cached:
                now = time.perf_counter()
                if current:
                    stages[current] = now - stage_start
                current, stage_start = line.split("'")[1], now
                if cached:
                    restored.append(current)
        if process.wait() != 0:
            raise RuntimeError("the growth `dvc repro` failed; its last lines:\n" + "".join(tail))
        total = time.perf_counter() - started
        if current:
            stages[current] = time.perf_counter() - stage_start
    return {"degradation": NEW, "stages": stages, "restored": restored, "total_seconds": total, **summary(stages)}


BASELINES_AND_EVALUATION = ("train_multitask", "train_shared_lora", "evaluate")


def summary(stages: dict[str, float]) -> dict:
    """UIR-LoRA's own part of a growth run: every stage but the baselines' and the evaluation (its data, its
    LoRA, noise level estimator, router and restoration settings)."""
    return {"uir_lora_seconds": sum(v for k, v in stages.items() if k not in BASELINES_AND_EVALUATION),
            "multitask_seconds": stages.get("train_multitask"), "trained_loras": [s for s in stages if s.startswith("train_lora@")]}
