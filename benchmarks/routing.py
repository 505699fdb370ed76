"""What the router decides on real photographs — clean ones, and each benchmark's degraded ones — as
``uir restore`` would: left as they are (found clean, or an unknown degradation), or which adapters."""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from benchmarks.testsets import Benchmark
from pipeline.models.restorer import Analysis, UniversalRestorer

CLEAN = "clean"


def decision(analysis: Analysis) -> str:
    """``clean``, ``unknown``, or the adapters applied, ``+``-joined by name."""
    if analysis.clean:
        return CLEAN
    if analysis.unknown:
        return "unknown"
    return "+".join(sorted(analysis.weights))


def _row(name: str, truth: str, images: Iterable[np.ndarray], restorer: UniversalRestorer) -> dict:
    analyses = [restorer.analyse(image) for image in images]
    decisions = Counter(decision(a) for a in analyses)
    wanted = "+".join(sorted(truth.split("+")))
    return {"benchmark": name, "truth": truth, "images": len(analyses), "as_truth": decisions[wanted],
            "unchanged": sum(a.unchanged for a in analyses), "decisions": dict(decisions.most_common())}


def run(benchmarks: Sequence[Benchmark], clean_sets: dict[str, list[np.ndarray]], restorer: UniversalRestorer) -> list[dict]:
    """One row per clean set (truth ``clean``) and per benchmark (truth: its degradation)."""
    jobs = [(f"{name} clean", CLEAN, images) for name, images in clean_sets.items()]
    jobs += [(bench.name, bench.cases[0].truth, [case.degraded for case in bench.cases]) for bench in benchmarks if bench.cases]
    return [_row(name, truth, images, restorer) for name, truth, images in tqdm(jobs, desc="routing", unit="set")]
