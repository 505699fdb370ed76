"""DVC stage ``synthesize_mixed``: test-only sets for combinations of degradations (never used for training).

``<out>/<a+b>/test/{lq,gt}/*.png`` plus ``manifest.jsonl``; the components apply in the listed order.
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

    images = load_clean(args.clean, "test")
    boxes = eval_boxes(image_sizes(images), params.synthesis.eval_crop, params.synthesis.test_crops, params.seed)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    for mix in mixes:
        count = synthesize_split(mix, images, boxes, out / mix.name / "test", "test", params.seed)
        print(f"synthesize_mixed: {mix.name}: {count} samples")


if __name__ == "__main__":
    main()
