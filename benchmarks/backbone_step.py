"""``python -m benchmarks.backbone_step``: where the time of a backbone training step goes, on CPU or GPU.

The backbone recipe's GPU variant ran at 26 steps/s on one H200 at batch 64 and at batch 256 alike
(``reports/pretrain_gpu``): bound by the cost of a step, not by its arithmetic. This times the recipe's
optimisation step (DDPM loss, backward, AdamW, optionally the EMA update) for its architecture at several batch
sizes, in fp32 and in bf16 autocast, eager and optionally ``torch.compile``'d, and prints steps/s and patches/s
(each the best of ``--repeats`` timed runs of ``--steps`` steps), so a recipe's batch and precision are chosen
by measurement on the machine that will run it. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from benchmarks.report import table, write_report
from pipeline.config import load_params
from pipeline.models.backbone import build_scheduler, build_unet
from pipeline.training.backbone import ddpm_loss


def time_steps(device: str, batch: int, patch: int, params, precision: str, ema: bool, compiled: bool,
               steps: int, repeats: int) -> float:
    """Seconds per optimisation step: the best of ``repeats`` runs of ``steps`` steps, after one warm-up run."""
    torch.manual_seed(0)
    unet = build_unet(params.backbone.architecture).to(device).train()
    scheduler = build_scheduler(params.backbone.schedule)
    network = torch.compile(unet) if compiled else unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    average = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True) if ema else None
    clean = torch.rand(batch, 3, patch, patch, device=device) * 2 - 1
    dtype = torch.bfloat16 if precision == "bf16" else None

    def run() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                loss = ddpm_loss(network, scheduler, clean)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if average is not None:
                average.update_parameters(unet)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps

    run()  # warm-up (and compilation)
    return min(run() for _ in range(repeats))


def markdown(result: dict) -> str:
    rows = [[str(r["batch"]), r["precision"], "yes" if r["ema"] else "no", "yes" if r["compiled"] else "no",
             f"{1000 * r['seconds_per_step']:.1f}", f"{1 / r['seconds_per_step']:.1f}",
             f"{r['batch'] / r['seconds_per_step']:.0f}"] for r in result["rows"]]
    return (f"Backbone training step on {result['device']} ({result['threads']} threads), architecture "
            f"{result['architecture']}, patches {result['patch']}²; best of {result['repeats']} runs of "
            f"{result['steps']} steps each.\n\n"
            + table(["batch", "precision", "EMA", "compiled", "ms / step", "steps / s", "patches / s"], rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd network")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("reports/backbone_step"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    patch = params.backbone.train.patch_size
    rows = []
    for batch in args.batches:
        for precision in args.precisions:
            for ema in (False, True):
                for compiled in (False, True) if args.compile else (False,):
                    seconds = time_steps(args.device, batch, patch, params, precision, ema, compiled, args.steps,
                                         args.repeats)
                    rows.append({"batch": batch, "precision": precision, "ema": ema, "compiled": compiled,
                                 "seconds_per_step": seconds})
                    print(rows[-1], flush=True)
    architecture = "-".join(str(c) for c in params.backbone.architecture.block_out_channels)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    result = {"device": device, "threads": torch.get_num_threads(), "architecture": architecture, "patch": patch,
              "steps": args.steps, "repeats": args.repeats, "rows": rows}
    text = markdown(result)
    write_report(args.out, result, text)
    print(text)


if __name__ == "__main__":
    main()
