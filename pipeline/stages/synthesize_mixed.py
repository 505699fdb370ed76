"""DVC stage ``synthesize_mixed``: validation and test sets for combinations of degradations (never used for
training; validation chooses how UIR-LoRA restores mixes, ``select_restoration``).

``<out>/<a+b>/{val,test}/{lq,gt}/*.png`` plus ``manifest.jsonl``; the components apply in the listed order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import stage_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--clean", default="data/clean")
    parser.add_argument("--out", default="data/mixed", help="output folder (replaced)")
    args = parser.parse_args(argv)
    params = stage_params(args.params)

    import shutil

    from pipeline.data.degradations import Degradation
    from pipeline.data.synthesis import eval_boxes, image_sizes, load_clean, synthesize_split

    mixes = [Degradation.from_params(params.degradations, list(names)) for names in params.mixed]
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    for split, count in (("val", params.synthesis.val_crops), ("test", params.synthesis.test_crops)):
        images = load_clean(args.clean, split)
        boxes = eval_boxes(image_sizes(images), params.synthesis.eval_crop, count, params.seed)
        for mix in mixes:
            written = synthesize_split(mix, images, boxes, out / mix.name / split, split, params.seed)
            print(f"synthesize_mixed: {mix.name}: {split}: {written} samples")


if __name__ == "__main__":
    main()
