"""Per-sample LoRA composition is exact: held against PEFT's own single adapters and its `cat` merge."""

import pytest
import torch
from peft import PeftModel

from pipeline.models.adapters import attach_lora, lora_config, save_adapter
from pipeline.models.backbone import build_scheduler, build_unet, load_backbone, save_backbone
from pipeline.models.composition import AdapterComposition

NAMES = ["noise", "blur", "haze"]
SETTINGS = {
    "noise": ({"rank": 4, "alpha": 4, "targets": ["conv1", "conv2"]}, 200),
    "blur": ({"rank": 2, "alpha": 4, "targets": ["conv1", "conv2"]}, 120),
    "haze": ({"rank": 8, "alpha": 8, "targets": ["conv1", "conv2"]}, 400),
}
TOL = 1e-5


@pytest.fixture(scope="module")
def folders(tmp_path_factory, params):
    root = tmp_path_factory.mktemp("composition")
    arch = {**params.backbone.architecture, "block_out_channels": [8, 16], "norm_num_groups": 4,
            "down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2}
    torch.manual_seed(0)
    save_backbone(root / "backbone", build_unet(arch), build_scheduler(params.backbone.schedule))
    for i, name in enumerate(NAMES):
        settings, t_star = SETTINGS[name]
        unet, _ = load_backbone(root / "backbone")
        model = attach_lora(unet, lora_config(settings))
        torch.manual_seed(i + 1)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.normal_(0, 0.2)
        save_adapter(model, root / name, name, t_star)
    return root


@pytest.fixture()
def composition(folders):
    return AdapterComposition.from_pretrained(folders / "backbone", {n: folders / n for n in NAMES})


def _inputs(batch=3):
    torch.manual_seed(7)
    return torch.randn(batch, 3, 16, 16), torch.tensor([50, 300, 700][:batch])


def _peft_single(folders, name, x, t):
    unet, _ = load_backbone(folders / "backbone")
    with torch.no_grad():
        return PeftModel.from_pretrained(unet, str(folders / name)).eval()(x, t).sample


@pytest.mark.parametrize("index", range(len(NAMES)))
@pytest.mark.parametrize("per_sample", [False, True])
def test_one_hot_weights_equal_that_single_adapter(folders, composition, index, per_sample):
    x, t = _inputs()
    weights = torch.nn.functional.one_hot(torch.tensor(index), len(NAMES)).float()
    if per_sample:  # force the per-sample path: the other rows differ
        weights = torch.stack([weights, torch.zeros(len(NAMES)), weights])
    with torch.no_grad():
        got = composition.epsilon(x, t, weights)
    expected = _peft_single(folders, NAMES[index], x, t)
    rows = [0, 2] if per_sample else [0, 1, 2]
    assert (got[rows] - expected[rows]).abs().max() <= TOL


def test_zero_weights_equal_the_bare_backbone(folders, composition):
    x, t = _inputs()
    unet, _ = load_backbone(folders / "backbone")
    with torch.no_grad():
        expected = unet(x, t).sample
        assert (composition.epsilon(x, t, torch.zeros(len(NAMES))) - expected).abs().max() <= TOL
        mixed = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
        assert (composition.epsilon(x, t, mixed)[[0, 2]] - expected[[0, 2]]).abs().max() <= TOL


def _cat_reference(folders, weights, x, t):
    unet, _ = load_backbone(folders / "backbone")
    model = PeftModel.from_pretrained(unet, str(folders / NAMES[0]), adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.load_adapter(str(folders / name), adapter_name=name)
    model.add_weighted_adapter(NAMES, weights.tolist(), adapter_name="cat", combination_type="cat")
    model.set_adapter("cat")
    with torch.no_grad():
        return model.eval()(x, t).sample


@pytest.mark.parametrize("weights", [[0.7, 0.3, 0.0], [0.2, 0.5, 0.3], [1.5, -0.5, 0.25]])
def test_arbitrary_weights_equal_peft_cat_merge(folders, composition, weights):
    weights = torch.tensor(weights)
    x, t = _inputs()
    with torch.no_grad():
        got = composition.epsilon(x, t, weights)
    assert (got - _cat_reference(folders, weights, x, t)).abs().max() <= TOL


def test_per_sample_weights_in_one_batch_equal_each_sample_alone(folders, composition):
    per_sample = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0], [0.2, 0.5, 0.3]])
    x, t = _inputs()
    with torch.no_grad():
        got = composition.epsilon(x, t, per_sample)
    for b in range(3):
        expected = _cat_reference(folders, per_sample[b], x[b : b + 1], t[b : b + 1])
        assert (got[b : b + 1] - expected).abs().max() <= TOL


def test_composition_leaves_no_state_behind(composition):
    x, t = _inputs()
    with torch.no_grad():
        first = composition.epsilon(x, t, torch.tensor([0.2, 0.5, 0.3]))
        composition.epsilon(x, t, torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]))
        composition.epsilon(x, t, torch.tensor([0.0, 0.0, 0.0]))
        assert torch.equal(first, composition.epsilon(x, t, torch.tensor([0.2, 0.5, 0.3])))
    assert not any(p.requires_grad for p in composition.parameters())


