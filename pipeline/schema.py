"""The structured schema of ``params.yaml``: every field a stage reads, with its type and allowed range.

``pipeline.config.load_params`` validates against it before a stage does any work, so a bad value is
refused in well under a second with one line per problem naming the key and what is allowed
(``degradations.noise.adapter.t_star = -5: must be in [0, 999]``), not minutes into training.
Albumentations validates each degradation's ``transform`` itself when the transform is built.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PositiveInt = Field(ge=1)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class Split(Strict):
    val_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)
    pinned: Optional[str] = None  # a JSON file {"splits": {image name: split}}: those images keep that split

    @model_validator(mode="after")
    def _leaves_training_data(self) -> "Split":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1 (training needs images)")
        return self


class Prepare(Strict):
    embedded: list[str]
    folders: list[str]
    split: Split


class Schedule(Strict):
    num_train_timesteps: int = Field(ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]


class Architecture(BaseModel):  # the rest goes to UNet2DModel, which checks it
    model_config = ConfigDict(extra="allow")
    sample_size: int = Field(ge=8)
    block_out_channels: list[int] = Field(min_length=1)
    norm_num_groups: int = Field(ge=1)

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> "Architecture":
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"every block_out_channels entry must be a multiple of norm_num_groups ({self.norm_num_groups})")
        return self


class Optimisation(Strict):
    batch_size: int = PositiveInt
    lr: float = Field(gt=0, le=1)
    weight_decay: float = Field(ge=0)
    warmup_steps: int = Field(ge=0)
    val_every: int = PositiveInt


class BackboneTrain(Optimisation):
    max_steps: int = PositiveInt
    patch_size: int = Field(ge=8)
    steps_per_epoch: int = PositiveInt
    val_patches: int = PositiveInt
    val_sigmas: list[float] = Field(min_length=1)
    ema_decay: float = Field(ge=0, lt=1)


class Sample(Strict):
    count: int = PositiveInt
    steps: int = PositiveInt
    columns: int = PositiveInt


class Backbone(Strict):
    pretrained: Optional[str]
    schedule: Schedule
    architecture: Architecture
    train: BackboneTrain
    sample: Sample


class AdapterTrain(Strict):  # a degradation's overrides of lora.train
    step_multiplier: float = Field(default=1, gt=0)
    batch_size: int = Field(default=None, ge=1)
    lr: float = Field(default=None, gt=0, le=1)
    weight_decay: float = Field(default=None, ge=0)
    warmup_steps: int = Field(default=None, ge=0)
    val_every: int = Field(default=None, ge=1)


class Adapter(Strict):
    rank: int = PositiveInt
    alpha: float = Field(gt=0)
    targets: list[str] = Field(min_length=1)
    t_star: int  # range checked against the schedule below
    timestep: Literal["fixed", "noise_sigma"]  # t*, or the timestep of the estimated noise level


class AdapterOverrides(Strict):
    rank: int = Field(default=None, ge=1)
    alpha: float = Field(default=None, gt=0)
    targets: list[str] = Field(default=None, min_length=1)
    t_star: int = None
    timestep: Literal["fixed", "noise_sigma"] = None
    train: AdapterTrain = Field(default=None)


class LoraTrain(Optimisation):
    max_steps: int = PositiveInt


class Lora(Strict):
    adapter: Adapter
    train: LoraTrain


class Baseline(Strict):
    label: str
    t_star: int  # range checked against the schedule below
    balance_tasks: bool
    train: Optimisation


class Logger(Strict):
    project: str
    entity: Optional[str]
    mode: Literal["online", "offline", "disabled"]
    dir: str
    panel_images: int = Field(ge=0)


class ToneRanges(Strict):
    """``router.train.tone``: the ranges of a clean photo's random gamma and gain (``ToneJitter``)."""

    gamma: tuple[float, float]
    gain: tuple[float, float]

    @model_validator(mode="after")
    def _positive_ranges(self) -> "ToneRanges":
        for name, (low, high) in (("gamma", self.gamma), ("gain", self.gain)):
            if not 0 < low <= high:
                raise ValueError(f"tone.{name} must be a range [low, high] with 0 < low <= high, got [{low}, {high}]")
        return self


