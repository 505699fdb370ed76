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


def expand_inputs(inputs: list[str], outdir: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Files, folders (their images, recursively) and globs -> (image, output path) pairs; plus inputs that
    matched nothing. A file lands in ``outdir`` under its name; a folder's images keep their layout under
    ``outdir/<folder name>/``."""
    pairs, missing = [], []
    for item in inputs:
        matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))] or ([Path(item)] if Path(item).exists() else [])
        if not matches:
            missing.append(item)
        for match in matches:
            if match.is_dir():
                pairs += [(p, outdir / match.resolve().name / p.relative_to(match)) for p in sorted(match.rglob("*"))
                          if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
            else:
                pairs.append((match, outdir / match.name))
    unique = list(dict.fromkeys(pairs))
    return unique, missing


def check_outputs(pairs: list[tuple[Path, Path]]) -> None:
    """Refuse, before any work, two inputs that would be written to one output, and an output that would
    overwrite an input."""
    by_output: dict[Path, list[Path]] = {}
    for source, out in pairs:
        by_output.setdefault(out.resolve(), []).append(source)
    clashes = {out: sources for out, sources in by_output.items() if len(sources) > 1}
    if clashes:
        lines = [f"  {out} <- {', '.join(map(str, sources))}" for out, sources in clashes.items()]
        raise ValueError("two inputs would be written to the same output (pass their folder instead, or "
                         "restore them into separate output folders):\n" + "\n".join(lines))
    inputs = {source.resolve() for source, _ in pairs}
    for source, out in pairs:
        if out.resolve() in inputs:
            raise ValueError(f"{out} would overwrite an input: choose another output folder")


def parse_mix(text: str) -> dict[str, float]:
    """``"noise=0.6,blur=0.4"`` -> ``{"noise": 0.6, "blur": 0.4}``; weights must be finite, >= 0, not all 0."""
    from pipeline.models.composition import check_mix

    mix = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            mix[name.strip()] = float(value) if value else 1.0
        except ValueError:
            raise ValueError(f"bad weight in --mix {text!r}: expected name=number[,name=number...]") from None
    check_mix(mix)
    return mix


def check_arguments(args: argparse.Namespace) -> dict[str, float] | None:
    """Every argument checked before any model is loaded; returns the forced mix, if any."""
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.tile < 16 or not 0 <= args.overlap < args.tile // 2:
        raise ValueError(f"--tile must be >= 16 and --overlap in [0, tile/2), got {args.tile} and {args.overlap}")
    if args.mix_threshold is not None and not 0 <= args.mix_threshold <= 1:
        raise ValueError(f"--mix-threshold must be in [0, 1], got {args.mix_threshold}")
    if args.device != "cpu":
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError as error:
            raise ValueError(f"--device {args.device!r}: {error}") from None
        available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(device.type)
        if available is None or not available():
            raise ValueError(f"--device {args.device}: not available with this torch build ({torch.__version__}); use cpu")
    from pipeline.models.export import check_engine, require_runtime

    engine, precision = resolve_engine(args.engine, args.precision, args.device)
    check_engine(engine, precision, args.device)
    if engine != "torch":
        require_runtime(engine)
    forced = {args.lora: 1.0} if args.lora else parse_mix(args.mix) if args.mix else None
    from pipeline.models.folder import ModelsFolder

    folder = ModelsFolder(args.models)
    folder.require_backbone()
    present = folder.check(router=forced is None)
    if forced is not None:
        unknown = sorted(set(forced) - set(present))
        if unknown:
            raise ValueError(f"no adapter for {unknown} in {folder.root / 'loras'}; present: {present}")
    return forced


def resolve_engine(engine: str, precision: str | None, device: str) -> tuple[str, str]:
    """(engine, precision) for the flags. ``auto`` takes the fastest that costs no PSNR measured here (README,
    Performance): OpenVINO bf16 on a CPU that runs bf16 natively, else ONNX Runtime fp32, else torch; with a
    precision given, the engine that runs it (fp32: ONNX Runtime, int8: ONNX Runtime, bf16: OpenVINO).
    An engine named without a precision runs fp32."""
    if engine != "auto":
        return engine, precision or "fp32"
    if precision in ("int8", "bf16"):
        return {"int8": "onnxruntime", "bf16": "openvino"}[precision], precision
    if device != "cpu":
        return "torch", "fp32"
    from pipeline.models.export import native_bf16

    if precision is None and native_bf16():
        return "openvino", "bf16"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch", "fp32"
    return "onnxruntime", "fp32"


def restoration_settings(args: argparse.Namespace):
    """The models folder's settings (``restoration.json``, chosen on validation by ``select_restoration``),
    else the built-in defaults; the flags override them."""
    from pipeline.models.restorer import SETTINGS_FILE, RestorationSettings

    overrides = dict(policy=args.policy, top_k=args.top_k, composition=args.composition, unknown=args.unknown,
                     mix_threshold=args.mix_threshold, noise_level=args.noise_level,
                     min_noise_correction=args.min_noise_correction)
    file = Path(args.models) / SETTINGS_FILE
    return RestorationSettings.load(file, **overrides) if file.is_file() else RestorationSettings.from_params({}, **overrides)


def restore_main(args: argparse.Namespace) -> int:
    outdir = Path(args.output)
    pairs, missing = expand_inputs(args.inputs, outdir)
    failures = [(item, "no such file, folder or match") for item in missing]
    if not pairs and not failures:
        raise SystemExit("uir restore: no input images")
    check_outputs(pairs)
    forced = check_arguments(args)
    settings = restoration_settings(args)

    from pipeline.models.restorer import RestorationCache, UniversalRestorer

    engine, precision = resolve_engine(args.engine, args.precision, args.device)
    from pipeline.models.folder import SHIPPED

    if Path(args.models).resolve() == SHIPPED:
        print(f"uir restore: using the shipped models ({SHIPPED.name}); `dvc repro` trains your own", file=sys.stderr)
    restorer = UniversalRestorer.from_pretrained(args.models, router=forced is None, settings=settings, tile=args.tile,
                                                 overlap=args.overlap, batch_size=args.batch_size, device=args.device,
                                                 engine=engine, precision=precision,
                                                 cache=RestorationCache(max_bytes=1 << 30))  # a confirmed mix's first step
    report = []
    images = tqdm(pairs, desc="restoring", unit="img", file=sys.stderr, disable=len(pairs) < 2, position=0)
    for path, out in images:
        entry = {"input": str(path)}
        try:
            image = read_image(path)
            if forced is None:
                tiles = restorer.tiles(image.shape)
                with tqdm(total=tiles, desc=f"{path.name} confirming a mix", unit="tile", file=sys.stderr, leave=False,
                          position=1, disable=settings.policy not in ("confirmed", "cascade") or tiles < 8) as bar:
                    analysis = restorer.analyse(image, on_tile=bar.update)
                entry.update(weights=analysis.weights, steps=analysis.steps, unknown=analysis.unknown,
                             clean=analysis.clean, presence={n: round(p, 4) for n, p in analysis.presence.items()},
                             confirmation={n: round(p, 4) for n, p in analysis.confirmation.items()})
                flagged = "unknown degradation" if analysis.unknown else "no degradation found" if analysis.clean else ""
                applied = " then ".join(", ".join(f"{n} {w:.2f}" for n, w in step.items()) for step in analysis.steps)
                described = f"{flagged} (left unchanged)" if analysis.unchanged else \
                    f"{flagged}, restored anyway: {applied}" if flagged else applied
                steps = 0 if analysis.unchanged else len(analysis.steps)
            else:
                analysis = None
                entry.update(weights=forced, unknown=False)
                described = "forced " + ", ".join(f"{n} {w:.2f}" for n, w in forced.items())
                steps = len(restorer.steps(forced))
            tiles = restorer.tiles(image.shape, steps)
            with tqdm(total=tiles, desc=path.name, unit="tile", file=sys.stderr, leave=False, position=1,
                      disable=tiles < 8) as bar:
                restored = restorer.restore(image, weights=forced, analysis=analysis,
                                            on_tile=bar.update)
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


def export_main(args: argparse.Namespace) -> int:
    """``uir export``: each adapter (or one adapter, or one fixed mix) as ONNX, and the router."""
    from pipeline.models.composition import AdapterComposition
    from pipeline.models.export import export_onnx, export_router, quantize_int8, require_runtime
    from pipeline.models.folder import ModelsFolder
    from pipeline.models.router import DegradationRouter

    require_runtime("onnxruntime")
    folder = ModelsFolder(args.models)
    names = folder.check(router=False)
    mixes = [{args.lora: 1.0}] if args.lora else [parse_mix(args.mix)] if args.mix else [{n: 1.0} for n in names]
    for mix in mixes:
        unknown = sorted(set(mix) - set(names))
        if unknown:
            raise ValueError(f"no adapter for {unknown} in {folder.root / 'loras'}; present: {names}")
    composition = AdapterComposition.from_pretrained(folder.backbone, {n: folder.lora(n) for n in names})
    out = Path(args.output)
    for mix in mixes:
        path = export_onnx(composition, mix, out / ("+".join(f"{n}={w:g}" for n, w in sorted(mix.items())) + ".onnx"))
        if args.precision == "int8":
            fp32, path = path, quantize_int8(path, path.with_suffix(".int8.onnx"), composition, mix)
            fp32.unlink()
        print(f"wrote {path}")
    if not args.no_router and (folder.router / "config.json").is_file():
        router = DegradationRouter.from_pretrained(folder.router)
        export_router(router, out / "router.onnx")
        print(f"wrote {out / 'router.onnx'} (logits s/τ and presence logits over {router.names}; softmax, sigmoid "
              "and the policy are applied outside)")
    return 0


def info_main(args: argparse.Namespace) -> int:
    from pipeline.models.adapters import read_restoration_settings
    from pipeline.models.folder import ModelsFolder
    from pipeline.models.router import DegradationRouter

    models = Path(args.models)
    names = ModelsFolder(models).check()
    estimators = ModelsFolder(models).noise_levels(names)
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
                                  "t_star": read_restoration_settings(folder)["t_star"],
                                  "timestep": read_restoration_settings(folder).get("timestep", "fixed"),
                                  "noise_level_estimator": str(estimators[name]) if name in estimators else None}
    from pipeline.models.restorer import SETTINGS_FILE, RestorationSettings

    settings_file = models / SETTINGS_FILE
    settings = RestorationSettings.load(settings_file) if settings_file.is_file() else RestorationSettings()
    info["restoration"] = {**settings.as_dict(),
                           "source": str(settings_file) if settings_file.is_file() else "built-in defaults"}
    router = DegradationRouter.from_pretrained(models / "router")
    info["router"] = {"prototypes": router.config.prototypes, "degradations": router.names,
                      "mix_threshold": round(router.config.mix_threshold, 4), "temperature": router.config.temperature,
                      "unknown_threshold": round(router.config.threshold, 4),
                      "known_threshold": None if router.config.known_threshold is None else round(router.config.known_threshold, 4),
                      "clean_threshold": round(router.config.clean_threshold, 4) if router.config.clean else None,
                      "parameters": sum(p.numel() for p in router.parameters())}
    engine, precision = resolve_engine("auto", None, "cpu")
    info["engine"] = {"engine": engine, "precision": precision}
    from pipeline.models.folder import SHIPPED

    shipped = models.resolve() == SHIPPED
    info["models"] = {"folder": str(models), "set": "shipped with the package" if shipped else "trained (dvc repro)"}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    def timestep(adapter: dict) -> str:
        if adapter["timestep"] != "noise_sigma":
            return f"t*={adapter['t_star']}"
        return "t(σ) learned" if adapter["noise_level_estimator"] else "t(σ̂) (no learned estimator)"

    print(f"models    {info['models']['folder']} ({info['models']['set']})")
    b = info["backbone"]
    print(f"backbone  UNet2DModel {b['block_out_channels']} x{b['layers_per_block']}, {b['parameters'] / 1e6:.2f} M parameters")
    for name, a in info["adapters"].items():
        print(f"adapter   {name:<10} rank {a['rank']:>3}  {a['parameters'] / 1e3:8.1f} k parameters "
              f"({100 * a['of_backbone']:.1f}% of backbone)  "
              f"{timestep(a)}  targets {','.join(a['targets'])}")
    r = info["router"]
    print(f"router    {r['prototypes']} prototypes for {', '.join(r['degradations'])}; mix threshold {r['mix_threshold']}, "
          f"temperature {r['temperature']}, unknown below {r['unknown_threshold']}"
          + ("" if r["known_threshold"] is None else f" unless its top presence reaches {r['known_threshold']}") + ", "
          + ("no clean class" if r["clean_threshold"] is None else f"clean at or above {r['clean_threshold']}"))
    s = info["restoration"]
    print(f"restoring {s['policy']} routing" + (f" (mix threshold {s['mix_threshold']})" if s["mix_threshold"] is not None else "")
          + f", {s['composition']} mixing, unknown: {s['unknown']}, noise timestep: {s['noise_level']}"
          + (f" (corrections to σ̂ from {s['min_noise_correction']:g})" if s["noise_level"] == "learned" else "")
          + f"  ({s['source']})")
    if s["composition"] == "planned":
        print("plans     " + "; ".join(f"{key}: " + " then ".join("+".join(step) for step in plan)
                                    for key, plan in s["plans"].items()))
    for name, knots in s.get("strengths", {}).items():
        print(f"strength  {name} by noise level σ: " + ", ".join(f"{value:g} at {sigma:g}" for sigma, value in knots)
              + " (alone; linear in between)")
    print(f"engine    {engine} {precision} (what `uir restore --engine auto` runs on this machine's CPU)")
    return 0



def ship_main(args: argparse.Namespace) -> int:
    """``uir ship``: the adapters, router and restoration settings of a ``dvc repro`` into the shipped folder,
    beside the backbone they were trained on (which must be the one already there), with a model card."""
    import shutil
    import subprocess

    import torch
    import yaml
    from safetensors.torch import load_file

    from pipeline.files import atomic_dir
    from pipeline.models.card import data_digest
    from pipeline.models.folder import SHIPPED, ModelsFolder
    from pipeline.models.restorer import SETTINGS_FILE

    source, target = ModelsFolder(args.models), ModelsFolder(args.to or SHIPPED)
    names = source.check()
    target.require_backbone()
    weights = "diffusion_pytorch_model.safetensors"
    trained_on, shipped = (load_file(str(f.backbone / weights)) for f in (source, target))
    if trained_on.keys() != shipped.keys() or any(not torch.equal(trained_on[k], shipped[k]) for k in shipped):
        raise ValueError(f"{source.backbone} is not the backbone in {target.backbone}: the adapters must be trained on "
                         f"the shipped backbone (backbone.pretrained: {target.backbone})")
    reports = Path(args.reports)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    parts = [f"loras/{n}" for n in names] + [f"noise_level/{n}" for n in source.noise_levels(names)]
    pretrained = all((folder.router / f).is_file() for folder in (source, target) for f in ROUTER_FILES) and \
        (target.router / ROUTER_FILES[1]).read_bytes() == (source.router / ROUTER_FILES[1]).read_bytes()
    if not pretrained:  # a router the `dvc repro` trained; the shipped one it validated keeps its weights and card
        parts.insert(0, "router")
    for part in parts:
        with atomic_dir(target.root / part) as tmp:
            shutil.copytree(source.root / part, tmp, dirs_exist_ok=True)
    if pretrained and (target.router / ROUTER_FILES[0]).read_bytes() != (source.router / ROUTER_FILES[0]).read_bytes():
        ship_recalibrated_router(source.router, target.router, commit)
    shutil.copyfile(source.root / SETTINGS_FILE, target.root / SETTINGS_FILE)
    profile = yaml.safe_load(Path(args.params).read_text()).get("profile_name", "default") if Path(args.params).is_file() else "default"
    data = data_digest(args.clean) if (Path(args.clean) / "manifest.json").is_file() else None
    (target.root / "README.md").write_text(set_card(target, names, reports, commit, profile, data), encoding="utf-8")
    print(f"shipped {', '.join(names)}{'' if pretrained else ' and the router'} into {target.root} "
          f"(trained at {commit or 'an unknown commit'}){'; the router there is the one it used' if pretrained else ''}")
    return 0


ROUTER_FILES = ("config.json", "model.safetensors")
RECALIBRATED = "## Thresholds of the shipped set"


def ship_recalibrated_router(source: Path, target: Path, commit: str) -> None:
    """The shipped router with the thresholds the run recalibrated (its known threshold: ``fit_router`` calibrates
    it on the run's validation photos), said in a last section of its card that replaces the one before."""
    import shutil

    from pipeline.files import atomic_dir

    config = json.loads((source / ROUTER_FILES[0]).read_text())
    card = (target / "README.md").read_text(encoding="utf-8").split(f"\n{RECALIBRATED}\n")[0].rstrip()
    with atomic_dir(target) as tmp:
        shutil.copytree(target, tmp, dirs_exist_ok=True)
        shutil.copyfile(source / ROUTER_FILES[0], tmp / ROUTER_FILES[0])
        (tmp / "README.md").write_text(f"{card}\n\n{RECALIBRATED}\n\nThe `dvc repro` whose adapters ship beside this router "
                                       f"(at {commit or 'an unknown commit'}) validated it and calibrated its known threshold "
                                       f"on its own validation photos: {config.get('known_threshold')} (`config.json`; the "
                                       "Configuration above is the one it was trained with).\n", encoding="utf-8")


def set_card(folder, names: list[str], reports: Path, commit: str, profile: str, data: dict | None) -> str:
    """The shipped set's card: what each part is and how well it did, from the reports of the `dvc repro`."""
    def report(name: str) -> dict:
        file = reports / name
        return json.loads(file.read_text()) if file.is_file() else {}

    adapters = "\n".join(
        f"| {n} | {r.get('rank', '?')} | {r.get('t_star', '?')} ({r.get('timestep', 'fixed')}) | "
        f"{r.get('val/input_psnr', float('nan')):.2f} | {r.get('val/psnr', float('nan')):.2f} | "
        f"`{w.get('run_id', '?')}` ({w.get('mode', '?')}) |"
        for n in names for r, w in [(report(f"train_lora/{n}.json"), report(f"wandb/train_lora@{n}.json"))])
    router = report("fit_router.json")
    pins = [f"`{f.name}`" for f in sorted(Path(folder.root).glob("*_split.json"))]
    pinned = (f"\n\nBeside them: {', '.join(pins)}, the train / val / test splits of the photographs the backbone and "
              "router recipes trained on, which those recipes pin (`prepare.split.pinned`)") if pins else ""
    noise_levels = "\n".join(f"| {n} | {m.get('val/regret_db_estimator', float('nan')):.3f} | "
                             f"{m.get('val/regret_db_analytic', float('nan')):.3f} |"
                             for n, m in report("fit_noise_level.json").items())
    headline = report("headline.json")
    settings = json.loads((folder.root / "restoration.json").read_text())
    trained_on = "" if data is None else (
        f"\n\nTraining photos (the `{data['split']}` split of that run, {data['images']} images, {data['megapixels']} MP): "
        + ", ".join(f"`{source}` {count}" for source, count in data["sources"].items())
        + f"; SHA-256 over their names and PNG bytes: `{data['sha256']}`. Its validation photos chose the settings below.")
    params = "" if profile == "default" else f"make params ARGS=profile={profile}\n"
    return f"""# UIR-LoRA models shipped with uir-lora

What `uir restore` uses before any `dvc repro` (the `models/` of the last `dvc repro` takes precedence;
`uir info` says which set is in use). Layout of a models folder (`pipeline/models/folder.py`):

- `backbone/`: the frozen pre-trained DDPM UNet; its own card is `backbone/README.md`
- `loras/<degradation>/`: one PEFT LoRA per degradation + `restoration.json` (t*, timestep rule); its card: `README.md`
- `router/`: the degradation-aware router (config.json + safetensors; its card, where it was pre-trained, is `router/README.md`)
- `noise_level/<degradation>/`: the noise level estimator that sets the timestep of an adapter with the `noise_sigma` rule (its card: `README.md`)
- `restoration.json`: the routing policy and composition chosen on validation data{pinned}

Trained by `dvc repro` (profile `{profile}`, `backbone.pretrained` = this folder's backbone) at commit
`{commit or 'unknown'}`, then copied here by `uir ship`.{trained_on}

## Adapters (validation split, PSNR dB)

| degradation | rank | t* | input | restored | W&B run |
|---|---|---|---|---|---|
{adapters}

## Noise level estimators (validation patches of that run; PSNR dB lost against the adapter's best timestep)

| adapter | learned | analytic σ̂ |
|---|---|---|
{noise_levels}

## Router (validation split of that run)

{", ".join(f"{k} {v:.3f}" for k, v in router.items() if isinstance(v, float) and k.startswith("val/")) or "see reports/fit_router.json"}

## Restoration settings

`{json.dumps(settings)}`

## Test sets of that run (held-out synthetic crops; mean PSNR dB, router accuracy)

`{json.dumps(headline)}`

## Reproduce

```bash
git checkout {commit or '<commit>'}
{params}make repro          # dvc repro: trains the adapters on the shipped backbone (and validates the shipped router)
.venv/bin/uir ship  # copies them here with this card
```
"""
