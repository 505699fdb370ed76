"""``python -m benchmarks``: run the benchmarks on the trained ``models/`` and write the report.

Writes ``reports/benchmarks.json`` (every figure) and ``reports/benchmarks.md``; ``--readme`` also
replaces README's Performance section with the markdown. Test sets are read from
``../shared/data/testsets`` (``--testsets``); a missing set is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchmarks import growth, quality, routing, speed
from benchmarks.report import markdown, write_report
from benchmarks.testsets import DEFAULT_ROOT, benchmarks, load_set
from pipeline.config import load_params
from pipeline.evaluation.methods import load_methods
from pipeline.files import atomic_path

SECTIONS = ("quality", "routing", "speed", "engines", "storage", "growth")
README_START, README_END = "<!-- performance:start -->", "<!-- performance:end -->"


def machine() -> dict:
    cpu = "unknown"
    if Path("/proc/cpuinfo").is_file():
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models", default="models")
    parser.add_argument("--testsets", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--images", type=int, default=4, help="images per test set (0: all)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=["quality", "speed", "engines", "storage"],
                        help="growth: time a `dvc repro` after adding a degradation, in a clone (about 20 min)")
    parser.add_argument("--sets", default=None, help="quality, routing: only the benchmarks whose name matches this "
                                                    "regex, e.g. 'CBSD68 noise'")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (the fastest is kept)")
    parser.add_argument("--no-classical", action="store_true", help="skip CBM3D, NLM, TV, Wiener, Richardson-Lucy")
    parser.add_argument("--classical", default=".", help="quality: only the classical methods whose name matches "
                                                         "this regex, e.g. 'NLM' (CBM3D takes ~10 s per image)")
    parser.add_argument("--out", default="reports/benchmarks")
    parser.add_argument("--update", action="store_true",
                        help="keep the other sections of an existing <out>.json (e.g. add growth to a full run)")
    parser.add_argument("--readme", action="store_true", help="write the markdown into README.md's Performance section")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    models = Path(args.models)
    if not (models / "router").is_dir():
        raise SystemExit(f"{models} has no trained models: run `dvc repro` (or `make repro`) first")

    started = time.time()
    out = Path(args.out)
    result: dict = {}
    if args.update and out.with_suffix(".json").is_file():
        result = json.loads(out.with_suffix(".json").read_text())
    result.update(machine=machine(), profile=params.profile_name)
    if {"quality", "routing"} & set(args.sections):
        result["images_per_set"] = args.images or "all"
    if "storage" in args.sections:
        result["storage"] = speed.storage(models)
    if "speed" in args.sections:
        result["training"] = speed.training_throughput(params, models, args.repeats)
        result["growth"] = speed.growth(params, result["training"])
        result["inference"] = speed.inference_speed(params, models, args.repeats)
        result["restore"] = speed.restore_end_to_end(models)
    if "engines" in args.sections:
        result["engines"] = speed.engine_speed(params, models, args.repeats, args.testsets)
        result["engine_restore"] = speed.restore_by_engine(models, [r["engine"] for r in result["engines"]["rows"]])
    if "growth" in args.sections:
        result["growth_repro"] = growth.timed_repro(Path.cwd())
    if {"quality", "routing"} & set(args.sections):
        degradations = OmegaConf.to_container(params.degradations, resolve=True)
        mixes = ["+".join(m) for m in params.mixed if len(m) == 2][:2]
        sets, skipped = benchmarks(args.testsets, degradations, mixes, args.images)
        for line in skipped:
            print(f"benchmarks: skipped {line}")
        # The settings `uir restore` uses; no restorations shared between methods, so that each method's
        # seconds per image are its own network passes (the oracle's would otherwise serve UIR-LoRA's).
        methods, restorer = load_methods(models, share_restorations=False)
        if args.sets:
            sets = [bench for bench in sets if re.search(args.sets, bench.name)]
        result["skipped"] = skipped
    if "routing" in args.sections:
        clean_sets = {name: [image for _, image in load_set(args.testsets, name, args.images)]
                      for name in ("CBSD68", "Kodak24", "LIVE1")}
        clean_sets = {name: images for name, images in clean_sets.items()
                      if images and (not args.sets or re.search(args.sets, f"{name} clean"))}
        result["routing"] = routing.run(sets, clean_sets, restorer)
    if "quality" in args.sections:
        result["quality"] = quality.run(sets, methods, classical=None if args.no_classical else args.classical, backbone=models / "backbone")
    result.setdefault("runs", []).append({"sections": args.sections, "seconds": time.time() - started})
    text = markdown(result)
    write_report(out, result, text)
    if args.readme:
        readme = Path("README.md")
        content = readme.read_text(encoding="utf-8")
        if README_START not in content or README_END not in content:
            raise SystemExit(f"README.md has no {README_START} ... {README_END} section")
        head, rest = content.split(README_START, 1)
        _, tail = rest.split(README_END, 1)
        with atomic_path(readme) as tmp:
            tmp.write_text(f"{head}{README_START}\n{text}\n{README_END}{tail}", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
