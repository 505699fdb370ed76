"""Write the README's "Results" section from ``reports/metrics.json`` and copy one sample grid into
``docs/``: the numbers in the README are what the last ``dvc repro`` gave, never typed by hand.

    python -m pipeline.evaluation.results          (or: make results)
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from pipeline.config import load_params
from pipeline.files import atomic_path, read_json

START, END = "<!-- results:start -->", "<!-- results:end -->"


def results_markdown(metrics: dict, params, sample: str) -> str:
    lines = [
        f"Profile `{params.profile_name}`; test PSNR (dB) / SSIM, averaged over the "
        f"{len(params.degradations)} single and {len(params.mixed)} mixed test sets "
        f"({params.synthesis.test_crops} crops of {params.synthesis.eval_crop}² each).",
        "",
        "| method | single PSNR | single SSIM | mixed PSNR | mixed SSIM |",
        "|---|---|---|---|---|",
    ]
    for method, label in metrics["labels"].items():
        s, m = metrics["single"].get(method), metrics["mixed"].get(method)
        if s and m:
            lines.append(f"| {label} | {s['psnr']:.2f} | {s['ssim']:.3f} | {m['psnr']:.2f} | {m['ssim']:.3f} |")
    router, used = metrics["router"], metrics["restoration"]
    lines += [
        "",
        f"Router: top-1 accuracy {router['top1_accuracy']:.3f} on the single test sets; recall of the true "
        f"components among its top-|mix| adapters {router['mix_recall']:.3f} on the mixed sets. The `{used['policy']}` "
        f"policy (mix threshold {used['mix_threshold_used']:.2f}) gave two or more adapters to "
        f"{100 * router['single_given_two_or_more']:.1f}% of single and {100 * router['mixed_given_two_or_more']:.1f}% "
        f"of mixed test images; {100 * router['unknown_rate']:.1f}% were flagged unknown and "
        + ("left as they were (`unknown: identity`)." if used["unknown"] == "identity" else "restored anyway (`unknown: route`)."),
        "",
        f"![degraded, multi-task, UIR-LoRA, clean](docs/{Path(sample).name})",
        "",
        f"*{Path(sample).stem.removeprefix('sample_')}: degraded | multi-task | UIR-LoRA | clean.* "
        "Per-set numbers: `reports/single.csv`, `reports/mixed.csv`, `reports/plots/psnr.png`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--reports", default="reports")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--sample-set", default="noise+blur", help="which set's sample grid to show")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    metrics = read_json(Path(args.reports) / "metrics.json", stage="evaluate")
    source = Path(args.reports) / "samples" / f"{args.sample_set}.png"
    if not source.is_file():
        raise SystemExit(f"{source} is missing: run `dvc repro evaluate`")
    sample = Path("docs") / f"sample_{args.sample_set}.png"
    sample.parent.mkdir(exist_ok=True)
    shutil.copyfile(source, sample)
    readme = Path(args.readme)
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} block")
    block = f"{START}\n{results_markdown(metrics, params, str(sample))}\n{END}"
    with atomic_path(readme) as tmp:
        tmp.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))
    print(f"updated {readme} and {sample}")


if __name__ == "__main__":
    main()
