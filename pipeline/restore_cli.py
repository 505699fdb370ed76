"""``uir restore`` and ``uir info``: restore image files, describe a models folder."""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.images import IMAGE_EXTENSIONS, ImageReadError, read_image, write_image


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (their images, recursively) and globs -> image paths; plus inputs that matched nothing."""
    paths, missing = [], []
    for item in inputs:
        matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))] or ([Path(item)] if Path(item).exists() else [])
        if not matches:
            missing.append(item)
        for match in matches:
            if match.is_dir():
                paths += sorted(p for p in match.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            else:
                paths.append(match)
    return list(dict.fromkeys(paths)), missing


def parse_mix(text: str) -> dict[str, float]:
    """``"noise=0.6,blur=0.4"`` -> ``{"noise": 0.6, "blur": 0.4}``."""
    mix = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            mix[name.strip()] = float(value) if value else 1.0
        except ValueError:
            raise ValueError(f"bad weight in --mix {text!r}: expected name=number[,name=number...]") from None
    return mix


def output_path(path: Path, outdir: Path) -> Path:
    out = outdir / path.name
    if out.resolve() == path.resolve():
        raise ValueError(f"{out} would overwrite its input: choose another output folder")
    return out


def restore_main(args: argparse.Namespace) -> int:
    from pipeline.models.restorer import UniversalRestorer

    paths, missing = expand_inputs(args.inputs)
    failures = [(item, "no such file, folder or match") for item in missing]
    if not paths and not failures:
        raise SystemExit("uir restore: no input images")
    restorer = UniversalRestorer.from_pretrained(
        args.models, top_k=args.top_k, tile=args.tile, overlap=args.overlap, batch_size=args.batch_size,
        device=args.device, unknown=args.unknown,
    )
    forced = {args.lora: 1.0} if args.lora else parse_mix(args.mix) if args.mix else None
    if forced is not None:
        restorer.composition.weights_for(forced)  # unknown names fail before any image is read
    outdir = Path(args.output)
    outdir.mkdir(parents=True, exist_ok=True)
    report = []
    for path in tqdm(paths, desc="restoring", unit="img", file=sys.stderr, disable=len(paths) < 2):
        entry = {"input": str(path)}
        try:
            out = output_path(path, outdir)
            image = read_image(path)
            if forced is None:
                analysis = restorer.analyse(image)
                entry.update(weights=analysis.weights, unknown=analysis.unknown)
                described = "unknown degradation" + (" (left unchanged)" if args.unknown == "identity" else "") \
                    if analysis.unknown else ", ".join(f"{n} {w:.2f}" for n, w in analysis.weights.items())
                weights = None
            else:
                entry.update(weights=forced, unknown=False)
                described = "forced " + ", ".join(f"{n} {w:.2f}" for n, w in forced.items())
                weights = forced
            restored = restorer.restore(image, weights=weights)
            write_image(out, restored)
            entry["output"] = str(out)
            tqdm.write(f"{path}: {described} -> {out}", file=sys.stderr)
        except (ImageReadError, ValueError, OSError) as error:
            entry["error"] = str(error)
            tqdm.write(f"{path}: error: {error.reason if isinstance(error, ImageReadError) else error}", file=sys.stderr)
        report.append(entry)
    for item, reason in failures:
        report.append({"input": item, "error": reason})
        print(f"{item}: error: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    failed = sum("error" in e for e in report)
    print(f"restored {len(report) - failed} of {len(report)} inputs into {outdir}", file=sys.stderr)
    return 1 if failed else 0


def info_main(args: argparse.Namespace) -> int:
    from pipeline.models.adapters import read_restoration_settings
    from pipeline.models.restorer import check_models_folder
    from pipeline.models.router import DegradationRouter

    models = Path(args.models)
    names = check_models_folder(models)
    backbone = json.loads((models / "backbone" / "config.json").read_text())
    from safetensors import safe_open

    def size(path: Path) -> int:
        with safe_open(str(path), "pt") as f:
            return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())

    backbone_params = size(models / "backbone" / "diffusion_pytorch_model.safetensors")
    info = {
        "backbone": {"parameters": backbone_params, "block_out_channels": backbone["block_out_channels"],
                     "layers_per_block": backbone["layers_per_block"], "sample_size": backbone["sample_size"]},
        "adapters": {},
    }
    for name in names:
        folder = models / "loras" / name
        config = json.loads((folder / "adapter_config.json").read_text())
        params = size(folder / "adapter_model.safetensors")
        info["adapters"][name] = {"rank": config["r"], "alpha": config["lora_alpha"],
                                  "targets": sorted(config["target_modules"]), "parameters": params,
                                  "of_backbone": round(params / backbone_params, 4),
                                  "t_star": read_restoration_settings(folder)["t_star"]}
    router = DegradationRouter.from_pretrained(models / "router")
    info["router"] = {"prototypes": router.config.prototypes, "degradations": router.names,
                      "top_k": router.config.top_k, "temperature": router.config.temperature,
                      "unknown_threshold": round(router.config.threshold, 4),
                      "parameters": sum(p.numel() for p in router.parameters())}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    b = info["backbone"]
    print(f"backbone  UNet2DModel {b['block_out_channels']} x{b['layers_per_block']}, {b['parameters'] / 1e6:.2f} M parameters")
    for name, a in info["adapters"].items():
        print(f"adapter   {name:<10} rank {a['rank']:>3}  {a['parameters'] / 1e3:8.1f} k parameters "
              f"({100 * a['of_backbone']:.1f}% of backbone)  t*={a['t_star']}  targets {','.join(a['targets'])}")
    r = info["router"]
    print(f"router    {r['prototypes']} prototypes for {', '.join(r['degradations'])}; top-K {r['top_k']}, "
          f"temperature {r['temperature']}, unknown below {r['unknown_threshold']}")
    return 0

