"""DVC stage ``synthesize@<degradation>``: a fixed, seeded degraded dataset for one degradation.

``<out>/{train,val,test}/{lq,gt}/*.png`` plus ``manifest.jsonl`` per split (source image, crop box,
seed and every sampled degradation parameter).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import stage_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("degradation", help="a key of `degradations` in params.yaml")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--clean", default="data/clean")
    parser.add_argument("--out", required=True, help="output folder (replaced)")
    args = parser.parse_args(argv)
    params = stage_params(args.params)

    import shutil
    from pipeline.data.degradations import Degradation
    from pipeline.data.synthesis import eval_boxes, image_sizes, load_clean, synthesize_split, train_boxes

    cfg = params.synthesis
    degradation = Degradation.from_params(params.degradations, [args.degradation])

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    plan = {
        "train": lambda sizes: train_boxes(sizes, cfg.patch_size, cfg.train_patches, params.seed),
        "val": lambda sizes: eval_boxes(sizes, cfg.eval_crop, cfg.val_crops, params.seed),
        "test": lambda sizes: eval_boxes(sizes, cfg.eval_crop, cfg.test_crops, params.seed),
    }
    for split, boxes_for in plan.items():
        images = load_clean(args.clean, split)
        count = synthesize_split(degradation, images, boxes_for(image_sizes(images)), out / split, split, params.seed)
        print(f"synthesize@{degradation.name}: {split}: {count} samples")


if __name__ == "__main__":
    main()
