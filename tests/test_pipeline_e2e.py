"""The whole pipeline through DVC on the smoke profile, in a throw-away copy of the repository."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import ROOT

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _dvc(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], cwd, env)


def _out_hashes(repo: Path, stage: str, lock_text: str | None = None) -> dict[str, str]:
    """The md5 of each output of ``stage`` in ``dvc.lock`` (or in ``lock_text``), W&B pointers left out."""
    lock = yaml.safe_load(lock_text if lock_text is not None else (repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for o in lock["stages"][stage]["outs"] if not o["path"].startswith("reports/wandb/")}


def _changed_stages(repo: Path, env: dict[str, str]) -> set[str]:
    return set(json.loads(_dvc("status", "--json", cwd=repo, env=env).stdout))


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory):
    """A git copy of the project's tracked files, after `dvc exp run -S profile=smoke`."""
    repo = tmp_path_factory.mktemp("uir") / "repo"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # stages call `python`
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
        "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1",
    }
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "copy"], repo, env)
    _dvc("exp", "run", "-S", "profile=smoke", cwd=repo, env=env)
    return repo, env


def test_exp_run_composes_the_smoke_profile(smoke_repo):
    repo, _ = smoke_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    smoke = yaml.safe_load((ROOT / "conf/profile/smoke.yaml").read_text())
    assert params["profile_name"] == "smoke" and params["synthesis"] == smoke["synthesis"]


def test_data_stages_write_every_split_with_manifests(smoke_repo):
    repo, _ = smoke_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    sizes = params["synthesis"]
    counts = {"train": sizes["train_patches"], "val": sizes["val_crops"], "test": sizes["test_crops"]}
    for name in params["degradations"]:
        for split, count in counts.items():
            folder = repo / "data/degraded" / name / split
            records = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
            assert len(records) == count
            assert all((folder / r["lq"]).is_file() and (folder / r["gt"]).is_file() for r in records)
            assert all(r["params"] and r["degradation"] == name for r in records)
    for mix in params["mixed"]:
        assert (repo / "data/mixed" / "+".join(mix) / "test/manifest.jsonl").is_file()
    manifest = json.loads((repo / "data/clean/manifest.json").read_text())
    split_of = {r["name"]: r["split"] for r in manifest["images"]}
    train_sources = {json.loads(line)["source"] for line in
                     (repo / "data/degraded/noise/train/manifest.jsonl").read_text().splitlines()}
    test_sources = {json.loads(line)["source"] for line in
                    (repo / "data/degraded/noise/test/manifest.jsonl").read_text().splitlines()}
    assert {split_of[s] for s in train_sources} == {"train"} and {split_of[s] for s in test_sources} == {"test"}


def test_second_repro_is_up_to_date_and_reruns_are_identical(smoke_repo):
    repo, env = smoke_repo
    out = _dvc("repro", cwd=repo, env=env).stdout
    assert "Running stage" not in out and "up to date" in out
    lock_before = (repo / "dvc.lock").read_text()
    _dvc("repro", "--force", "--single-item", "synthesize@haze", cwd=repo, env=env)
    assert (repo / "dvc.lock").read_text() == lock_before, "same params and seed must give the same bytes"
    assert _changed_stages(repo, env) == set()

    weights = repo / "models/loras/noise/adapter_model.safetensors"
    weights_before, metrics_before = weights.read_bytes(), (repo / "reports/train_lora/noise.json").read_text()
    shutil.rmtree(repo / "checkpoints/train_lora/noise")  # train from scratch, not resume the finished run
    _dvc("repro", "--force", "--single-item", "train_lora@noise", cwd=repo, env=env)
    assert weights.read_bytes() == weights_before, "retraining gives the same adapter weights, byte for byte"
    assert (repo / "reports/train_lora/noise.json").read_text() == metrics_before
    assert _out_hashes(repo, "train_lora@noise") == _out_hashes(repo, "train_lora@noise", lock_before), \
        "every output but the new W&B run's pointer is byte-identical, the whole adapter folder included"