@pytest.mark.parametrize("weights", [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.5, 0.3]])
def test_kept_merged_weights_give_the_same_bits_as_merging_each_time(folders, composition, weights):
    uncached = AdapterComposition.from_pretrained(folders / "backbone", {n: folders / n for n in NAMES})
    uncached.merged_cache_bytes = 0
    x, t = _inputs()
    weights = torch.tensor(weights)
    with torch.no_grad():
        first = composition.epsilon(x, t, weights)
        composition.epsilon(x, t, torch.tensor([0.0, 1.0, 0.0]))
        again = composition.epsilon(x, t, weights)
        assert len(composition._merged) > 0 and len(uncached._merged) == 0
        assert torch.equal(first, again) and torch.equal(first, uncached.epsilon(x, t, weights))


def test_merged_weights_kept_are_bounded_and_dropped_on_a_move(composition):
    x, t = _inputs()
    with torch.no_grad():
        composition.epsilon(x, t, torch.tensor([1.0, 0.0, 0.0]))
        one_mix = composition._merged_size
        composition.merged_cache_bytes = one_mix
        composition.epsilon(x, t, torch.tensor([0.0, 1.0, 0.0]))
        assert composition._merged_size <= one_mix
        composition.to(torch.float64)
        assert len(composition._merged) == 0
        assert composition.epsilon(x.double(), t, torch.tensor([1.0, 0.0, 0.0])).dtype == torch.float64


def test_per_sample_and_learnt_mixes_are_not_kept(composition):
    x, t = _inputs()
    learnt = torch.tensor([0.5, 0.5, 0.0], requires_grad=True)
    composition.epsilon(x, t, learnt).sum().backward()
    assert learnt.grad is not None and learnt.grad[:2].abs().sum() > 0
    with torch.no_grad():
        composition.epsilon(x, t, torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]))
    assert len(composition._merged) == 0
    with pytest.raises(ValueError, match="merged_cache_bytes"):
        AdapterComposition(composition.model, NAMES, [1, 2, 3], composition.readout, merged_cache_bytes=-1)


def test_timestep_is_the_weight_average_of_the_adapters_t_star(composition):
    weights = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0, 0, 0], [0.2, 0.0, 0.6]])
    assert composition.timesteps(weights, torch.zeros(len(weights), 3, 8, 8)).tolist() == [200, 160, 240, 350]


def test_restore_keeps_shape_and_rejects_bad_weights(composition):
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert composition.restore(y, composition.weights_for({"noise": 1.0})).shape == y.shape
    with pytest.raises(ValueError, match=r"weights must be \(2, 3\)"):
        composition.restore(y, torch.ones(2, 2))
    with pytest.raises(KeyError, match="no adapter for \\['snow'\\]"):
        composition.weights_for({"snow": 1.0})


def _direct(folders, name, y, t_star):
    """Reference: PEFT's own single adapter and the one-step read-out written out by hand."""
    unet, scheduler = load_backbone(folders / "backbone")
    alpha_bar = scheduler.alphas_cumprod[t_star]
    t = torch.full((y.shape[0],), t_star)
    with torch.no_grad():
        epsilon = PeftModel.from_pretrained(unet, str(folders / name)).eval()(alpha_bar.sqrt() * y, t).sample
    return y - ((1 - alpha_bar) / alpha_bar).sqrt() * epsilon


@pytest.mark.parametrize("composition_kind,plan,order", [
    ("sequential", None, ("haze", "noise")),
    ("weights", None, None),
    ("planned", [["noise"], ["haze"]], ("noise", "haze")),  # the plan's order, not undo_order's
    ("planned", [["haze", "noise"]], None),  # a plan that merges: the weights reference
])
def test_mixes_restore_exactly_as_a_direct_reference(folders, composition, composition_kind, plan, order):
    """`sequential`: each adapter alone at its own t*, the one undoing the last-applied degradation first;
    `weights`: W + Σ w_i ΔW_i at the weight-averaged t* (reference: PEFT's `cat` merge of the two);
    `planned`: the pair's plan, one of the two."""
    from pipeline.models.restorer import RestorationSettings, UniversalRestorer

    plans = {} if plan is None else {"haze+noise": plan}
    restorer = UniversalRestorer(composition, settings=RestorationSettings(
        composition=composition_kind, undo_order=("haze", "noise"), plans=plans), tile=16, overlap=0)
    torch.manual_seed(3)
    image = torch.rand(3, 16, 16)
    got = restorer.restore(image, weights={"noise": 0.5, "haze": 0.5})
    y = image[None] * 2 - 1
    if order is not None:
        assert restorer.steps({"noise": 0.5, "haze": 0.5}) == [{order[0]: 1.0}, {order[1]: 1.0}]
        first = _direct(folders, order[0], y, SETTINGS[order[0]][1]).clamp(-1, 1)
        expected = _direct(folders, order[1], first, SETTINGS[order[1]][1]).clamp(-1, 1)
    else:
        unet, scheduler = load_backbone(folders / "backbone")
        model = PeftModel.from_pretrained(unet, str(folders / "noise"), adapter_name="noise")
        model.load_adapter(str(folders / "haze"), adapter_name="haze")
        model.add_weighted_adapter(["noise", "haze"], [0.5, 0.5], "mix", combination_type="cat")
        model.set_adapter("mix")
        t_star = round((SETTINGS["noise"][1] + SETTINGS["haze"][1]) / 2)
        alpha_bar = scheduler.alphas_cumprod[t_star]
        with torch.no_grad():
            epsilon = model.eval()(alpha_bar.sqrt() * y, torch.full((1,), t_star)).sample
        expected = (y - ((1 - alpha_bar) / alpha_bar).sqrt() * epsilon).clamp(-1, 1)
    assert (got - (expected[0] + 1) / 2).abs().max() <= 1e-5


