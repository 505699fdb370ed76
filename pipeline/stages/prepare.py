"""DVC stage ``prepare``: clean RGB photographs, split by image into train / val / test.

Writes ``<out>/<name>.png`` and ``<out>/manifest.json`` (every image's source, split, size and the
conversions it needed; every rejected file with its reason).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import stage_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/clean", help="output folder (replaced)")
    args = parser.parse_args(argv)
    params = stage_params(args.params)

    import shutil
    import sys
    from pipeline.data.sources import load_embedded, load_folder, read_pinned_splits, split_by_image
    from pipeline.images import write_image
    from pipeline.files import write_json

    cfg = params.prepare

    images = load_embedded(cfg.embedded)
    rejected = []
    for folder in cfg.folders:
        found, bad = load_folder(folder, min_size=params.synthesis.eval_crop)
        images += found
        rejected += bad
    for item in rejected:
        print(f"prepare: skipped {item.source}: {item.reason}", file=sys.stderr)
    for image in images:
        if image.conversions:
            print(f"prepare: converted {image.source}: {', '.join(image.conversions)}", file=sys.stderr)
    if not images:
        raise SystemExit("prepare: no usable clean images (check prepare.embedded and prepare.folders)")

    names = [image.name for image in images]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"prepare: duplicate image names {duplicates}")
    splits = split_by_image(
        {image.name: image.group for image in images}, cfg.split.val_fraction, cfg.split.test_fraction, params.seed,
        read_pinned_splits(cfg.split.pinned) if cfg.split.pinned else None,
    )
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    records = []
    for image in images:
        write_image(out / f"{image.name}.png", image.pixels)
        h, w = image.pixels.shape[:2]
        records.append(
            {"name": image.name, "file": f"{image.name}.png", "source": image.source, "scene": image.group,
             "split": splits[image.name],
             "width": w, "height": h, "conversions": image.conversions}
        )
    write_json(out / "manifest.json", {"images": records, "rejected": [vars(r) for r in rejected]})
    counts = {s: sum(r["split"] == s for r in records) for s in ("train", "val", "test")}
    megapixels = sum(r["width"] * r["height"] for r in records) / 1e6
    print(f"prepare: {len(records)} images ({megapixels:.1f} MP): {counts}; {len(rejected)} rejected")


if __name__ == "__main__":
    main()