def test_changing_one_degradation_invalidates_only_its_stages(smoke_repo):
    repo, env = smoke_repo
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["degradations"]["jpeg"]["transform"]["transforms"][0]["quality_range"] = [20, 50]
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        changed = _changed_stages(repo, env)
    finally:
        params_file.write_text(original)
    assert {s for s in changed if s.startswith("synthesize@")} == {"synthesize@jpeg"}
    assert not {s for s in changed if s.startswith("train_lora@")}, "no other adapter retrains"
    # the mixes, and whatever reads every degradation's definition (baselines on the union, the noise level
    # estimator's mixed patches, router, evaluation)
    assert changed == {"synthesize@jpeg", "synthesize_mixed", "train_multitask", "train_shared_lora", "fit_noise_level",
                       "fit_router", "select_restoration", "evaluate"}


def test_models_are_on_disk_in_their_formats(smoke_repo):
    repo, _ = smoke_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert (repo / "models/backbone/diffusion_pytorch_model.safetensors").is_file()
    assert (repo / "models/backbone/scheduler_config.json").is_file()
    for name in params["degradations"]:
        adapter = repo / "models/loras" / name
        assert {"adapter_config.json", "adapter_model.safetensors", "restoration.json"} <= {p.name for p in adapter.iterdir()}
    assert (repo / "models/baselines/multitask/diffusion_pytorch_model.safetensors").is_file()
    assert (repo / "models/baselines/shared_lora/adapter_model.safetensors").is_file()
    assert {p.name for p in (repo / "models/router").iterdir()} == {"config.json", "model.safetensors", "README.md"}
    noise_sigma = [d for d, c in params["degradations"].items() if c["adapter"].get("timestep") == "noise_sigma"]
    assert noise_sigma and sorted(p.name for p in (repo / "models/noise_level").iterdir()) == sorted(noise_sigma)
    for name in noise_sigma:
        assert {p.name for p in (repo / "models/noise_level" / name).iterdir()} == {"config.json", "model.safetensors", "README.md"}
    assert (repo / "reports/backbone_samples.png").is_file()


def test_every_training_and_evaluation_stage_points_at_its_wandb_run(smoke_repo):
    repo, _ = smoke_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    stages = ["pretrain_backbone", "train_multitask", "train_shared_lora", "fit_noise_level", "fit_router", "evaluate"]
    stages += [f"train_lora@{d}" for d in params["degradations"]]
    experiment = json.loads((repo / "reports/wandb/pretrain_backbone.json").read_text())["group"]
    assert experiment and not experiment.startswith("repro-"), "the `dvc exp run` names the group"
    for stage in stages:
        pointer = json.loads((repo / "reports/wandb" / f"{stage}.json").read_text())
        assert pointer["name"] == stage and pointer["mode"] == "offline"
        # the DVC experiment's name, or repro-<rev> for a stage a plain `dvc repro` reran (another test may have)
        assert pointer["group"] == experiment or pointer["group"].startswith("repro-")
        assert list((repo / pointer["dir"]).glob("*.wandb")), stage


METHODS = ["input", "oracle_sequential", "oracle_weights", "oracle_planned", "oracle_analytic", "uir_lora",
           "uir_lora_top1", "uir_lora_gated_sequential", "uir_lora_gated_weights", "uir_lora_gated_planned", "uir_lora_confirmed",
           "uir_lora_paper", "uir_lora_analytic", "multitask", "shared_lora"]


