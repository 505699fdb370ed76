"""Training the degradation router: soft cross-entropy of ``s / τ`` against the target distribution
(one-hot for a single degradation, uniform over the components of a mix) plus binary cross-entropy of
the presence output against which degradations the image holds; its mixed and clean training patches;
and the thresholds calibrated on validation data (unknown degradation, and the presence that makes an image
known after all at a bounded rate of clean images routed; mix detection at a bounded false-mix rate; clean
images at a bounded false-clean rate)."""

from __future__ import annotations

from dataclasses import fields
from itertools import combinations, permutations
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from pipeline.data.datasets import LabelledImages, PairedDataset
from pipeline.data.tensors import to_tensor
from pipeline.data.synthesis import ToneJitter, degraded_patches, load_clean
from pipeline.models.backbone import OneStepReadout
from pipeline.models.router import DegradationRouter, Routing, select_adapters
from pipeline.models.severity import estimate_noise_sigma
from pipeline.training.schedules import warmup_cosine


def router_loss(router: DegradationRouter, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy of the router's logits ``s / τ`` against target distributions, plus binary
    cross-entropy of its presence logits against the degradations present (``targets > 0``) on the degraded
    images only. ``targets`` has a last column for "clean" where the router has a clean output.

    Clean images train the clean output, not the presence of degradations: which degradations a *degraded*
    image holds is its question. Trained on clean images too (all absent), it lowered the presence of a mix's
    second component (0.51 -> 0.34 on seed 1's test mixes) and the router's mix recall by 0.04 over 3 seeds.
    With the clean output a prototype, clean images are one more class of the softmax; with it a presence
    output (read from the encoder's features without training them), they train that output alone, and
    degraded images train it towards "not clean"."""
    logits, presence = router(images)
    n = len(router.names)
    degraded = targets[:, n:].sum(dim=-1) == 0
    if not router.config.clean_presence:
        soft_cross_entropy = -(targets * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
        if not degraded.any():
            return soft_cross_entropy
        return soft_cross_entropy + F.binary_cross_entropy_with_logits(presence[degraded], (targets[degraded, :n] > 0).float())
    present = (targets > 0).float()
    mask = torch.ones_like(present)
    mask[~degraded, :n] = 0.0  # a clean image says nothing of which degradation would be present
    presence_loss = (F.binary_cross_entropy_with_logits(presence, present, reduction="none") * mask).sum() / mask.sum()
    if not degraded.any():
        return presence_loss
    soft_cross_entropy = -(targets[degraded, :n] * logits[degraded].log_softmax(dim=-1)).sum(dim=-1).mean()
    return soft_cross_entropy + presence_loss


class RouterTraining(L.LightningModule):
    def __init__(self, router: DegradationRouter, lr: float, weight_decay: float, warmup_steps: int, max_steps: int):
        super().__init__()
        self.save_hyperparameters(ignore=["router"])
        self.router = router
        self.top1 = MeanMetric()
        self.recall = MeanMetric()
        self.detection = {kind: MeanMetric() for kind in ("single", "mixed")}  # told apart at presence 0.5
        self.called_clean = {kind: MeanMetric() for kind in ("clean", "degraded")}  # "clean" the most probable

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = router_loss(self.router, batch["image"], batch["target"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        logits, presence = self.router(batch["image"])
        n = len(self.router.names)
        if self.router.config.clean:
            clean = batch["target"][:, n] > 0
            called_clean = presence[:, n] > 0 if self.router.config.clean_presence else logits.argmax(-1) == n
            for kind, rows in (("clean", clean), ("degraded", ~clean)):
                if rows.any():
                    self.called_clean[kind].update(called_clean[rows].float())
            logits, presence, target = logits[~clean], presence[~clean], batch["target"][~clean]
        else:
            target = batch["target"]
        probabilities, presence = logits[:, :n].softmax(-1), presence[:, :n].sigmoid()
        target = target[:, :n]
        single = (target > 0).sum(dim=-1) == 1
        detected = select_adapters(probabilities, "gated", 2, 0.5, presence).count_nonzero(-1) > 1
        if single.any():
            self.top1.update((logits[single].argmax(-1) == target[single].argmax(-1)).float())
            self.detection["single"].update((~detected[single]).float())
        if (~single).any():
            truth = target[~single] > 0
            count = int(truth.sum(-1).max())  # as many as the mix has, in the order gated routing adds them
            kept = select_adapters(probabilities[~single], "gated", count, 0.0, presence[~single]) > 0
            self.recall.update((kept & truth).sum(-1).float() / truth.sum(-1))
            self.detection["mixed"].update(detected[~single].float())

    def on_validation_epoch_end(self) -> None:
        if self.detection["single"].update_count and self.detection["mixed"].update_count:
            balanced = (self.detection["single"].compute() + self.detection["mixed"].compute()) / 2
            self.log("val/mix_detection", balanced, add_dataloader_idx=False)
        for metric in self.detection.values():
            metric.reset()
        for name, metric in (("val/clean_accuracy", self.called_clean["clean"]),
                             ("val/false_clean_rate", self.called_clean["degraded"])):
            if metric.update_count:
                self.log(name, metric.compute(), add_dataloader_idx=False)
            metric.reset()
        for name, metric in (("val/top1_accuracy", self.top1), ("val/mixed_recall", self.recall)):
            if metric.update_count:
                self.log(name, metric.compute(), prog_bar=True, add_dataloader_idx=False)
            metric.reset()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.router.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return {"optimizer": optimizer,
                "lr_scheduler": warmup_cosine(optimizer, self.hparams.warmup_steps, self.hparams.max_steps)}


def pairs(names: list[str], both_orders: bool = False) -> list[tuple[str, str]]:
    """Every pair of degradations, applied in ``names`` order, or in both orders (the first applied first).

    Which one comes last changes what a mix looks like: noise added to a dark photo is full-strength noise, a
    noisy photo darkened is faint noise. The router trained on one order per pair found the low light of 5 of 28
    validation crops darkened then noised, against 24 of 28 noised then darkened. Trained on both orders
    (``router.train.mix_orders: both``, the shipped recipe otherwise unchanged), it found 7 of 24 on seed 20240930's
    validation crops (4 before), called more degraded crops clean at its calibrated threshold and restored
    that seed's validation sets 0.13 dB (singles) and 0.16 dB (mixes) worse: not shipped."""
    return list(permutations(names, 2)) if both_orders else list(combinations(names, 2))


def patch_set(params, names: list[str], clean_dir: str, split: str, combos: list[tuple[str, ...]], count: int,
              size: int, stream: str, tone: ToneJitter | None = None) -> LabelledImages | None:
    """``count`` ``size``² patches of one split's clean images, each degraded by a random one of ``combos``
    (see ``degraded_patches``); targets uniform over a patch's components, or "clean" (the last of
    ``len(names) + 1`` columns) for an empty combo. None where there is nothing to draw."""
    if count <= 0 or not combos:
        return None
    patches = degraded_patches(params.degradations, combos, load_clean(clean_dir, split), size, count,
                               params.seed + (split == "val"), stream, tone)
    targets = torch.zeros(len(patches), len(names) + 1)
    for row, (_, components) in enumerate(patches):
        columns = [names.index(c) for c in components] or [len(names)]
        targets[row, columns] = 1.0 / len(columns)
    return LabelledImages([to_tensor(image) for image, _ in patches], targets)


def clean_set(root: str | Path, split: str, classes: int) -> LabelledImages:
    """The clean counterparts of one degradation's ``split`` (every degradation is synthesized on the same
    boxes, so these are the clean versions of every single's patches), labelled "clean": the last of
    ``classes`` columns."""
    images = PairedDataset(Path(root) / split).gt
    return LabelledImages(images, F.one_hot(torch.full((len(images),), classes - 1), classes))


@torch.no_grad()
def denoised_set(sets: list[LabelledImages], noise: int, unet: torch.nn.Module, readout: OneStepReadout,
                 batch_size: int = 64) -> LabelledImages | None:
    """The images of ``sets`` that hold degradation column ``noise``, denoised by the frozen backbone in one step
    at t(σ̂) (the analytic noise level), each labelled uniformly over its other components, or "clean" (the
    last column) where noise was its only one. None where no image holds noise.

    ``confirmed`` and ``cascade`` routing read the noise adapter's restoration again; the shipped router, which
    never saw a denoised image, read 33 of seed 20240930's 48 denoised test noise crops as low light (presence
    ≥ 0.5; 0.90 on a crop of mean brightness 0.78)."""
    images = [image for part in sets for image, target in zip(part.images, part.targets) if target[noise] > 0]
    if not images:
        return None
    targets = torch.cat([part.targets[part.targets[:, noise] > 0] for part in sets])
    targets[:, noise] = 0.0
    left = targets[:, :-1].sum(-1) == 0
    targets[left, -1] = 1.0
    targets = targets / targets.sum(-1, keepdim=True)
    restored = []
    for start in range(0, len(images), batch_size):
        y = torch.stack(images[start : start + batch_size])
        restored += list(readout(unet, y, readout.timesteps_for_sigma(estimate_noise_sigma(y))).clamp(-1, 1))
    return LabelledImages(restored, targets)


def with_clean_column(images: LabelledImages) -> LabelledImages:
    """``images`` with a zero "clean" column added to their targets."""
    return LabelledImages(images.images, F.pad(images.targets, (0, 1)))


def _routings(router: DegradationRouter, images: LabelledImages) -> Routing:
    parts = [router.route(torch.stack(images.images[i : i + 64])) for i in range(0, len(images), 64)]
    return Routing(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Routing)))


def calibrate_threshold(router: DegradationRouter, singles: LabelledImages, quantile: float) -> float:
    """The ``quantile`` of the best cosine similarity over validation images of known degradations."""
    return float(torch.quantile(_routings(router, singles).similarity.max(-1).values, quantile))


# The share of validation singles that ``gated`` routing may give a second adapter. A false mix costs a
# single far more than a missed mix costs a mix (a 14 % lowlight share took a σ≈18 noise crop from 29.1
# to 19.0 dB), so the mix threshold bounds false mixes first and maximises mixes detected second.
MAX_FALSE_MIX_RATE = 0.02


def _second_presence(router: DegradationRouter, images: LabelledImages) -> torch.Tensor:
    routing = _routings(router, images)
    return routing.presence.gather(-1, routing.ranking()[:, 1:2])[:, 0]


def mix_rates(router: DegradationRouter, singles: LabelledImages, mixes: LabelledImages | None,
              threshold: float) -> dict[str, float]:
    """At mix threshold ``threshold``: the share of ``singles`` given a second adapter and of ``mixes`` detected."""
    if mixes is None:
        return {}
    return _mix_rates(_second_presence(router, singles), _second_presence(router, mixes), threshold)


def _mix_rates(single: torch.Tensor, mix: torch.Tensor, threshold: float) -> dict[str, float]:
    return {"false_mix_rate": float((single >= threshold).float().mean()),
            "mix_detection_rate": float((mix >= threshold).float().mean())}


def bounded_threshold(negatives: torch.Tensor, positives: torch.Tensor, max_false_rate: float) -> float:
    """A score threshold that lets at most ``max_false_rate`` of ``negatives`` reach it and as many ``positives``
    as that bound allows: of the thresholds on a 0.02 grid that do both equally well, the middle of their
    interval; 1.0 where none keeps the bound.

    The lowest of them, the rule before, sat at the grid's floor for the pre-trained router's clean threshold
    (0.02, with every clean validation crop at 0.64 or more), so photos unlike the validation ones crossed
    it first; the middle is as far from both sides as validation can tell."""
    grid = torch.linspace(0.02, 0.98, 49)
    feasible = grid[(negatives[None] >= grid[:, None]).float().mean(-1) <= max_false_rate]
    if not len(feasible):
        return 1.0
    found = (positives[None] >= feasible[:, None]).float().sum(-1)  # without positives, all equally good
    equal = feasible[found == found[0]]  # found falls as the threshold rises: these come first
    return round(float(equal[0] + equal[-1]) / 2, 4)


def calibrate_mix_threshold(router: DegradationRouter, singles: LabelledImages, mixes: LabelledImages | None,
                            max_false_mix_rate: float = MAX_FALSE_MIX_RATE) -> tuple[float, dict[str, float]]:
    """The presence at or above which ``gated`` routing adds a second adapter: a threshold that gives a second
    adapter to at most ``max_false_mix_rate`` of validation singles and detects as many validation mixes as
    that bound allows (``bounded_threshold``); 1.0 where none does (a second adapter only at a saturated
    presence); with its rates on those images. Without mixes, 0.5."""
    if mixes is None:
        return 0.5, {}
    single, mix = _second_presence(router, singles), _second_presence(router, mixes)
    threshold = bounded_threshold(single, mix, max_false_mix_rate)
    return threshold, _mix_rates(single, mix, threshold)


# The share of degraded validation images (singles and mixes) that may be called clean, and so left as
# they are: a missed clean image costs as much as a wrong adapter (~6 dB for haze or rain on a clean
# photo), a degraded image called clean loses its whole restoration gain.
MAX_FALSE_CLEAN_RATE = 0.02


def _clean_probabilities(router: DegradationRouter, sets: list[LabelledImages]) -> torch.Tensor:
    return torch.cat([_routings(router, images).clean_probability for images in sets])


def clean_rates(router: DegradationRouter, degraded: list[LabelledImages], clean: LabelledImages,
                threshold: float) -> dict[str, float]:
    """At clean threshold ``threshold``: the share of ``degraded`` images called clean and of ``clean`` ones."""
    return _clean_rates(_clean_probabilities(router, degraded), _clean_probabilities(router, [clean]), threshold)


def _clean_rates(degraded: torch.Tensor, clean: torch.Tensor, threshold: float) -> dict[str, float]:
    return {"false_clean_rate": float((degraded >= threshold).float().mean()),
            "clean_detection_rate": float((clean >= threshold).float().mean())}


def calibrate_clean_threshold(router: DegradationRouter, degraded: list[LabelledImages], clean: LabelledImages,
                              max_false_clean_rate: float = MAX_FALSE_CLEAN_RATE) -> tuple[float, dict[str, float]]:
    """The probability of "clean" at or above which an image is left as it is: a threshold that calls at most
    ``max_false_clean_rate`` of the ``degraded`` validation images clean and recognises as many clean ones as
    that bound allows (``bounded_threshold``); 1.0 where none does; with its rates."""
    called, found = _clean_probabilities(router, degraded), _clean_probabilities(router, [clean])
    threshold = bounded_threshold(called, found, max_false_clean_rate)
    return threshold, _clean_rates(called, found, threshold)


# The share of clean validation images that the known threshold may send to an adapter (those the similarity
# flags unknown and the clean threshold does not call clean): the rule of the mix and clean thresholds.
MAX_CLEAN_ROUTED_RATE = 0.02


def _top_presence_where_unknown(router: DegradationRouter, sets: list[LabelledImages]) -> torch.Tensor:
    """Per image: the presence of its most probable degradation where its similarity flags it unknown and it is
    not called clean (what the known threshold decides on), -1 elsewhere (never reaches a threshold)."""
    known_threshold, router.config.known_threshold = router.config.known_threshold, None
    try:
        parts = [_routings(router, images) for images in sets]
    finally:
        router.config.known_threshold = known_threshold
    routing = Routing(*(torch.cat([getattr(part, f.name) for part in parts]) for f in fields(Routing)))
    top = routing.presence.gather(-1, routing.probabilities.argmax(-1, keepdim=True))[:, 0]
    return torch.where(routing.unknown & ~routing.clean, top, torch.full_like(top, -1.0))


def _known_rates(degraded: torch.Tensor, clean: torch.Tensor, threshold: float) -> dict[str, float]:
    return {"unknown_by_similarity_rate": float((degraded >= 0).float().mean()),
            "known_after_all_rate": float((degraded >= threshold).float().mean()),
            "clean_routed_rate": float((clean >= threshold).float().mean())}


def calibrate_known_threshold(router: DegradationRouter, degraded: list[LabelledImages], clean: LabelledImages,
                              max_clean_routed_rate: float = MAX_CLEAN_ROUTED_RATE) -> tuple[float, dict[str, float]]:
    """The presence at or above which an image that its similarity flags unknown is restored by its most probable
    adapter after all: a threshold that sends at most ``max_clean_routed_rate`` of the ``clean`` validation images
    to an adapter that way and keeps as many of the ``degraded`` ones as that bound allows (``bounded_threshold``);
    with its rates: the degraded images the similarity flags unknown, those kept known after all, the clean
    images routed."""
    unknown_degraded, unknown_clean = _top_presence_where_unknown(router, degraded), _top_presence_where_unknown(router, [clean])
    threshold = bounded_threshold(unknown_clean, unknown_degraded[unknown_degraded >= 0], max_clean_routed_rate)
    return threshold, _known_rates(unknown_degraded, unknown_clean, threshold)
