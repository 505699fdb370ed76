"""`make compare`: experiments from `dvc exp show --json`, and mean ± std over seeds."""

import json
import statistics

import pytest

from pipeline.evaluation.compare import experiments, main, over_seeds

from .conftest import ROOT


def _entry(rev: str, name: str, seed: int, policy: str, uir: float) -> dict:
    return {"rev": rev, "name": name, "data": {
        "params": {"params.yaml": {"data": {"seed": seed, "restoration": {"policy": policy, "undo_order": ["jpeg"]}}}},
        "metrics": {"reports/headline.json": {"data": {"uir": uir, "mt": 20.0}}}}}


SHOW = [
    {"rev": "workspace", "name": None, "data": {}},
    {**_entry("a" * 40, "main", 1, "gated", 21.0), "experiments": [
        {"name": "seed-2", "revs": [_entry("b" * 40, "seed-2", 2, "gated", 21.4)]},
        {"name": "seed-3", "revs": [_entry("c" * 40, "seed-3", 3, "gated", 21.2)]},
        {"name": "top1-1", "revs": [_entry("d" * 40, "top1-1", 1, "top1", 22.0)]},
    ]},
]


def test_experiments_are_read_with_their_params_and_headline():
    rows = experiments(SHOW)
    assert [r["name"] for r in rows] == ["main", "seed-2", "seed-3", "top1-1"]
    assert rows[1]["params"]["restoration.policy"] == "gated" and rows[1]["metrics"]["uir"] == 21.4


def test_over_seeds_groups_everything_but_the_seed():
    summary = {s["params"]["restoration.policy"]: s for s in over_seeds(experiments(SHOW))}
    assert summary["gated"]["seeds"] == [1, 2, 3]
    assert summary["gated"]["metrics"]["uir"] == pytest.approx((21.2, statistics.stdev([21.0, 21.4, 21.2])))
    assert summary["top1"]["seeds"] == [1]


def test_a_run_listed_under_two_commits_counts_once():
    later_commit = {**_entry("e" * 40, "main", 1, "gated", 21.0), "experiments": []}  # the same dvc.lock, a later commit
    summary = {s["params"]["restoration.policy"]: s for s in over_seeds(experiments([*SHOW, later_commit]))}
    assert summary["gated"]["seeds"] == [1, 2, 3]
    assert summary["gated"]["metrics"]["uir"] == pytest.approx((21.2, statistics.stdev([21.0, 21.4, 21.2])))


def test_the_table_prints(tmp_path, capsys):
    (tmp_path / "show.json").write_text(json.dumps(SHOW))
    main(["--json", str(tmp_path / "show.json"), "--over-seeds"])
    out = capsys.readouterr().out
    assert "21.200 ± 0.200" in out and "seeds" in out.splitlines()[0]


def test_rev_reads_the_experiments_of_that_commit(monkeypatch, capsys):
    import subprocess

    calls = []

    def run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, stdout=json.dumps(SHOW))

    monkeypatch.setattr("pipeline.evaluation.compare.subprocess.run", run)
    main(["--rev", "4b61e2e", "--rev", "HEAD", "--over-seeds"])
    main([])
    assert calls == [["dvc", "exp", "show", "--json", "--rev", "4b61e2e", "--rev", "HEAD"], ["dvc", "exp", "show", "--json"]]
    assert "21.200 ± 0.200" in capsys.readouterr().out


def _metrics(seed: int, uir: float) -> dict:
    table = {"uir_lora": {"psnr": uir, "ssim": 0.6}, "multitask": {"psnr": 21.0, "ssim": 0.5}}
    return {"labels": {"uir_lora": "UIR-LoRA", "multitask": "multi-task"}, "single": table, "mixed": table,
            "router": {"top1_accuracy": 0.9, "mix_recall": 0.8, "unknown_rate": 0.0, "single_given_two_or_more": 0.1,
                       "mixed_given_two_or_more": 0.5},
            "restoration": {"policy": "gated", "composition": "planned", "mix_threshold_used": 0.5}}