def test_evaluation_writes_every_output(smoke_repo):
    repo, env = smoke_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    for kind in ("single", "mixed"):
        assert list(metrics[kind]) == METHODS
        assert all({"psnr", "ssim"} == set(v) for v in metrics[kind].values())
    assert 0 <= metrics["router"]["top1_accuracy"] <= 1 and 0 <= metrics["router"]["mix_recall"] <= 1
    selection = json.loads((repo / "reports/select_restoration.json").read_text())
    chosen = selection["candidates"][selection["chosen"]]
    # the one-standard-error rule: within one standard error of the best on validation, the fewest adapters
    best = max(c["mean_psnr"] for c in selection["candidates"])
    close = [c for c in selection["candidates"] if best - c["mean_psnr"] <= c["standard_error_to_best"]]
    assert chosen in close and chosen["adapters_per_image"] == min(c["adapters_per_image"] for c in close)
    assert len(selection["candidates"]) == len(params["restoration"]["candidates"])
    assert metrics["restoration"]["policy"] == chosen["settings"]["policy"] == \
        json.loads((repo / "models/restoration.json").read_text())["policy"]
    limits = json.loads((repo / "models/restoration.json").read_text())["ceilings"]
    assert set(limits) == set(params["restoration"]["ceiling_adapters"]) & set(params["degradations"]) == {"lowlight"}
    assert all(0 < v <= 1 for v in limits.values())
    single = (repo / "reports/single.csv").read_text().splitlines()
    mixed = (repo / "reports/mixed.csv").read_text().splitlines()
    assert single[0].split(",") == ["set", *METHODS]
    assert len(single) == 1 + len(params["degradations"]) and len(mixed) == 1 + len(params["mixed"])
    for chart in ("psnr.png", "router_confusion.png"):
        assert (repo / "reports/plots" / chart).stat().st_size > 1000
    sets = list(params["degradations"]) + ["+".join(m) for m in params["mixed"]]
    assert {p.stem for p in (repo / "reports/samples").glob("*.png")} == set(sets)
    shown = _dvc("metrics", "show", cwd=repo, env={**env, "COLUMNS": "100"}).stdout
    assert "uir_mix" in shown and "oracle" in shown
    assert max(len(line) for line in shown.splitlines()) <= 100, "dvc metrics show fits a 100-column terminal"


def test_evaluation_reports_uir_lora_exactly_as_uir_restore_writes_it(smoke_repo, tmp_path):
    """The same test crops through the CLI: the PSNR of what `uir restore` writes equals evaluate's."""
    import csv

    import numpy as np

    from pipeline.images import read_image

    repo, env = smoke_repo
    folder = repo / "data/mixed/noise+blur/test"
    records = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()][:3]
    out = tmp_path / "restored"
    _run([sys.executable, "-m", "pipeline.cli", "restore", *[str(folder / r["lq"]) for r in records], "-o", str(out),
          "--engine", "torch"],  # the evaluation runs PyTorch; ONNX Runtime agrees within 1e-3 (test_export.py)
         repo, env)
    with open(repo / "reports/per_image.csv") as f:
        expected = {int(r["index"]): float(r["psnr"]) for r in csv.DictReader(f)
                    if r["set"] == "noise+blur" and r["method"] == "uir_lora"}
    for index, record in enumerate(records):
        restored = read_image(out / Path(record["lq"]).name).astype(np.float64)
        clean = read_image(folder / record["gt"]).astype(np.float64)
        psnr = 10 * np.log10(255.0**2 / np.mean((restored - clean) ** 2))
        assert psnr == pytest.approx(expected[index], abs=1e-3)


