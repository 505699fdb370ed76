"""`make compare`: experiments from `dvc exp show --json`, and mean ± std over seeds."""

import json
import statistics

import pytest

from pipeline.evaluation.compare import experiments, main, over_seeds


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


def test_the_table_prints(tmp_path, capsys):
    (tmp_path / "show.json").write_text(json.dumps(SHOW))
    main(["--json", str(tmp_path / "show.json"), "--over-seeds"])
    out = capsys.readouterr().out
    assert "21.200 ± 0.200" in out and "seeds" in out.splitlines()[0]