class RouterTrain(Optimisation):
    max_steps: int = PositiveInt
    mixed_patches: int = Field(ge=0)
    mixed_val_patches: int = Field(ge=0)
    mix_orders: Literal["listed", "both"]  # each pair of degradations applied in the listed order, or in both
    tone_patches: int = Field(ge=0)
    tone: Optional[ToneRanges]
    # Each training patch holding noise once more, denoised by the frozen backbone at t(σ̂) and labelled with
    # its other components ("clean" where noise was all): what ``confirmed`` and ``cascade`` routing read again.
    denoised: bool

    @model_validator(mode="after")
    def _tone_for_toned_patches(self) -> "RouterTrain":
        if self.tone_patches and self.tone is None:
            raise ValueError("router.train.tone_patches > 0 needs router.train.tone (the ranges to draw from)")
        return self


class Router(Strict):
    pretrained: Optional[str]  # a router folder (save_pretrained layout) to use instead of training one
    prototypes: Literal["learned", "text"]
    clean_output: Literal["prototype", "presence"]
    embed_dim: int = PositiveInt
    width: int = Field(ge=4, multiple_of=4)  # GroupNorm(4, width)
    temperature: float = Field(gt=0)
    unknown_quantile: float = Field(ge=0, le=1)
    train: RouterTrain


class RestorationChoice(Strict):
    """One candidate of ``restoration.candidates``: overrides of the fields of ``restoration``."""

    policy: Literal["top1", "gated", "confirmed", "cascade", "topk"] = None
    top_k: int = Field(default=None, ge=1)
    mix_threshold: Optional[float] = Field(default=None, ge=0, le=1)
    cascade_gate: float = Field(default=None, ge=0, le=1)
    cascade_pairs: Literal["any", "validated"] = None
    composition: Literal["sequential", "weights", "planned"] = None
    unknown: Literal["identity", "route"] = None
    noise_level: Literal["learned", "analytic"] = None
    min_noise_correction: float = Field(default=None, ge=0)


class Restoration(Strict):
    """Inference-only choices: read by ``select_restoration``, ``evaluate`` and ``uir restore``, never by a
    training stage."""

    policy: Literal["top1", "gated", "confirmed", "cascade", "topk"]
    top_k: int = PositiveInt
    mix_threshold: Optional[float] = Field(default=None, ge=0, le=1)
    cascade_gate: float = Field(ge=0, le=1)
    cascade_pairs: Literal["any", "validated"]  # cascade: any second adapter, or only pairs of the validated mixes
    composition: Literal["sequential", "weights", "planned"]
    unknown: Literal["identity", "route"]
    noise_level: Literal["learned", "analytic"]  # the timestep of a noise_sigma adapter: fit_noise_level's, or σ̂
    min_noise_correction: float = Field(ge=0)  # learned: its correction to σ̂ only where at least this (log units)
    undo_order: list[str]
    ceiling_adapters: list[str]  # second adapters only below their training inputs' brightness; others ignored, as in undo_order
    strength_knots: list[float]  # noise levels (0–255) at which select_restoration fits noise_sigma adapters' strengths; []: none
    choose_on_validation: bool
    candidates: list[RestorationChoice]


class NoiseLevelTrain(Optimisation):
    max_steps: int = PositiveInt