def test_a_baseline_is_added_by_touching_two_files(smoke_repo):
    """A new baseline: a `baselines.<name>` entry in params.yaml and a stage in dvc.yaml; `evaluate` finds its
    folder, and it appears in metrics.json and the results table."""
    from pipeline.config import load_params
    from pipeline.evaluation.results import results_markdown

    repo, env = smoke_repo
    params_file, dvc_file = repo / "params.yaml", repo / "dvc.yaml"
    originals = params_file.read_text(), dvc_file.read_text()
    params = yaml.safe_load(originals[0])
    params["baselines"]["multitask_slow"] = {**copy.deepcopy(params["baselines"]["multitask"]), "label": "multi-task, lr / 10"}
    params["baselines"]["multitask_slow"]["train"]["lr"] /= 10
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    stages = yaml.safe_load(originals[1])
    stages["stages"]["train_multitask_slow"] = {
        **stages["stages"]["train_multitask"],
        "cmd": "python -m pipeline.stages.train_multitask --name multitask_slow --data data/degraded --backbone models/backbone",
        "params": ["seed", "degradations", "lora.train.max_steps", "baselines.multitask_slow", "trainer"],
        "outs": ["models/baselines/multitask_slow", {"reports/train_multitask_slow.json": {"cache": False}},
                 {"reports/wandb/train_multitask_slow.json": {"cache": False}}],
    }
    dvc_file.write_text(yaml.safe_dump(stages, sort_keys=False))
    try:
        out = _dvc("repro", cwd=repo, env=env).stdout
        assert {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")} == \
            {"train_multitask_slow", "evaluate"}
        metrics = json.loads((repo / "reports/metrics.json").read_text())
        assert "multitask_slow" in metrics["single"] and "multitask_slow" in metrics["mixed"]
        assert "| multi-task, lr / 10 |" in results_markdown(metrics, load_params(params_file), "docs/sample.png")
    finally:
        params_file.write_text(originals[0])
        dvc_file.write_text(originals[1])
        shutil.rmtree(repo / "models/baselines/multitask_slow", ignore_errors=True)
        _dvc("repro", cwd=repo, env=env)


def test_an_inference_setting_reruns_only_the_selection_and_the_evaluation(smoke_repo):
    repo, env = smoke_repo
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "--allow-empty", "-m", "smoke baseline"], repo, env)
    # A policy other than the one validation chose, so that the shipped restoration surely changes: `topk` gives
    # every image two adapters, `top1` one. DVC composes conf/ afresh for every experiment: name the profile again.
    chosen = json.loads((repo / "models/restoration.json").read_text())["policy"]
    policy = ["restoration.policy=top1"] if chosen == "topk" else ["restoration.policy=topk", "restoration.composition=weights"]
    overrides = [arg for setting in ["profile=smoke", "restoration.choose_on_validation=false", *policy] for arg in ("-S", setting)]
    out = _dvc("exp", "run", *overrides, cwd=repo, env=env).stdout
    assert {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")} == \
        {"select_restoration", "evaluate"}
    diff = _dvc("metrics", "diff", "--md", cwd=repo, env=env).stdout
    assert "reports/headline.json" in diff and "uir_mix" in diff


def test_retrain_pushes_to_a_remote_and_a_fresh_clone_pulls_up_to_date(smoke_repo, tmp_path):
    """`make retrain`'s script against a local DVC remote: push, then a fresh clone pulls everything."""
    repo, env = smoke_repo
    remote = tmp_path / "remote"
    (repo / ".venv").symlink_to(Path(sys.executable).parent.parent, target_is_directory=True)
    try:
        result = _run(["bash", "scripts/retrain.sh"], repo, {**env, "DVC_REMOTE_URL": str(remote)})
    finally:
        (repo / ".venv").unlink()
    assert "Running stage" not in result.stdout, "everything was up to date: nothing retrains"
    assert any(remote.rglob("*")), "the outputs were pushed"
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "--allow-empty", "-m", "after retrain"], repo, env)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    _dvc("remote", "add", "--local", "--default", "ci", str(remote), cwd=clone, env=env)
    _dvc("pull", cwd=clone, env=env)
    assert _changed_stages(clone, env) == set()
    assert (clone / "models/router/model.safetensors").is_file()