def test_the_results_table_over_seeds_reads_each_run_from_git(tmp_path, monkeypatch):
    """`make seeds` ends with the README table as mean ± std over the runs whose params differ in seed alone."""
    import subprocess

    import yaml

    from pipeline.evaluation.results import END, START
    from pipeline.evaluation.results import main as results

    repo = tmp_path / "repo"
    (repo / "reports").mkdir(parents=True)
    monkeypatch.chdir(repo)
    git = lambda *a: subprocess.run(["git", *a], check=True, capture_output=True, text=True).stdout.strip()  # noqa: E731
    git("init", "-q")
    git("config", "user.email", "t@t"), git("config", "user.name", "t")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    show = [{"rev": "workspace", "name": None, "data": {}}]
    revs = {}
    for seed, uir, policy in ((1, 22.0, "gated"), (2, 22.4, "gated"), (3, 21.0, "top1")):
        run_params = {**params, "seed": seed, "restoration": {**params["restoration"], "policy": policy}}
        (repo / "reports" / "metrics.json").write_text(json.dumps(_metrics(seed, uir)))
        git("add", "-A"), git("commit", "-qm", f"seed {seed}")
        revs[seed] = git("rev-parse", "HEAD")
        show.append({"rev": revs[seed], "name": f"s{seed}", "data": {
            "params": {"params.yaml": {"data": run_params}}, "metrics": {"reports/headline.json": {"data": {"uir": uir}}}}})
    (repo / "params.yaml").write_text(yaml.safe_dump({**params, "seed": 9}))
    (repo / "show.json").write_text(json.dumps(show))
    (repo / "README.md").write_text(f"# x\n{START}\nold\n{END}\nrest\n")
    results(["--over-seeds", "--json", "show.json"])
    text = (repo / "README.md").read_text()
    assert "mean ± std over 2 seeds** (1, 2;" in text  # seed 3 differs in policy: not one of them
    assert f"| UIR-LoRA | {statistics.mean([22.0, 22.4]):.2f} ± {statistics.stdev([22.0, 22.4]):.2f} |" in text.replace("**UIR-LoRA** as shipped (the candidate chosen on validation, per seed)", "UIR-LoRA")
    assert "| multi-task | 21.00 ± 0.00 | 0.500 ± 0.000 |" in text and text.endswith(f"{END}\nrest\n") and "old" not in text


def test_the_results_table_over_seeds_reads_each_run_from_its_file(tmp_path, monkeypatch):
    """Runs given as SEED=FILE (the per-seed records in reports/seeds/) make the same table as experiments."""
    from pipeline.evaluation.results import END, START
    from pipeline.evaluation.results import main as results

    monkeypatch.chdir(tmp_path)
    for seed, uir in ((1, 22.0), (2, 22.4), (5, 23.0)):
        (tmp_path / f"metrics_{seed}.json").write_text(json.dumps(_metrics(seed, uir)))
    (tmp_path / "README.md").write_text(f"# x\n{START}\nold\n{END}\n")
    results(["--params", str(ROOT / "params.yaml"), "--over-seeds", *(f"--run={s}=metrics_{s}.json" for s in (5, 1, 2))])
    text = (tmp_path / "README.md").read_text()
    assert "mean ± std over 3 seeds** (1, 2, 5;" in text
    mean, std = statistics.mean([22.0, 22.4, 23.0]), statistics.stdev([22.0, 22.4, 23.0])
    assert f"| {mean:.2f} ± {std:.2f} |" in text and "old" not in text
    with pytest.raises(FileNotFoundError, match="metrics_9.json is missing"):
        results(["--params", str(ROOT / "params.yaml"), "--over-seeds", "--run", "9=metrics_9.json"])


def test_paired_differences_are_per_seed_and_against_an_earlier_run(tmp_path, monkeypatch, capsys):
    from pipeline.evaluation.results import main as results

    monkeypatch.chdir(tmp_path)
    for seed, uir in ((1, 22.0), (2, 22.5)):
        (tmp_path / f"now_{seed}.json").write_text(json.dumps(_metrics(seed, uir)))
        (tmp_path / f"before_{seed}.json").write_text(json.dumps(_metrics(seed, 21.5)))
    args = ["--params", str(ROOT / "params.yaml"), "--over-seeds", "--run", "1=now_1.json", "--run", "2=now_2.json",
            "--paired", "uir_lora-multitask"]
    results([*args, "--before", "1=before_1.json", "--before", "2=before_2.json"])
    out = capsys.readouterr().out
    diff = [22.0 - 21.0, 22.5 - 21.0]
    assert f"`uir_lora` − `multitask`: single {statistics.mean(diff):.2f} ± {statistics.stdev(diff):.2f} (+1.00, +1.50)" in out
    assert "`uir_lora`, this run − the earlier: single 0.75 ± 0.35 (+0.50, +1.00)" in out
    assert "`multitask`, this run − the earlier: single 0.00 ± 0.00" in out
    with pytest.raises(SystemExit, match="earlier runs are of seeds"):
        results([*args, "--before", "1=before_1.json"])
    with pytest.raises(SystemExit, match="no method 'oracle' in the run.s. of seed 1, 2; methods: uir_lora, multitask"):
        results([*args[:-1], "oracle-uir_lora"])
    with pytest.raises(SystemExit, match="two method names"):
        results([*args[:-1], "uir_lora"])
