"""DVC stage ``select_restoration``: how UIR-LoRA restores (routing policy, mix threshold, composition),
chosen on the validation sets, single and mixed; the test sets are never read.

Writes ``<models>/restoration.json`` (what ``uir restore`` and ``evaluate`` then use) and
``reports/select_restoration.json`` (every candidate's validation PSNR, per set, its standard error against the
best and the adapters it applied per image: ``pipeline.evaluation.selection`` says how one is chosen).
"""

from __future__ import annotations

import argparse

from pipeline.config import stage_params

STAGE = "select_restoration"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/degraded")
    parser.add_argument("--mixed", default="data/mixed")
    parser.add_argument("--models", default="models")
    parser.add_argument("--report", default=f"reports/{STAGE}.json")
    args = parser.parse_args(argv)
    params = stage_params(args.params)

    from pathlib import Path

    import torch
    from omegaconf import OmegaConf

    from pipeline.evaluation.selection import ceilings, choose, choose_plans, choose_strengths, load_sets
    from pipeline.files import write_json
    from pipeline.models.restorer import SETTINGS_FILE, RestorationCache, RestorationSettings, UniversalRestorer
    from pipeline.training.trainer import configure_threads

    configure_threads(params.trainer)
    torch.set_grad_enabled(False)
    base = RestorationSettings.from_params(params.restoration)
    candidates = OmegaConf.to_container(params.restoration.candidates) if params.restoration.choose_on_validation else [{}]
    restorer = UniversalRestorer.from_pretrained(args.models, settings=base, cache=RestorationCache())  # candidates share restorations
    sets = load_sets(args.data, args.mixed, list(params.degradations), params.mixed, "val")
    plans, plan_rows = choose_plans(restorer, sets)
    for row in plan_rows:
        print(f"{STAGE}: plan for {row['mix']}: {row['chosen']} ("
              + ", ".join(f"{k} {v:.2f}" for k, v in row["val_psnr"].items()) + " dB on validation)")
    limits = ceilings(args.data, list(params.restoration.ceiling_adapters), list(params.degradations))
    for name, value in limits.items():
        print(f"{STAGE}: {name} is added to no restoration brighter than its training inputs' {value:.3f}")
    strengths, strength_rows = choose_strengths(restorer, sets, list(params.restoration.strength_knots)) \
        if params.restoration.strength_knots else ({}, [])
    for row in strength_rows:
        print(f"{STAGE}: {row['adapter']} strength by noise level {row['strengths']}: val PSNR {row['val_psnr_fitted']:.2f} dB ("
              + ", ".join(f"{k}: {v:.2f}" for k, v in row["val_psnr_by_strength"].items()) + " at one strength)")
    mixes = sorted({"+".join(sorted(mix)) for mix in params.mixed})
    base = RestorationSettings(**{**base.__dict__, "plans": plans, "ceilings": limits, "validated_mixes": mixes,
                                  "strengths": strengths})
    chosen, rows, best = choose(restorer, base, candidates, sets)
    chosen.save(Path(args.models) / SETTINGS_FILE)
    write_json(args.report, {"chosen": best, "plans": plan_rows, "strengths": strength_rows, "candidates": rows})
    for row in rows:
        s = row["settings"]
        print(f"{STAGE}: {s['policy']:<9} {s['composition']:<10} unknown {s['unknown']:<8} noise level {s['noise_level']:<8} "
              f"mix threshold {s['mix_threshold']}" + (f" gate {s['cascade_gate']} pairs {s['cascade_pairs']}" if s["policy"] == "cascade" else "")
              + f": val PSNR "
              f"{row['mean_psnr']:.2f} ± {row['standard_error_to_best']:.2f} (single {row['single_psnr']:.2f}, mixed "
              f"{row['mixed_psnr'] or float('nan'):.2f}), {row['adapters_per_image']:.2f} adapters per image")
    print(f"{STAGE}: chose {chosen}")


if __name__ == "__main__":
    main()