class NoiseLevel(Strict):
    """``fit_noise_level``: patches labelled by the adapter's best timestep, and the estimator's training."""

    patch_size: int = Field(ge=16)
    train_patches: int = PositiveInt
    val_patches: int = PositiveInt
    alone_share: float = Field(ge=0, le=1)  # patches with the adapter's degradation alone; the rest mixed
    sigma_range: tuple[float, float]  # the timestep grid's noise levels, 0–255 scale
    grid: int = Field(ge=2)
    hidden: int = PositiveInt
    train: NoiseLevelTrain

    @model_validator(mode="after")
    def _increasing_range(self) -> "NoiseLevel":
        low, high = self.sigma_range
        if not 0 < low < high:
            raise ValueError(f"noise_level.sigma_range must be [low, high] with 0 < low < high, got [{low}, {high}]")
        return self


class Evaluate(Strict):
    batch_size: int = PositiveInt
    sample_images: int = Field(ge=0)


class Degradation(Strict):
    description: str
    adapter: AdapterOverrides = Field(default_factory=AdapterOverrides)
    transform: dict[str, Any]


class Synthesis(Strict):
    patch_size: int = Field(ge=8)
    train_patches: int = PositiveInt
    eval_crop: int = Field(ge=16)
    val_crops: int = PositiveInt
    test_crops: int = PositiveInt


class Trainer(Strict):
    accelerator: str
    devices: Any
    num_nodes: int = PositiveInt
    strategy: str
    precision: str
    deterministic: bool
    num_workers: int = Field(ge=0)
    cpu_threads: Optional[int] = Field(default=None, ge=1)
    log_every_n_steps: int = PositiveInt


class Params(Strict):
    seed: int = Field(ge=0, lt=2**32)
    profile_name: str
    prepare: Prepare
    backbone: Backbone
    lora: Lora
    baselines: dict[str, Baseline]
    logger: Logger
    router: Router
    noise_level: NoiseLevel
    restoration: Restoration
    evaluate: Evaluate
    degradations: dict[str, Degradation] = Field(min_length=1)
    mixed: list[list[str]]
    synthesis: Synthesis
    trainer: Trainer

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        last = self.backbone.schedule.num_train_timesteps - 1
        timesteps = {"lora.adapter.t_star": self.lora.adapter.t_star,
                     **{f"baselines.{n}.t_star": b.t_star for n, b in self.baselines.items()}}
        for name, degradation in self.degradations.items():
            timesteps[f"degradations.{name}.adapter.t_star"] = degradation.adapter.t_star
        for key, t in timesteps.items():
            if t is not None and not 0 <= t <= last:
                raise ValueError(f"{key} = {t}: must be in [0, {last}] (backbone.schedule.num_train_timesteps - 1)")
        for mix in self.mixed:
            unknown = [n for n in mix if n not in self.degradations]
            if len(mix) < 2 or unknown:
                raise ValueError(f"mixed entry {mix}: needs two or more configured degradations"
                                 + (f" (unknown: {unknown})" if unknown else ""))
        multiple = 2 ** (len(self.backbone.architecture.block_out_channels) - 1)
        for key, side in (("synthesis.patch_size", self.synthesis.patch_size), ("synthesis.eval_crop", self.synthesis.eval_crop),
                          ("backbone.train.patch_size", self.backbone.train.patch_size)):
            if side % multiple:
                raise ValueError(f"{key} = {side}: must be a multiple of {multiple} (the UNet halves it "
                                 f"{len(self.backbone.architecture.block_out_channels) - 1} times)")
        return self


class ParamsError(ValueError):
    """``params.yaml`` does not fit the schema; one line per problem, each naming the key."""


def validate(data: dict[str, Any], source: str = "params.yaml") -> None:
    try:
        Params.model_validate(data)
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            key = ".".join(str(part) for part in problem["loc"])
            message = problem["msg"].removeprefix("Value error, ")
            given = problem.get("input")
            if problem["type"] == "missing":
                lines.append(f"{source}: {key}: missing")
            elif key and not isinstance(given, dict):
                lines.append(f"{source}: {key} = {given!r}: {message}")
            else:
                lines.append(f"{source}: {(key + ': ') if key else ''}{message}")
        raise ParamsError("\n".join(lines)) from None
