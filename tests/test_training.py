"""LightningModules on tiny data: fast_dev_run, what trains, what is saved."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from peft import PeftModel

from pipeline.config import load_params
from pipeline.data.datasets import CleanPatchDataModule, RestorationDataModule
from pipeline.models.adapters import attach_lora, lora_config, read_restoration_settings, save_adapter
from pipeline.models.backbone import OneStepReadout, build_scheduler, build_unet, load_backbone, save_backbone
from pipeline.training.backbone import BackboneDDPM
from pipeline.training.restoration import OneStepRestoration

from .conftest import ROOT
from .wandb_records import run_contents


@pytest.fixture(scope="module")
def params(tiny_project):
    return load_params(tiny_project / "params.yaml")


@pytest.fixture()
def backbone(params):
    torch.manual_seed(0)
    return build_unet(params.backbone.architecture), build_scheduler(params.backbone.schedule)


def _trainer(**kwargs):
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def _restoration(network, scheduler, tasks=("noise",), t_star=(200,)):
    return OneStepRestoration(network, OneStepReadout(scheduler), list(tasks), list(t_star), lr=1e-3,
                              weight_decay=0.0, warmup_steps=1, max_steps=4, panel_images=0)


def test_backbone_ddpm_fast_dev_run(tiny_project, params, backbone):
    unet, scheduler = backbone
    before = {n: p.clone() for n, p in unet.named_parameters()}
    module = BackboneDDPM(unet, scheduler, lr=1e-3, weight_decay=0.0, ema_decay=0.9, warmup_steps=1, max_steps=2,
                          val_sigmas=[25])
    datamodule = CleanPatchDataModule(tiny_project / "data/clean", 32, 4, 2, 4, seed=0)
    trainer = _trainer(fast_dev_run=True)
    trainer.fit(module, datamodule=datamodule)
    assert any(not torch.equal(before[n], p) for n, p in unet.named_parameters())
    assert {"val/psnr_sigma25", "val/psnr_input_sigma25"} <= set(trainer.callback_metrics)


@pytest.mark.parametrize("kind,precision", [("lora", "32-true"), ("multitask", "32-true"), ("lora", "bf16-mixed"),
                                            ("multitask", "bf16-mixed")])
def test_restoration_fast_dev_run(tiny_project, backbone, kind, precision):
    unet, scheduler = backbone
    roots = [tiny_project / "data/degraded/noise", tiny_project / "data/degraded/jpeg"]
    if kind == "lora":
        network = attach_lora(unet.requires_grad_(False), lora_config({"rank": 4, "alpha": 4, "targets": ["conv1", "conv2"]}))
    else:
        network = unet.requires_grad_(True)
    module = _restoration(network, scheduler, ("noise", "jpeg"), (200, 120))
    before = {n: p.clone() for n, p in network.named_parameters() if p.requires_grad}
    trainer = _trainer(fast_dev_run=True, precision=precision)
    trainer.fit(module, datamodule=RestorationDataModule(roots, batch_size=4, seed=0))
    metrics = trainer.callback_metrics
    trained = {n: p for n, p in network.named_parameters() if p.requires_grad}
    assert any(not torch.equal(before[n], p) for n, p in trained.items())
    assert {p.dtype for p in trained.values()} == {torch.float32}  # mixed precision keeps fp32 master weights
    assert torch.isfinite(metrics["val/psnr"])
    assert {"val/psnr", "val/ssim", "val/input_psnr", "val/psnr/noise"} <= set(metrics)  # one val batch: noise only
    assert module.best_state is not None and module.load_best()["val/psnr"] == pytest.approx(float(metrics["val/psnr"]))


def test_input_metrics_are_measured_once_and_logged_at_every_validation(tiny_project, backbone, monkeypatch):
    unet, scheduler = backbone
    roots = [tiny_project / "data/degraded/noise", tiny_project / "data/degraded/jpeg"]
    network = attach_lora(unet.requires_grad_(False), lora_config({"rank": 4, "alpha": 4, "targets": ["conv1", "conv2"]}))
    module = _restoration(network, scheduler, ("noise", "jpeg"), (200, 120))
    logged, updates = [], []
    monkeypatch.setattr(module, "log_dict", lambda values, **kw: logged.append(dict(values)))
    input_psnr = module.val_metrics["input_noise"]["psnr"]
    monkeypatch.setattr(input_psnr, "update", lambda *a, u=input_psnr.update: (updates.append(1), u(*a)))
    datamodule = RestorationDataModule(roots, batch_size=4, seed=0)
    trainer = _trainer(max_steps=6, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    assert len(logged) == 3 and all(entry["val/input_psnr"] == logged[0]["val/input_psnr"] for entry in logged)
    assert len({entry["val/psnr"] for entry in logged}) > 1  # the restored ones are measured every time
    val_batches = len(datamodule.val_dataloader())
    assert len(updates) == sum(1 for b in datamodule.val_dataloader() if (b["task"] == 0).any()) <= val_batches
    noise = datamodule.val_set.datasets[0]
    expected = torch.stack([-10 * torch.log10(((((lq + 1) / 2).clamp(0, 1) - ((gt + 1) / 2).clamp(0, 1)) ** 2).mean())
                            for lq, gt in zip(noise.lq, noise.gt)]).mean()
    assert logged[-1]["val/input_psnr/noise"] == pytest.approx(float(expected), abs=1e-4)


def test_lora_training_leaves_the_backbone_bit_identical_and_only_lora_gets_gradients(tiny_project, backbone):
    unet, scheduler = backbone
    frozen = {n: p.detach().clone() for n, p in unet.named_parameters()}
    model = attach_lora(unet, lora_config({"rank": 4, "alpha": 4, "targets": ["conv1", "conv2", "conv_in"]}))
    with_grad = set()

    class RecordGradients(L.Callback):
        def on_after_backward(self, trainer, module):
            with_grad.update(n for n, p in module.network.named_parameters() if p.grad is not None)

    module = _restoration(model, scheduler)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer = _trainer(max_steps=4, limit_val_batches=0, callbacks=[RecordGradients()])
    trainer.fit(module, datamodule=RestorationDataModule([tiny_project / "data/degraded/noise"], batch_size=4, seed=0))

    assert with_grad and all("lora_" in n for n in with_grad)
    assert any(not torch.equal(lora_before[n], p) for n, p in model.named_parameters() if n in lora_before)
    for name, param in model.get_base_model().named_parameters():
        if "lora_" not in name:
            original = name.replace(".base_layer", "")
            assert torch.equal(param, frozen[original]), f"{name} changed"


def test_saved_adapter_reloads_with_peft_to_the_same_outputs(tmp_path, backbone):
    unet, scheduler = backbone
    save_backbone(tmp_path / "backbone", unet, scheduler)
    base, _ = load_backbone(tmp_path / "backbone")
    model = attach_lora(base, lora_config({"rank": 4, "alpha": 8, "targets": ["conv1", "conv2"]}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # a trained adapter, not the zero-initialised one
    save_adapter(model, tmp_path / "adapter", "noise", 200)
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert read_restoration_settings(tmp_path / "adapter") == {"degradation": "noise", "t_star": 200, "timestep": "fixed"}

    fresh, _ = load_backbone(tmp_path / "backbone")
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([200, 200])
    with torch.no_grad():
        bare = fresh(x, t).sample
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    with torch.no_grad():
        expected, got = model(x, t).sample, reloaded(x, t).sample
    assert torch.equal(expected, got)
    assert not torch.allclose(got, bare), "the adapter changes the backbone's output"


def test_train_lora_stage_logs_a_real_offline_wandb_run(tiny_project, monkeypatch):
    """The stage end to end; the W&B run's own .wandb file holds the config, the metrics and an image."""
    from pipeline.stages import pretrain_backbone, train_lora

    monkeypatch.chdir(tiny_project)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("DVC_EXP_NAME", "test-exp")
    pretrain_backbone.main([])
    train_lora.main(["noise", "--data", "data/degraded/noise", "--out", "models/loras/noise",
                     "--metrics", "reports/train_lora/noise.json", "--checkpoints", "checkpoints/lora_noise"])

    metrics = json.loads(Path("reports/train_lora/noise.json").read_text())
    assert {"val/psnr", "val/input_psnr", "val/ssim", "psnr_gain", "adapter_parameters"} <= set(metrics)
    pointer = json.loads(Path("reports/wandb/train_lora@noise.json").read_text())
    assert pointer["mode"] == "offline" and pointer["group"] == "test-exp" and pointer["job_type"] == "train_lora"
    run = run_contents(pointer["dir"])
    assert {"seed", "lora", "degradations", "synthesis", "model/parameters_trainable"} <= set(run["config"])
    assert run["config"]["lora"]["adapter"]["rank"] == 8
    assert {"train/loss", "val/psnr", "val/ssim", "val/input_psnr"} <= run["history"]
    assert {"val/panel/_type", "val/panel/filenames"} <= run["history"]
    (panel,) = run["values"]["val/panel/filenames"][0]
    assert (Path(pointer["dir"]) / "files" / panel).is_file()
    assert any(p.name.endswith(".wandb") for p in Path(pointer["dir"]).iterdir())
    assert Path("models/loras/noise/adapter_model.safetensors").is_file()
    assert Path("reports/backbone_samples.png").is_file()
    card = Path("models/loras/noise/README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])  # PEFT's own card named the base model by a pathlib object
    assert front["library_name"] == "peft" and "noise" in front["tags"]
    for needle in ("# UIR-LoRA adapter: noise", "reports/wandb/train_lora@noise.json", "python -m pipeline.stages.train_lora noise",
                   f"| psnr | {metrics['val/psnr']:.2f} |", "SHA-256"):
        assert needle in card


def test_validating_a_pretrained_backbone_writes_every_output_the_stage_declares(tiny_project, tmp_path, monkeypatch):
    """The default profile validates the shipped backbone instead of training one; a fresh clone's `dvc repro`
    then failed because the stage left its declared checkpoints folder unwritten."""
    import shutil

    import yaml

    from pipeline.config import compose_params
    from pipeline.stages import pretrain_backbone

    shutil.copytree(tiny_project / "data" / "clean", tmp_path / "data" / "clean")
    smoke = load_params(tiny_project / "params.yaml")
    save_backbone(tmp_path / "shipped", build_unet(smoke.backbone.architecture), build_scheduler(smoke.backbone.schedule))
    compose_params(tmp_path / "params.yaml", ROOT / "conf", ["profile=smoke", "logger.mode=disabled",
                                                             f"backbone.pretrained={tmp_path / 'shipped'}"])
    monkeypatch.chdir(tmp_path)
    pretrain_backbone.main([])
    outs = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["pretrain_backbone"]["outs"]
    declared = [next(iter(o)) if isinstance(o, dict) else o for o in outs]
    assert [path for path in declared if not Path(path).exists()] == []


def _resumable_run(kind, tiny_project, params, checkpoint_dir, stop_at, total=10):
    """Train ``kind`` for ``total`` steps with the stages' trainer, stopping early at ``stop_at`` (as a kill
    after that step's checkpoint would) and resuming from ``checkpoint_dir`` when it holds a checkpoint."""
    from pipeline.training.trainer import build_trainer, fit, resume_checkpoint, seed

    seed(params)
    unet, scheduler = build_unet(params.backbone.architecture), build_scheduler(params.backbone.schedule)
    if kind == "backbone":
        module = BackboneDDPM(unet, scheduler, lr=1e-3, weight_decay=0.0, ema_decay=0.9, warmup_steps=1,
                              max_steps=total, val_sigmas=[25])
        datamodule = CleanPatchDataModule(tiny_project / "data/clean", 32, 4, 3, 4, seed=params.seed)
        inputs = [tiny_project / "data/clean"]
    else:
        unet = attach_lora(unet, lora_config({"rank": 2, "alpha": 2, "targets": ["conv1", "conv2"]}))
        module = OneStepRestoration(unet, OneStepReadout(scheduler), ["noise"], [200], lr=3e-3, weight_decay=0.0,
                                    warmup_steps=1, max_steps=total, panel_images=0)
        datamodule = RestorationDataModule([tiny_project / "data/degraded/noise"], 6, seed=params.seed)
        inputs = [tiny_project / "data/degraded/noise"]
    ckpt = resume_checkpoint(checkpoint_dir, params, inputs)
    trainer = build_trainer(params, stop_at, 2, False, checkpoint_dir, enable_model_summary=False,
                            enable_progress_bar=False)
    fit(trainer, module, 2, ckpt, datamodule=datamodule)
    return module, ckpt


@pytest.mark.parametrize("kind", ["backbone", "lora"])
def test_a_resumed_run_ends_with_the_uninterrupted_weights(tiny_project, params, tmp_path, kind, capsys):
    """Checkpoints after every validation; a run stopped at step 5 (mid-epoch: 3 or 5 batches per epoch)
    resumes from step 4 and ends bit-identical to an uninterrupted run, best-on-val bookkeeping included."""
    whole, _ = _resumable_run(kind, tiny_project, params, tmp_path / "whole", stop_at=10)
    _resumable_run(kind, tiny_project, params, tmp_path / "resumed", stop_at=5)
    saved = torch.load(tmp_path / "resumed/last.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    capsys.readouterr()
    resumed, ckpt = _resumable_run(kind, tiny_project, params, tmp_path / "resumed", stop_at=10)
    assert ckpt == tmp_path / "resumed/last.ckpt"
    assert f"resuming from {ckpt} at step 4" in capsys.readouterr().out
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    if kind == "lora":
        assert whole.best_metrics == resumed.best_metrics
        assert all(torch.equal(whole.best_state[k], resumed.best_state[k]) for k in whole.best_state)


def test_a_checkpoint_from_other_params_is_not_resumed(tiny_project, params, tmp_path):
    from pipeline.training.trainer import resume_checkpoint

    _resumable_run("lora", tiny_project, params, tmp_path / "run", stop_at=2)
    assert resume_checkpoint(tmp_path / "run", params, [tiny_project / "data/degraded/noise"]) is not None
    changed = OmegaConf.merge(params, {"lora": {"train": {"lr": 0.5}}})
    assert resume_checkpoint(tmp_path / "run", changed, [tiny_project / "data/degraded/noise"]) is None
    assert not (tmp_path / "run/last.ckpt").exists(), "a stale checkpoint is removed, never resumed"


@pytest.mark.parametrize("targets", [["conv1", "conv2"], ["conv_in", "conv_out", "time_emb_proj"]])
def test_merged_lora_forward_matches_peft_in_outputs_and_gradients(backbone, targets):
    from pipeline.models.adapters import merged_lora_forward

    unet, _ = backbone
    model = attach_lora(unet, lora_config({"rank": 16, "alpha": 8, "targets": targets}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([100, 400])

    def run():
        model.zero_grad()
        out = model(x, t).sample
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    reference, reference_grads = run()
    with merged_lora_forward(model):
        merged, merged_grads = run()
    after, _ = run()
    torch.testing.assert_close(merged, reference, atol=1e-5, rtol=1e-4)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(merged_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)
    assert torch.equal(after, reference), "PEFT's own forward is back after the context"


@pytest.mark.parametrize("accelerator,precision,native,warns", [
    ("cpu", "bf16-mixed", False, True),  # emulated bf16: slower than fp32, said so
    ("cpu", "bf16-mixed", True, False),
    ("cpu", "32-true", False, False),
    ("gpu", "bf16-mixed", False, False),  # the GPU's bf16, not the CPU's
])
def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(monkeypatch, recwarn, accelerator, precision, native, warns):
    from pipeline.training import trainer

    monkeypatch.setattr(trainer, "native_cpu_bf16", lambda: native)
    trainer.check_precision(OmegaConf.create({"accelerator": accelerator, "precision": precision}))
    messages = [str(w.message) for w in recwarn if "native bf16" in str(w.message)]
    assert bool(messages) == warns
    assert not warns or "-S trainer.precision=32-true" in messages[0]