def _with_noise_sigma_rule(composition):
    """The same adapters, the first (``noise``) with the noise_sigma timestep rule."""
    return AdapterComposition(composition.model, NAMES, [SETTINGS[n][1] for n in NAMES], composition.readout,
                              timestep_rules=["noise_sigma", "fixed", "fixed"])


def _read_sigma(composition, monkeypatch, sigmas):
    """Make the composition read these noise levels (0–255 scale), one per sample."""
    monkeypatch.setattr(composition, "noise_sigma", lambda name, y, noise_level="analytic", min_correction=0.0: torch.tensor(sigmas) / 127.5)


@pytest.mark.parametrize("sigma,expected", [(5, 0.0), (10, 0.0), (17, 0.25), (20, 0.5), (23, 0.75), (30, 1.0), (80, 1.0)])
def test_a_strength_is_linear_between_its_knots_constant_beyond_and_in_quarters(composition, monkeypatch, sigma, expected):
    composition = _with_noise_sigma_rule(composition)
    _read_sigma(composition, monkeypatch, [float(sigma)] * 2)
    factors = composition.strength(torch.zeros(2, 3, 8, 8), "analytic", {"noise": [[10, 0.0], [30, 1.0]]})
    assert factors.tolist() == [[expected, 1.0, 1.0]] * 2


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_a_strength_scales_the_adapters_weight_at_its_own_timestep(composition, strength):
    """Reference: the weight times the strength, at the timestep of the analytic σ̂ written out; strength 0 is the
    bare backbone at that timestep."""
    from pipeline.models.severity import estimate_noise_sigma

    composition = _with_noise_sigma_rule(composition)
    torch.manual_seed(5)
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    weights = composition.weights_for({"noise": 0.5, "blur": 0.5})
    with torch.no_grad():
        got = composition.restore(y, weights, "analytic", {"noise": [[0.0, strength]]})
        t = ((composition.readout.timesteps_for_sigma(estimate_noise_sigma(y)) + SETTINGS["blur"][1]) / 2).round().long()
        expected = composition.restore_at(y, weights * torch.tensor([strength, 1.0, 1.0]), t)
    assert (got - expected).abs().max() <= TOL


def test_samples_of_other_noise_levels_get_their_own_strength_in_one_batch(composition, monkeypatch):
    composition = _with_noise_sigma_rule(composition)
    torch.manual_seed(6)
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    weights = composition.weights_for({"noise": 1.0})
    _read_sigma(composition, monkeypatch, [5.0, 50.0])
    with torch.no_grad():
        both = composition.restore(y, weights, "analytic", {"noise": [[10, 0.0], [30, 1.0]]})
        t = composition.timesteps(weights, y)
        alone = [composition.restore_at(y[i : i + 1], weights * s, t[i : i + 1]) for i, s in enumerate([0.0, 1.0])]
    assert (both - torch.cat(alone)).abs().max() <= TOL


def test_a_strengthened_adapter_reads_the_noise_level_once_for_its_timestep_and_its_strength(composition, monkeypatch):
    composition = _with_noise_sigma_rule(composition)
    reads = []
    monkeypatch.setattr(composition, "noise_sigma", lambda name, y, noise_level="analytic", min_correction=0.0: reads.append(name) or torch.full((len(y),), 0.2))
    with torch.no_grad():
        composition.restore(torch.zeros(2, 3, 16, 16), composition.weights_for({"noise": 1.0}), "learned", {"noise": [[0, 0.5]]})
    assert reads == ["noise"]


def test_a_strength_needs_an_adapter_with_the_noise_sigma_rule(composition):
    with pytest.raises(ValueError, match="noise_sigma rule; 'blur'"):
        _with_noise_sigma_rule(composition).strength(torch.zeros(1, 3, 8, 8), "analytic", {"blur": [[0, 1.0]]})
    with pytest.raises(ValueError, match="noise_sigma rule; 'snow'"):
        composition.strength(torch.zeros(1, 3, 8, 8), "analytic", {"snow": [[0, 1.0]]})
