"""``uir``: the command line of the project.

    uir restore INPUT... -o OUTDIR                               restore files, folders, globs
    uir export -o exported/ [--lora noise | --mix noise=0.6,blur=0.4]   the networks as ONNX
    uir info [--models models]                                   what a models folder holds (and which is in use)
    uir ship                                                     models/ of `dvc repro` -> weights/ (the shipped set)
    uir sample --backbone models/backbone -n 16 -o samples.png   draw images from the backbone
    uir stage NAME [ARGS...]                                     run one pipeline stage (as DVC does)
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.restore_cli import export_main, info_main, restore_main, ship_main

STAGES = ("prepare", "synthesize", "synthesize_mixed", "pretrain_backbone", "train_lora", "train_multitask",
          "train_shared_lora", "fit_noise_level", "fit_router", "select_restoration", "evaluate")


def _sample(args: argparse.Namespace) -> None:
    from pipeline.data.tensors import to_uint8
    from pipeline.images import tile, write_image
    from pipeline.models.backbone import load_backbone
    from pipeline.models.sampling import sample

    unet, scheduler = load_backbone(args.backbone)
    size = args.size or unet.config.sample_size
    images = sample(unet, scheduler, args.count, size, args.steps, args.seed)
    write_image(args.output, tile([to_uint8(x) for x in images], columns=min(args.count, 8)))
    print(f"wrote {args.count} samples ({size}x{size}, {args.steps} DDPM steps) to {args.output}")


def _exit(code: int) -> None:
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="uir", description="UIR-LoRA: universal image restoration with LoRA adapters")
    commands = parser.add_subparsers(dest="command", required=True)

    restore = commands.add_parser("restore", help="restore images (files, folders, globs)")
    restore.add_argument("inputs", nargs="+", metavar="INPUT")
    restore.add_argument("-o", "--output", required=True, help="output folder (inputs are never overwritten)")
    restore.add_argument("--models", default=None, help="models folder (default: models/ of the last `dvc repro` if complete, else the shipped weights/uir-lora-cbsd432)")
    forced = restore.add_mutually_exclusive_group()
    forced.add_argument("--lora", help="use this degradation's LoRA alone, skip the router")
    forced.add_argument("--mix", help="a fixed adapter mix, e.g. noise=0.6,blur=0.4")
    # Defaults: the models folder's restoration.json (chosen on validation), else RestorationSettings' defaults.
    restore.add_argument("--policy", choices=["top1", "gated", "confirmed", "cascade", "topk"], default=None,
                         help="routing: top1, gated (a second adapter only for a detected mix), confirmed (gated, the "
                              "mix confirmed on the first adapter's restoration), cascade (the first adapter's "
                              "restoration routed again for a second) or topk (the paper's)")
    restore.add_argument("--top-k", type=int, default=None, help="adapters kept by topk, and at most by gated")
    restore.add_argument("--mix-threshold", type=float, default=None,
                         help="gated, confirmed, cascade: second adapter's presence that means a mix (default: the router's)")
    restore.add_argument("--composition", choices=["sequential", "weights", "planned"], default=None,
                         help="a mix: adapters one after another, their weights merged (the paper's), or each pair "
                              "as its plan in the models' restoration.json says")
    restore.add_argument("--unknown", choices=["identity", "route"], default=None,
                         help="when the router does not recognise the degradation: leave the image as it is "
                              "(identity) or restore it anyway (route); an image it finds clean is left as it is "
                              "(force an adapter with --lora / --mix)")
    restore.add_argument("--noise-level", choices=["learned", "analytic"], default=None,
                         help="the noise adapter's timestep: from its learned noise level estimator (reads noise that "
                              "JPEG or blur went over) or from the analytic σ̂ of white noise")
    restore.add_argument("--min-noise-correction", type=float, default=None,
                         help="learned: its correction to σ̂ only where at least this (log units; 0: always)")
    restore.add_argument("--tile", type=int, default=256, help="tile side in pixels for large images")
    restore.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels")
    restore.add_argument("--batch-size", type=int, default=4, help="tiles restored at once")
    restore.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ...")
    restore.add_argument("--engine", choices=["auto", "torch", "onnxruntime", "openvino"], default="auto",
                         help="what runs the network: torch, or the network exported to ONNX and run by onnxruntime "
                              "or openvino on the CPU; auto: the fastest here that costs no PSNR (openvino bf16 on "
                              "a CPU with native bf16, else onnxruntime fp32, else torch), or the engine of --precision")
    restore.add_argument("--precision", choices=["fp32", "int8", "bf16"], default=None,
                         help="fp32 (exact); bf16 (openvino, CPUs with native bf16) or int8 (onnxruntime): faster, "
                              "at the PSNR the README states (default: auto's choice, fp32 for a named engine)")
    restore.add_argument("--json", action="store_true", help="print a JSON report on standard output")
    restore.set_defaults(run=lambda a: _exit(restore_main(a)))

    export = commands.add_parser("export", help="write the restoration networks (and the router) as ONNX")
    export.add_argument("-o", "--output", required=True, help="folder for the .onnx files")
    export.add_argument("--models", default=None, help="models folder (default: models/ of the last `dvc repro` if complete, else the shipped weights/uir-lora-cbsd432)")
    export_what = export.add_mutually_exclusive_group()
    export_what.add_argument("--lora", help="one adapter (default: each adapter, one file each)")
    export_what.add_argument("--mix", help="a fixed mix with its weights merged, e.g. noise=0.6,blur=0.4")
    export.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                        help="int8: ONNX Runtime static quantisation (QDQ), calibrated on fixed photo crops")
    export.add_argument("--no-router", action="store_true", help="do not export the router")
    export.set_defaults(run=lambda a: _exit(export_main(a)))

    ship = commands.add_parser("ship", help="copy the adapters and router of `dvc repro` into the shipped weights")
    ship.add_argument("--models", default="models", help="the models folder of the `dvc repro` (default: models)")
    ship.add_argument("--to", default=None, help="the shipped folder (default: weights/uir-lora-cbsd432)")
    ship.add_argument("--reports", default="reports", help="the reports of that `dvc repro`, for the model card")
    ship.add_argument("--params", default="params.yaml", help="the params of that `dvc repro`: its profile, for the model card")
    ship.add_argument("--clean", default="data/clean", help="its prepared photos: the training data's hashes, for the model card")
    ship.set_defaults(run=lambda a: _exit(ship_main(a)))

    info = commands.add_parser("info", help="describe a models folder")
    info.add_argument("--models", default=None, help="models folder (default: models/ of the last `dvc repro` if complete, else the shipped weights/uir-lora-cbsd432)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=lambda a: _exit(info_main(a)))

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
    if "models" in args and args.command != "ship":
        from pipeline.models.folder import resolve_models

        args.models = resolve_models(args.models)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as error:
        raise SystemExit(f"uir {args.command}: {error.args[0] if isinstance(error, KeyError) else error}") from None


if __name__ == "__main__":
    main()
