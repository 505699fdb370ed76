"""DVC stage ``fit_noise_level``: a noise level estimator for each adapter whose timestep follows the noise level
(timestep rule ``noise_sigma``), fitted to the timesteps at which that adapter restores best.

Training and validation patches are the ``train`` and ``val`` clean images with the adapter's degradation alone
or with one other degradation before or after it (``pipeline.training.noise_level``). Writes
``<out>/<adapter>/`` (config.json + model.safetensors + README.md, its card) for each such adapter, validation
metrics and the W&B pointer.
"""

from __future__ import annotations

import argparse

from pipeline.config import adapter_settings, stage_params

STAGE = "fit_noise_level"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--clean", default="data/clean")
    parser.add_argument("--models", default="models", help="the models folder: its backbone and adapters")
    parser.add_argument("--out", default="models/noise_level")
    parser.add_argument("--metrics", default=f"reports/{STAGE}.json")
    parser.add_argument("--checkpoints", default=f"checkpoints/{STAGE}")
    args = parser.parse_args(argv)
    params = stage_params(args.params)

    import sys
    import time
    from pathlib import Path

    import torch
    from omegaconf import OmegaConf
    from tqdm import tqdm

    from pipeline.data.loaders import ShuffledD4Sampler, evaluation_loader, training_loader
    from pipeline.data.synthesis import load_clean
    from pipeline.files import atomic_dir, write_json
    from pipeline.models.card import data_digest, noise_level_card
    from pipeline.models.composition import AdapterComposition
    from pipeline.models.folder import ModelsFolder
    from pipeline.models.noise_level import NoiseLevelConfig, NoiseLevelEstimator
    from pipeline.tracking import finish, log_model_folder, make_logger, wandb_mode
    from pipeline.training.noise_level import (LabelledFeatures, NoiseLevelTraining, noise_patches, psnr_curves,
                                               timestep_grid)
    from pipeline.training.trainer import build_trainer, fit, resume_checkpoint, seed

    seed(params)
    cfg = params.noise_level
    names = list(params.degradations)
    adapters = [n for n in names if adapter_settings(params, n)["timestep"] == "noise_sigma"]
    folder = ModelsFolder(args.models)
    folder.require_backbone()
    folder.require_adapters(adapters)
    images = {split: load_clean(args.clean, split) for split in ("train", "val")}
    logger = make_logger(params, STAGE, job_type=STAGE)
    metrics: dict[str, dict[str, float]] = {}
    trained: dict[str, tuple[NoiseLevelEstimator, str]] = {}
    for adapter in adapters:
        started = time.perf_counter()
        composition = AdapterComposition.from_pretrained(folder.backbone, {adapter: folder.lora(adapter)})
        timesteps = timestep_grid(composition, tuple(cfg.sigma_range), cfg.grid)
        estimator = NoiseLevelEstimator(NoiseLevelConfig(adapter=adapter, hidden=cfg.hidden))
        sets = {}
        for split, count in (("train", cfg.train_patches), ("val", cfg.val_patches)):
            patches = noise_patches(params.degradations, names, adapter, images[split], cfg.patch_size, count,
                                    cfg.alone_share, params.seed, f"noise-level-{split}")
            with tqdm(total=count, desc=f"{STAGE}: labelling {split} patches", unit="patch") as bar:
                curves = psnr_curves(composition, adapter, patches, timesteps, progress=bar.update)
            sets[split] = LabelledFeatures(estimator.features(patches.degraded), curves)
        estimator.standardise(sets["train"].features)
        train = cfg.train
        module = NoiseLevelTraining(estimator, composition.readout.k[timesteps], lr=train.lr,
                                    weight_decay=train.weight_decay, warmup_steps=train.warmup_steps,
                                    max_steps=train.max_steps)
        checkpoints = Path(args.checkpoints) / adapter
        trainer = build_trainer(params, train.max_steps, train.val_every, logger, checkpoints)
        loader = training_loader(sets["train"], ShuffledD4Sampler(len(sets["train"]), train.batch_size, params.seed),
                                 params.trainer.num_workers)
        ckpt_path = resume_checkpoint(checkpoints, params, [args.clean, folder.backbone, folder.lora(adapter)])
        fit(trainer, module, train.val_every, ckpt_path, train_dataloaders=loader,
            val_dataloaders=evaluation_loader(sets["val"], train.batch_size))
        seconds = time.perf_counter() - started
        if not trainer.is_global_zero:
            return
        found = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        found.update(grid_timesteps=len(timesteps), seconds=seconds)
        metrics[adapter] = found
        run = {"run_id": logger.version, "project": params.logger.project, "mode": wandb_mode(params)}
        command = (f"make params ARGS=profile={params.profile_name}   # + the overrides that give the settings above\n"
                   f"python -m pipeline.stages.{STAGE} {' '.join(argv if argv is not None else sys.argv[1:])}")
        trained[adapter] = (estimator.eval(), noise_level_card(
            {"adapter": adapter, "hidden": cfg.hidden, "block": estimator.config.block}, OmegaConf.to_container(cfg, resolve=True),
            int(trainer.global_step), seconds, found, data_digest(args.clean), run, command))
        print(f"{STAGE}: {adapter}: validation regret {found['val/regret_db_estimator']:.3f} dB "
              f"(analytic σ̂: {found['val/regret_db_analytic']:.3f} dB) over {len(timesteps)} timesteps")
    with atomic_dir(args.out) as out:  # one folder per adapter; empty where no adapter follows the noise level
        for adapter, (estimator, card) in trained.items():
            estimator.save_pretrained(out / adapter, card)
    if adapters:
        log_model_folder(logger, STAGE, args.out, {f"{a}/{k}": v for a, m in metrics.items() for k, v in m.items()})
    logger.experiment.summary.update({f"{a}/{k}": v for a, m in metrics.items() for k, v in m.items()})
    write_json(args.metrics, metrics)
    finish(logger, STAGE)


if __name__ == "__main__":
    main()
