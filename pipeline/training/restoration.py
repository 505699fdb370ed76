"""One-step restoration on the frozen backbone: a LoRA per degradation, a shared LoRA, or a fully
fine-tuned multi-task model — one module, the network decides what trains."""

from __future__ import annotations

import copy
from typing import Sequence

import lightning as L
import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from pipeline.models.backbone import OneStepReadout
from pipeline.models.severity import rule_timesteps
from pipeline.training.schedules import warmup_cosine


def charbonnier(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Per-sample Charbonnier loss (a smooth L1)."""
    return torch.sqrt((prediction - target) ** 2 + eps**2).mean(dim=(1, 2, 3))


def _psnr() -> PeakSignalNoiseRatio:
    return PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))


class OneStepRestoration(L.LightningModule):
    """Restores ``lq`` as the x0-prediction of ``network`` at the task's timestep: ``t_star[task]``, or, for a
    task whose rule is ``noise_sigma``, the timestep of the noise level estimated from ``lq``.

    Only the parameters of ``network`` that require grad are optimised (LoRA weights on a frozen
    backbone, or the whole UNet for the multi-task baseline). ``task_weights`` rescale each task's
    loss so that tasks with large errors (low light, haze) do not drown the others in a union.
    The trainable weights with the best ``val/psnr`` are kept in ``best_state``: the model is chosen
    on validation, never on test.
    """

    def __init__(self, network: torch.nn.Module, readout: OneStepReadout, tasks: Sequence[str],
                 t_star: Sequence[int], lr: float, weight_decay: float, warmup_steps: int, max_steps: int,
                 task_weights: Sequence[float] | None = None, panel_images: int = 4,
                 timestep_rules: Sequence[str] | None = None):
        super().__init__()
        if len(t_star) != len(tasks):
            raise ValueError(f"one t* per task: {len(tasks)} tasks, {len(t_star)} timesteps")
        self.save_hyperparameters(ignore=["network", "readout", "task_weights"])
        self.network = network
        self.readout = readout
        self.register_buffer("t_star", torch.tensor(list(t_star), dtype=torch.long), persistent=False)
        self.timestep_rules = list(timestep_rules or ["fixed"] * len(tasks))
        weights = torch.ones(len(tasks)) if task_weights is None else torch.tensor(list(task_weights))
        self.register_buffer("task_weights", weights.float(), persistent=False)
        self.tasks = list(tasks)
        self.val_metrics = torch.nn.ModuleDict(
            {
                f"{kind}_{task}": torch.nn.ModuleDict({"psnr": _psnr(), "ssim": StructuralSimilarityIndexMeasure(data_range=1.0)})
                for task in self.tasks for kind in ("restored", "input")
            }
        )
        self.best_psnr = float("-inf")
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_metrics: dict[str, float] = {}
        # The degraded inputs' metrics: the validation set is the same every epoch, so they are measured once.
        self.input_metrics: dict[tuple[str, str, str], float] | None = None

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone().cpu() for n, p in self.network.named_parameters() if p.requires_grad}

    def forward(self, lq: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        timesteps = self.t_star[task]
        for index, rule in enumerate(self.timestep_rules):
            mask = task == index
            if rule != "fixed" and bool(mask.any()):
                timesteps = timesteps.clone()
                timesteps[mask] = rule_timesteps(rule, 0, lq[mask], self.readout)
        return self.readout(self.network, lq, timesteps)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        restored = self(batch["lq"], batch["task"])
        loss = (charbonnier(restored, batch["gt"]) * self.task_weights[batch["task"]]).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        restored = self(batch["lq"], batch["task"])
        loss = charbonnier(restored, batch["gt"]).mean()
        self.log("val/loss", loss, batch_size=batch["lq"].shape[0])
        as01 = lambda x: ((x + 1) / 2).clamp(0, 1)  # noqa: E731
        for index, task in enumerate(self.tasks):
            mask = batch["task"] == index
            if mask.any():
                measured = (("restored", restored),) if self.input_metrics else (("restored", restored), ("input", batch["lq"]))
                for kind, image in measured:
                    for metric in self.val_metrics[f"{kind}_{task}"].values():
                        metric.update(as01(image[mask]), as01(batch["gt"][mask]))
        if batch_idx == 0:
            self._log_panel(batch, restored)

    def _log_panel(self, batch: dict, restored: torch.Tensor) -> None:
        log_image = getattr(self.logger, "log_image", None)
        if log_image is None or self.hparams.panel_images <= 0:
            return
        n = min(self.hparams.panel_images, restored.shape[0])
        rows = [torch.cat([batch["lq"][i], restored[i], batch["gt"][i]], dim=2) for i in range(n)]
        panel = ((torch.cat(rows, dim=1) + 1) / 2).clamp(0, 1).cpu()
        log_image(key="val/panel", images=[panel], caption=["degraded | restored | clean"], step=self.global_step)

    def on_validation_epoch_end(self) -> None:
        values = {}
        for index, task in enumerate(self.tasks):
            for kind in ("restored", "input"):
                for name, metric in self.val_metrics[f"{kind}_{task}"].items():
                    if metric.update_count:
                        values[(kind, name, task)] = float(metric.compute())
                    metric.reset()
        if not values:
            return
        if self.input_metrics:
            values.update(self.input_metrics)
        elif not self.trainer.sanity_checking:  # the sanity check sees a few batches only
            self.input_metrics = {key: v for key, v in values.items() if key[0] == "input"}
        logged = {}
        for kind, prefix in (("restored", "val/"), ("input", "val/input_")):
            for name in ("psnr", "ssim"):
                per_task = {t: v for (k, n, t), v in values.items() if k == kind and n == name}
                logged[f"{prefix}{name}"] = sum(per_task.values()) / len(per_task)
                if len(self.tasks) > 1:
                    logged.update({f"{prefix}{name}/{t}": v for t, v in per_task.items()})
        self.log_dict(logged)
        if self.trainer.sanity_checking:
            return
        if logged["val/psnr"] > self.best_psnr:
            self.best_psnr = logged["val/psnr"]
            self.best_state = self.trainable_state()
            self.best_metrics = dict(logged, step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["best_on_validation"] = {"psnr": self.best_psnr, "state": self.best_state, "metrics": self.best_metrics}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        best = checkpoint["best_on_validation"]
        self.best_psnr, self.best_state, self.best_metrics = best["psnr"], best["state"], best["metrics"]

    def configure_optimizers(self):
        params = [p for p in self.network.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the network has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return {"optimizer": optimizer,
                "lr_scheduler": warmup_cosine(optimizer, self.hparams.warmup_steps, self.hparams.max_steps)}

    def load_best(self) -> dict[str, float]:
        """Put the best-on-validation weights back into the network; return their validation metrics."""
        if self.best_state is None:
            raise RuntimeError("no validation ran: set the validation interval below max_steps")
        missing = self.network.load_state_dict(self.best_state, strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"unexpected keys restoring best weights: {missing.unexpected_keys}")
        return copy.deepcopy(self.best_metrics)
