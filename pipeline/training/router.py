"""Training the degradation router: soft cross-entropy of ``s / τ`` against the target distribution
(one-hot for a single degradation, uniform over the components of a mix)."""

from __future__ import annotations

import lightning as L
import torch
from torchmetrics import MeanMetric

from pipeline.models.router import DegradationRouter, top_k_weights
from pipeline.training.schedules import warmup_cosine


class RouterTraining(L.LightningModule):
    def __init__(self, router: DegradationRouter, lr: float, weight_decay: float, warmup_steps: int, max_steps: int):
        super().__init__()
        self.save_hyperparameters(ignore=["router"])
        self.router = router
        self.top1 = MeanMetric()
        self.recall = MeanMetric()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = -(batch["target"] * self.router(batch["image"]).log_softmax(dim=-1)).sum(dim=-1).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self.router(batch["image"])
        target = batch["target"]
        single = (target > 0).sum(dim=-1) == 1
        if single.any():
            self.top1.update((logits[single].argmax(-1) == target[single].argmax(-1)).float())
        if (~single).any():
            truth = target[~single] > 0
            kept = top_k_weights(logits[~single], self.router.config.top_k) > 0
            self.recall.update((kept & truth).sum(-1).float() / truth.sum(-1))

    def on_validation_epoch_end(self) -> None:
        for name, metric in (("val/top1_accuracy", self.top1), ("val/mixed_recall", self.recall)):
            if metric.update_count:
                self.log(name, metric.compute(), prog_bar=True, add_dataloader_idx=False)
            metric.reset()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.router.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return {"optimizer": optimizer,
                "lr_scheduler": warmup_cosine(optimizer, self.hparams.warmup_steps, self.hparams.max_steps)}
