"""Model cards: ``README.md`` beside a model's weights, saying what it was trained on (with hashes), with
which settings, for how long, on what hardware, how well it validated, which W&B run logged it and the
command that reproduces it."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from pipeline.files import read_jsonl


def data_digest(clean: str | Path, split: str = "train") -> dict[str, Any]:
    """The images of ``split`` in a prepared clean folder: count per source and a SHA-256 over their names and
    bytes (sorted by name), from which the same training data can be checked."""
    clean = Path(clean)
    records = sorted((r for r in json.loads((clean / "manifest.json").read_text())["images"] if r["split"] == split),
                     key=lambda r: r["name"])
    digest = hashlib.sha256()
    sources: dict[str, int] = {}
    for record in records:
        digest.update(record["name"].encode() + b"\0" + (clean / record["file"]).read_bytes())
        origin = record["source"].split(":")[0] if record["source"].startswith("embedded:") else str(Path(record["source"]).parent)
        sources[origin] = sources.get(origin, 0) + 1
    return {"split": split, "images": len(records), "megapixels": round(sum(r["width"] * r["height"] for r in records) / 1e6, 2),
            "sources": sources, "sha256": digest.hexdigest()}


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} GPU), torch {torch.__version__}"
    cpu = platform.processor() or "CPU"
    if Path("/proc/cpuinfo").is_file():
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def synthesized_digest(folder: str | Path, split: str = "train") -> dict[str, Any]:
    """The pairs of ``split`` in a synthesized folder (``synthesize``): count, patch side, source photos, and a
    SHA-256 over each pair's degraded and clean PNG bytes in manifest order."""
    root = Path(folder) / split
    records = read_jsonl(root / "manifest.jsonl", "synthesize")
    digest = hashlib.sha256()
    sources: dict[str, int] = {}
    for record in records:
        digest.update((root / record["lq"]).read_bytes() + (root / record["gt"]).read_bytes())
        sources[record["source"]] = sources.get(record["source"], 0) + 1
    sides = sorted({record["box"][2] for record in records})
    return {"split": split, "pairs": len(records), "sides": sides, "sources": sources, "sha256": digest.hexdigest()}


def _data_section(data: Mapping[str, Any]) -> str:
    return (f"{data['images']} images ({data['megapixels']} MP) of the `{data['split']}` split of a prepared clean folder; "
            f"by source:\n{chr(10).join(f'- `{source}`: {count}' for source, count in sorted(data['sources'].items()))}\n\n"
            f"SHA-256 over the images' names and PNG bytes (sorted by name): `{data['sha256']}`")


def _run(run: Mapping[str, Any]) -> str:
    """The W&B run that logged the training, as a card names it."""
    return (f"`{run.get('run_id')}` (project `{run.get('project')}`, {run.get('mode')}"
            f"{', ' + run['url'] if run.get('url') else ''})")


def _val_rows(metrics: Mapping[str, float]) -> str:
    """The ``val/`` metrics as table rows, without the prefix."""
    return "\n".join(f"| {k.removeprefix('val/')} | {v:.2f} |" for k, v in sorted(metrics.items()) if k.startswith("val/"))


def _validation_and_reproduce(validated_on: str, rows: str, command: str) -> str:
    """A card's validation table and reproduce sections, its last."""
    return f"""## Validation ({validated_on})

| metric | value |
|---|---|
{rows}

## Reproduce

```bash
{command}
```
"""


def _closing_sections(config: Mapping[str, Any], validated_on: str, rows: str, command: str) -> str:
    """A card's configuration, validation table and reproduce sections."""
    return f"""## Configuration

```json
{json.dumps(dict(config), indent=2)}
```

""" + _validation_and_reproduce(validated_on, rows, command)


def backbone_card(architecture: Mapping[str, Any], train: Mapping[str, Any], parameters: int, steps: int,
                  seconds: float, metrics: Mapping[str, float], data: Mapping[str, Any], run: Mapping[str, Any],
                  command: str) -> str:
    """The card of a DDPM-pretrained backbone (``pretrain_backbone``)."""
    return f"""# UIR-LoRA backbone: UNet2DModel, {parameters / 1e6:.2f} M parameters

The frozen generative model every UIR-LoRA adapter is trained on: a DDPM (ε-prediction, uniform timesteps)
trained by the `pretrain_backbone` stage of uir-lora. Load it with `UNet2DModel.from_pretrained` and
`DDPMScheduler.from_pretrained` (this folder), or set `backbone.pretrained` to this folder.

## Training data

{_data_section(data)}

## Training

- steps: {steps} (batch {train['batch_size']}, patches {train['patch_size']}², AdamW lr {train['lr']}, warm-up {train['warmup_steps']},
  cosine decay, EMA {train['ema_decay']}; the EMA weights are these)
- wall time: {seconds / 60:.1f} min on {hardware()}
- W&B run: {_run(run)}

## Architecture

```yaml
{yaml.safe_dump(dict(architecture), sort_keys=False).strip()}
```

""" + _validation_and_reproduce("the split's held-out images; one-step denoising at the oracle timestep, PSNR dB",
                                _val_rows(metrics), command)


