"""``uir``: the command line of the project.

    uir sample --backbone models/backbone -n 16 -o samples.png   draw images from the backbone
    uir stage NAME [ARGS...]                                     run one pipeline stage (as DVC does)
"""

from __future__ import annotations

import argparse
import importlib
import sys

STAGES = ("prepare", "synthesize", "synthesize_mixed", "pretrain_backbone", "train_lora", "train_multitask",
          "train_shared_lora", "fit_router", "evaluate")


def _sample(args: argparse.Namespace) -> None:
    from pipeline.data.datasets import to_uint8
    from pipeline.images import tile, write_image
    from pipeline.models.backbone import load_backbone
    from pipeline.models.sampling import sample

    unet, scheduler = load_backbone(args.backbone)
    size = args.size or unet.config.sample_size
    images = sample(unet, scheduler, args.count, size, args.steps, args.seed)
    write_image(args.output, tile([to_uint8(x) for x in images], columns=min(args.count, 8)))
    print(f"wrote {args.count} samples ({size}x{size}, {args.steps} DDPM steps) to {args.output}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="uir", description="UIR-LoRA: universal image restoration with LoRA adapters")
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser("sample", help="draw images from the generative backbone")
    sample.add_argument("--backbone", default="models/backbone")
    sample.add_argument("-n", "--count", type=int, default=16)
    sample.add_argument("--size", type=int, default=None, help="side in pixels (default: the model's sample size)")
    sample.add_argument("--steps", type=int, default=200, help="ancestral DDPM steps")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("-o", "--output", default="samples.png")
    sample.set_defaults(run=_sample)

    stage = commands.add_parser("stage", help="run one pipeline stage", add_help=False)
    stage.add_argument("name", choices=STAGES)

    if argv[:1] == ["stage"] and len(argv) > 1 and argv[1] in STAGES:
        importlib.import_module(f"pipeline.stages.{argv[1]}").main(argv[2:])
        return
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"uir {args.command}: {error}") from None


if __name__ == "__main__":
    main()
