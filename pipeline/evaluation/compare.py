"""A readable table of DVC experiments (``make compare``), and mean ± std over seeds (``--over-seeds``).

Reads ``dvc exp show --json``: per experiment, the params that differ between experiments and the
headline metrics (``reports/headline.json``). With ``--over-seeds``, experiments that differ only in
``seed`` are one row: mean ± std (sample std, n − 1) and the number of seeds.

    python -m pipeline.evaluation.compare                 # every experiment of the workspace's commit
    python -m pipeline.evaluation.compare --over-seeds    # the study over seeds: see README "Seeds"
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path
from typing import Any

HEADLINE = "reports/headline.json"


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value, sort_keys=True) if isinstance(value, list) else value
    return flat


def experiments(show: list[dict]) -> list[dict]:
    """``dvc exp show --json`` -> [{"name", "params": flat dict, "metrics": dict}] for the baseline commit
    and every experiment with its headline metrics."""
    rows = []

    def add(entry: dict) -> None:
        data = entry.get("data") or {}
        metrics = ((data.get("metrics") or {}).get(HEADLINE) or {}).get("data")
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
        if metrics and params:
            rev = data.get("rev", entry.get("rev", "?"))
            rows.append({"name": entry.get("name") or rev[:7], "rev": rev, "params": flatten(params), "metrics": metrics})

    for commit in show:
        if commit.get("rev") == "workspace":
            continue
        add(commit)
        for experiment in commit.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                add({**rev, "name": experiment.get("name") or rev.get("name")})
    return rows


def changed_params(rows: list[dict], ignore: tuple[str, ...] = ()) -> list[str]:
    keys = sorted({k for r in rows for k in r["params"]})
    return [k for k in keys if k not in ignore and len({json.dumps(r["params"].get(k)) for r in rows}) > 1]


def over_seeds(rows: list[dict]) -> list[dict]:
    """Experiments grouped by every changed param but ``seed``: mean ± std of each metric, one run per seed
    (a run shows up once per listed commit whose dvc.lock holds it: the first is kept)."""
    keys = changed_params(rows, ignore=("seed",))
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(json.dumps(row["params"].get(k)) for k in keys), []).append(row)
    summary = []
    for key, members in groups.items():
        members = list({m["params"]["seed"]: m for m in reversed(members)}.values())
        metrics = {}
        for name in members[0]["metrics"]:
            values = [m["metrics"][name] for m in members if m["metrics"].get(name) is not None]
            if values:
                metrics[name] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan"))
        summary.append({"params": dict(zip(keys, map(json.loads, key))), "seeds": sorted(m["params"]["seed"] for m in members),
                        "metrics": metrics})
    return summary


def table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def exp_show(json_file: str | None = None, revs: list[str] | None = None) -> list[dict]:
    """``dvc exp show --json`` for the experiments of ``revs`` (HEAD by default), or a saved copy of its output."""
    if json_file:
        return json.loads(Path(json_file).read_text())
    command = ["dvc", "exp", "show", "--json", *(arg for rev in revs or [] for arg in ("--rev", rev))]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--over-seeds", action="store_true", help="mean ± std over experiments that differ only in seed")
    parser.add_argument("--json", help="read this `dvc exp show --json` output instead of running it")
    parser.add_argument("--rev", action="append", help="the experiments of this commit (default: HEAD), e.g. the one "
                        "`make seeds` ran on; repeat it for several")
    args = parser.parse_args(argv)
    rows = experiments(exp_show(args.json, args.rev))
    if not rows:
        raise SystemExit(f"no experiment with {HEADLINE}: run `dvc repro` or `dvc exp run` first")
    names = list(rows[0]["metrics"])
    if args.over_seeds:
        summary = over_seeds(rows)
        keys = list(summary[0]["params"])
        body = [[*(str(s["params"][k]) for k in keys), str(len(s["seeds"])),
                 *(f"{s['metrics'][n][0]:.3f} ± {s['metrics'][n][1]:.3f}" if n in s["metrics"] else "-" for n in names)]
                for s in summary]
        print(table([*keys, "seeds", *names], body))
        return
    keys = changed_params(rows)
    body = [[r["name"], *(str(r["params"].get(k)) for k in keys),
             *(f"{r['metrics'][n]:.3f}" if r["metrics"].get(n) is not None else "-" for n in names)] for r in rows]
    print(table(["experiment", *keys, *names], body))


if __name__ == "__main__":
    main()