@pytest.mark.parametrize("resume", ["repro", "exp run"])
def test_a_killed_training_stage_resumes_at_the_next_run(smoke_repo, resume):
    """SIGKILL `dvc repro` (and its stage) once a checkpoint exists; the next `dvc repro` or `dvc exp run`
    resumes from that checkpoint and ends with the uninterrupted run's adapter, byte for byte. `dvc exp run`
    force-checks-out the outputs of what it runs: a checkpoint folder declared as an output (even
    `persist`) was wiped by it, and a 2-hour run restarted from step 0."""
    repo, env = smoke_repo
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    # Long enough to be killed mid-training. Composed as `dvc exp run` composes it, so that both resumes see
    # the killed run's params (an earlier test may have left other params in the workspace).
    overrides = ["profile=smoke", "lora.train.max_steps=120", "lora.train.val_every=8"]
    _run([sys.executable, "-m", "pipeline.config", *overrides], repo, env)
    checkpoints, adapter = repo / "checkpoints/train_lora/noise", repo / "models/loras/noise"
    metrics = repo / "reports/train_lora/noise.json"
    try:
        _dvc("repro", "--single-item", "train_lora@noise", cwd=repo, env=env)
        reference = (adapter / "adapter_model.safetensors").read_bytes(), metrics.read_text()

        shutil.rmtree(checkpoints)
        process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "train_lora@noise"],
                                   cwd=repo, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not (checkpoints / "last.ckpt").exists():
            assert process.poll() is None and time.monotonic() < deadline, "the stage ended before its first checkpoint"
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        step = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
        assert 0 < step < 120
        assert not adapter.exists(), "no output of the killed run exists, complete or partial"
        assert not list(adapter.parent.glob(".noise.*")), "no temporary folder is left behind"

        if resume == "repro":
            out = _dvc("repro", "--single-item", "train_lora@noise", cwd=repo, env=env).stdout
        else:  # DVC composes conf/ afresh for an experiment: the same params, given as overrides
            out = _dvc("exp", "run", "--single-item", "train_lora@noise",
                       *[a for o in overrides for a in ("-S", o)], cwd=repo, env=env).stdout
        assert f"resuming from checkpoints/train_lora/noise/last.ckpt at step {step}" in out, \
            "it resumes where the killed run stopped, not from a checked-out checkpoint"
        assert (adapter / "adapter_model.safetensors").read_bytes() == reference[0]
        assert metrics.read_text() == reference[1]
    finally:
        params_file.write_text(original)
        _dvc("repro", "--single-item", "train_lora@noise", cwd=repo, env=env)
    assert _changed_stages(repo, env) == set()


def test_adding_a_degradation_trains_exactly_one_new_lora(smoke_repo):
    repo, env = smoke_repo
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    speckle = json.loads(json.dumps(params["degradations"]["noise"]))
    speckle["description"] = "multiplicative speckle noise"
    speckle["transform"]["transforms"] = [{"__class_fullname__": "MultiplicativeNoise", "p": 1.0,
                                           "multiplier": [0.7, 1.3], "per_channel": True, "elementwise": True}]
    params["degradations"]["speckle"] = speckle
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        out = _dvc("repro", cwd=repo, env=env).stdout
    finally:
        params_file.write_text(original)
    trained = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage 'train_lora@")}
    assert trained == {"train_lora@speckle"}
    assert "Running stage 'synthesize@noise'" not in out and "Running stage 'pretrain_backbone'" not in out
    assert (repo / "models/loras/speckle/adapter_model.safetensors").is_file()
    router = json.loads((repo / "models/router/config.json").read_text())
    assert "speckle" in router["names"]


def test_offline_plots_page_loads_nothing_from_the_network(smoke_repo, tmp_path):
    from pipeline.evaluation.offline_plots import BUILDS

    repo, env = smoke_repo
    for name, build in BUILDS.items():  # stand-ins for the npm builds `make plots` installs
        (tmp_path / name / build).parent.mkdir(parents=True)
        (tmp_path / name / build).write_text(f"/* {name} */")
    _run([sys.executable, "-m", "pipeline.evaluation.offline_plots", "--node-modules", str(tmp_path), "--out",
          str(tmp_path / "html")], repo, env)
    page = (tmp_path / "html/index.html").read_text()
    assert "/* vega-lite */" in page and "Test PSNR (dB), mixed degradations" in page
    assert "cdn.jsdelivr" not in page and "<script src=" not in page