def router_card(config: Mapping[str, Any], train: Mapping[str, Any], parameters: int, steps: int, seconds: float,
                metrics: Mapping[str, float], data: Mapping[str, Any], run: Mapping[str, Any], command: str) -> str:
    """The card of a degradation-aware router (``fit_router``)."""
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in sorted(metrics.items()) if k != "parameters")
    return f"""# UIR-LoRA degradation-aware router: {parameters / 1e3:.1f} k parameters

Scores how similar an image's degradation is to each of `{', '.join(config['names'])}` (and "clean"), with a
presence read-out for mixes; trained by the `fit_router` stage of uir-lora. Load it with
`DegradationRouter.from_pretrained` (this folder), or set `router.pretrained` to this folder; its degradations
must be the pipeline's, in the same order.

## Training data

{_data_section(data)}

Trained on the synthesized single-degradation patches of those images, random pairs of degradations and clean
patches; the unknown, mix and clean thresholds were calibrated on the same folder's `val` split.

## Training

- steps: {steps} (batch {train['batch_size']}, AdamW lr {train['lr']}, weight decay {train['weight_decay']}, warm-up
  {train['warmup_steps']}, cosine decay; {train['mixed_patches']} mixed patches)
- wall time: {seconds / 60:.1f} min on {hardware()}
- W&B run: {_run(run)}

""" + _closing_sections(config, "the `val` split: `val/` as logged during training, the rest at the calibrated "
                                  "thresholds", rows, command)


def noise_level_card(config: Mapping[str, Any], settings: Mapping[str, Any], steps: int, seconds: float,
                     metrics: Mapping[str, float], data: Mapping[str, Any], run: Mapping[str, Any], command: str) -> str:
    """The card of a noise level estimator (``fit_noise_level``)."""
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in sorted(metrics.items()))
    return f"""# UIR-LoRA noise level estimator for the `{config['adapter']}` adapter

Sets the timestep of the `{config['adapter']}` adapter (timestep rule `noise_sigma`): the noise level σ at which
that adapter restores an image best, from the analytic σ̂ and a learned correction for noise that JPEG or blur
went over; trained by the `fit_noise_level` stage of uir-lora against the adapter beside it (`../loras/{config['adapter']}`).
Load it with `NoiseLevelEstimator.from_pretrained` (this folder).

## Training data

{_data_section(data)}

{settings['train_patches']} patches of {settings['patch_size']}², {settings['alone_share']:.0%} with the adapter's degradation alone,
the rest with one other degradation before or after it; each labelled by the adapter's PSNR at
{metrics['grid_timesteps']:.0f} timesteps (σ {settings['sigma_range'][0]}–{settings['sigma_range'][1]} on the 0–255 scale).

## Training

- steps: {steps} (batch {settings['train']['batch_size']}, AdamW lr {settings['train']['lr']}, L1 on log σ of the best timestep)
- wall time: {seconds / 60:.1f} min on {hardware()}, labelling included
- W&B run: {_run(run)}

""" + _closing_sections(config, "patches of the `val` split; regret: PSNR lost at the chosen timestep against the "
                                  "best of the grid", rows, command)


def lora_card(degradation: str, description: str, settings: Mapping[str, Any], train: Mapping[str, Any],
              trainable: int, backbone: int, metrics: Mapping[str, float], data: Mapping[str, Any], command: str) -> str:
    """The card of one degradation's LoRA (``train_lora``), in place of PEFT's template: its front matter is plain
    YAML (PEFT's names the base model by a ``pathlib`` object no YAML loader reads). Only what retraining
    reproduces, so that the adapter folder keeps its bytes and its DVC hash: no wall time, no W&B run id (that
    is in ``reports/wandb/train_lora@<degradation>.json``; ``uir ship`` names it in the shipped set's card)."""
    sources = ", ".join(f"`{name}` {count}" for name, count in sorted(data["sources"].items()))
    rule = ("at the timestep whose noise level is the σ estimated for each image (rule `noise_sigma`)"
            if settings["timestep"] == "noise_sigma" else f"at the fixed timestep t* = {settings['t_star']}")
    return f"""---
library_name: peft
tags:
- lora
- image-restoration
- uir-lora
- {degradation}
---

# UIR-LoRA adapter: {degradation}

{description[:1].upper() + description[1:]}, restored in one step by the frozen backbone (`../../backbone`) with
this LoRA, {rule}. Trained by the `train_lora@{degradation}` stage of uir-lora. Loaded by
`AdapterComposition.from_pretrained` (from the models folder two levels up), or by PEFT's
`PeftModel.from_pretrained` on that backbone. `restoration.json` holds the timestep settings.

## Training data

{data['pairs']} degraded/clean pairs of {' / '.join(f'{side}²' for side in data['sides'])} pixels: the `{data['split']}` split of the
synthesized folder, cut from {len(data['sources'])} photos ({sources}).

SHA-256 over each pair's degraded and clean PNG bytes (manifest order): `{data['sha256']}`

## Training

- rank {settings['rank']}, alpha {settings['alpha']}, on `{'`, `'.join(settings['targets'])}`: {trainable} trainable parameters
  ({100 * trainable / backbone:.1f} % of the backbone's {backbone})
- {train['max_steps']} steps (batch {train['batch_size']}, AdamW lr {train['lr']}, warm-up {train['warmup_steps']}, cosine decay);
  the weights kept are those of the best validation PSNR (step {metrics['step']:.0f})
- W&B: the run `train_lora@{degradation}` of the experiment's group; its id is in `reports/wandb/train_lora@{degradation}.json`

""" + _validation_and_reproduce("the synthesized `val` split, PSNR dB / SSIM; `input_`: the degraded images",
                                _val_rows(metrics), command)


def append_validation(card: str, metrics: Mapping[str, float], where: str, digits: int = 2) -> str:
    """A card used by another run: the metrics that run measured, appended."""
    rows = "\n".join(f"| {k} | {v:.{digits}f} |" for k, v in sorted(metrics.items())
                     if k.startswith("val/") or k.endswith("_rate"))
    return f"{card.rstrip()}\n\n## Validated again: {where}\n\n| metric | value |\n|---|---|\n{rows}\n"
