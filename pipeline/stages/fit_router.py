"""DVC stage ``fit_router``: the degradation-aware router over the trained degradations.

Trained on the single-degradation training sets, plus (``router.train.mixed_patches`` > 0) random
pairs of degradations (in the listed order, or in both: ``router.train.mix_orders``) applied to clean training patches, labelled with both components, plus the clean
patches themselves, labelled "clean", plus (``router.train.tone_patches`` > 0) singles and clean patches
whose clean photo had its tone changed first (``router.train.tone``, also applied to the training mixes), plus
(``router.train.denoised``) every training patch that holds noise denoised by the frozen backbone (``--backbone``)
at t(σ̂), labelled with its other components: what ``confirmed`` and ``cascade`` routing read again.
The unknown-degradation, mix and clean thresholds are calibrated on validation data. With ``router.pretrained``
set, that router folder is validated instead (its degradations must be these, in this order) and kept with the
thresholds it was calibrated with on its own validation photographs; this run's rates at them are reported.
The known threshold (the presence that makes an image its similarity flags unknown known after all) is
calibrated on this run's validation sets either way.
``--recalibrate`` calibrates a pretrained router's thresholds afresh on this run's validation sets (how the
shipped router's were redone under the current rules, on its own CBSD432 validation photos).
Writes ``<out>/`` (config.json + model.safetensors + README.md, its card), validation metrics and the W&B pointer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import stage_params

STAGE = "fit_router"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/degraded")
    parser.add_argument("--clean", default="data/clean")
    parser.add_argument("--backbone", default="models/backbone", help="the frozen backbone (router.train.denoised)")
    parser.add_argument("--out", default="models/router")
    parser.add_argument("--metrics", default=f"reports/{STAGE}.json")
    parser.add_argument("--checkpoints", default=f"checkpoints/{STAGE}")
    parser.add_argument("--recalibrate", action="store_true",
                        help="with router.pretrained: calibrate its thresholds on this run's validation sets")
    args = parser.parse_args(argv)
    params = stage_params(args.params)
    if args.recalibrate and not params.router.pretrained:
        parser.error("--recalibrate recalibrates a router.pretrained; a router trained here is calibrated anyway")

    import sys
    import time
    from dataclasses import asdict

    from omegaconf import OmegaConf
    from torch.utils.data import ConcatDataset

    from pipeline.data.datasets import D4Augmented, LabelledImages
    from pipeline.data.loaders import ShuffledD4Sampler, evaluation_loader, training_loader
    from pipeline.data.synthesis import ToneJitter
    from pipeline.files import write_json
    from pipeline.models.backbone import OneStepReadout, load_backbone
    from pipeline.models.card import append_validation, data_digest, router_card
    import pipeline.models.router as router_model
    import pipeline.training.router as router_training
    from pipeline.models.router import CLEAN_DESCRIPTION, DegradationRouter, RouterConfig, text_prototypes
    from pipeline.tracking import finish, log_model_folder, make_logger, wandb_mode
    from pipeline.training.router import (RouterTraining, calibrate_clean_threshold, calibrate_known_threshold,
                                          calibrate_mix_threshold, calibrate_threshold, clean_rates, clean_set, denoised_set, mix_rates, pairs,
                                          patch_set, with_clean_column)
    from pipeline.training.trainer import build_trainer, fit, resume_checkpoint, seed

    seed(params)
    cfg = params.router
    names = list(params.degradations)
    roots = [Path(args.data) / n for n in names]

    sizes = params.synthesis
    tone = ToneJitter(tuple(cfg.train.tone.gamma), tuple(cfg.train.tone.gain)) if cfg.train.tone else None
    drawn = {  # per split, the sets made in memory: (combos, count, random stream, tone change)
        "train": {"mixes": (pairs(names, cfg.train.mix_orders == "both"), cfg.train.mixed_patches, "mixed-patches", tone),
                  "toned": ([(n,) for n in names] + [()], cfg.train.tone_patches, "toned-patches", tone)},
        "val": {"mixes": (pairs(names, cfg.train.mix_orders == "both"), cfg.train.mixed_val_patches, "mixed-patches", None)}}
    parts = {}  # per split: singles, mixes, clean, tone-changed singles and clean (those drawn only if any)
    for split, size in (("train", sizes.patch_size), ("val", sizes.eval_crop))[1 if cfg.pretrained else 0:]:
        made = {kind: patch_set(params, names, args.clean, split, combos, count, size, stream, jitter)
                for kind, (combos, count, stream, jitter) in drawn[split].items()}
        parts[split] = {"singles": with_clean_column(LabelledImages.from_sets(roots, split)), "mixes": made["mixes"],
                        "clean": clean_set(roots[0], split, len(names) + 1), "toned": made.get("toned")}
        parts[split] = {kind: images for kind, images in parts[split].items() if images is not None}
    if cfg.train.denoised and not cfg.pretrained:
        if "noise" not in names:
            raise SystemExit(f"{STAGE}: router.train.denoised needs a degradation named noise, got {names}")
        unet, scheduler = load_backbone(args.backbone)
        train = parts["train"]
        denoised = denoised_set([train[kind] for kind in ("singles", "mixes") if kind in train], names.index("noise"),
                                unet.eval(), OneStepReadout(scheduler))
        if denoised is not None:
            train["denoised"] = denoised

    if cfg.pretrained:
        router = DegradationRouter.from_pretrained(cfg.pretrained)
        if router.names != names:
            raise SystemExit(f"{STAGE}: router.pretrained {cfg.pretrained} routes to {router.names}, but the "
                             f"degradations are {names}: set router.pretrained: null to train one for them")
    else:
        prototypes = None
        if cfg.prototypes == "text":  # frozen: the router learns to map images onto the names' embeddings
            clean = [CLEAN_DESCRIPTION] if cfg.clean_output == "prototype" else []
            prototypes = text_prototypes([params.degradations[n].description for n in names] + clean)
        router = DegradationRouter(RouterConfig(
            names=names, embed_dim=prototypes.shape[1] if prototypes is not None else cfg.embed_dim, width=cfg.width,
            temperature=cfg.temperature, prototypes=cfg.prototypes, clean=True, clean_output=cfg.clean_output),
            prototypes=prototypes)
    module = RouterTraining(router, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                            warmup_steps=cfg.train.warmup_steps, max_steps=cfg.train.max_steps)
    logger = make_logger(params, STAGE, job_type=STAGE)
    trainer = build_trainer(params, cfg.train.max_steps, cfg.train.val_every, logger, args.checkpoints)
    val_loaders = [evaluation_loader(part, cfg.train.batch_size) for part in parts["val"].values()]  # two sizes
    started = time.perf_counter()
    if cfg.pretrained:
        trainer.validate(module, val_loaders)
    else:
        # The router's code is part of what a checkpoint was trained from: another router's state is not resumed.
        code = [Path(router_model.__file__), Path(router_training.__file__)]
        ckpt_path = resume_checkpoint(args.checkpoints, params, [*roots, args.clean, *code])
        train_set = ConcatDataset(list(parts["train"].values()))
        print(f"{STAGE}: training patches: " + ", ".join(f"{kind} {len(images)}" for kind, images in parts["train"].items()))
        train_loader = training_loader(D4Augmented(train_set), ShuffledD4Sampler(len(train_set), cfg.train.batch_size,
                                                                                params.seed), params.trainer.num_workers)
        fit(trainer, module, cfg.train.val_every, ckpt_path, train_dataloaders=train_loader, val_dataloaders=val_loaders)
    seconds = time.perf_counter() - started
    if not trainer.is_global_zero:
        return
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    router.eval()
    val = parts["val"]
    degraded = [val["singles"], *([val["mixes"]] if "mixes" in val else [])]
    if cfg.pretrained and not args.recalibrate:  # calibrated on its own, larger validation split: kept, and measured on this one
        found_mixes = mix_rates(router, val["singles"], val.get("mixes"), router.config.mix_threshold)
        found_clean = clean_rates(router, degraded, val["clean"], router.config.clean_threshold)
    else:
        router.config.threshold = calibrate_threshold(router, val["singles"], cfg.unknown_quantile)
        router.config.mix_threshold, found_mixes = calibrate_mix_threshold(router, val["singles"], val.get("mixes"))
        router.config.clean_threshold, found_clean = calibrate_clean_threshold(router, degraded, val["clean"])
    # Calibrated here even for a pretrained router: the similarity flags photos unlike the router's own training
    # photos unknown, so what overrides it is measured on photos like those this run restores.
    router.config.known_threshold, found_known = calibrate_known_threshold(router, degraded, val["clean"])
    metrics.update(threshold=router.config.threshold, mix_threshold=router.config.mix_threshold, **found_mixes,
                   clean_threshold=router.config.clean_threshold, **found_clean,
                   known_threshold=router.config.known_threshold, **found_known)
    if cfg.pretrained:
        shipped_card = Path(cfg.pretrained) / "README.md"
        card = append_validation(shipped_card.read_text(), metrics, f"`{STAGE}` with router.pretrained = "
                                 f"{cfg.pretrained}, on {args.data}'s val split", digits=3) if shipped_card.is_file() else None
        if card is not None:
            card += (f"\nThe known threshold was calibrated on that split: {router.config.known_threshold:.4f} (an image "
                     f"flagged unknown is restored after all where its most probable degradation's presence reaches it).\n")
        if card is not None and args.recalibrate:
            card += (f"\nThe thresholds were calibrated afresh on that split (they replace the Configuration's): "
                     + ", ".join(f"{k} {metrics[k]:.4f}" for k in ("threshold", "mix_threshold", "clean_threshold"))
                     + f", by\n\n```bash\nmake params ARGS=\"profile={params.profile_name} router.pretrained={cfg.pretrained}\"\n"
                     f".venv/bin/dvc repro synthesize   # the clean photos and the validation sets\n"
                     f"python -m pipeline.stages.{STAGE} " + " ".join(argv if argv is not None else sys.argv[1:]) + "\n```\n")
    else:
        run = {"run_id": logger.version, "project": params.logger.project, "mode": wandb_mode(params)}
        command = (f"make params ARGS=profile={params.profile_name}   # + the overrides that give the settings above\n"
                   f"python -m pipeline.stages.{STAGE} {' '.join(argv if argv is not None else sys.argv[1:])}")
        card = router_card(asdict(router.config),
                           OmegaConf.to_container(cfg.train, resolve=True), sum(p.numel() for p in router.parameters()),
                           int(trainer.global_step), seconds, metrics, data_digest(args.clean), run, command)
    router.save_pretrained(args.out, card)
    metrics.update(parameters=sum(p.numel() for p in router.parameters()))
    log_model_folder(logger, STAGE, args.out, metrics)
    logger.experiment.summary.update(metrics)
    write_json(args.metrics, metrics)
    finish(logger, STAGE)
    print(f"{STAGE}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
