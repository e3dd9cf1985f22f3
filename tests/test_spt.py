"""stitchops.spt: sensitivity, allocation (every branch, the exact τ search), apply / merge
round trips on a ViT and an MLP, nnz-sized optimizer state, the plan's table and JSON."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stitchops import spt
from stitchops.models.vit import VisionTransformer
from stitchops.nn import AdapterLinear, LoRALinear, SparseDeltaLinear
from stitchops.spt.sensitivity import EXCLUDE, ranked_parameters


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 32),
        nn.LayerNorm(32),
        nn.GELU(),
        nn.Linear(32, 16),
        nn.GELU(),
        nn.Linear(16, 5),
    )


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5
    )


def batches(n: int, shape: tuple[int, ...], classes: int = 5, size: int = 6):
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(size, *shape, generator=g), torch.randint(0, classes, (size,), generator=g))
        for _ in range(n)
    ]


# ---------------------------------------------------------------- sensitivity


def test_sensitivity_equals_an_explicit_loop_of_backward_calls():
    model, data = mlp(), batches(3, (10,))
    got = spt.sensitivity(model, data, exclude=("5.",), progress=False)
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters() if not n.startswith("5.")}
    for x, y in data:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n in want:
            want[n] += dict(model.named_parameters())[n].grad.square()
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=0)


def test_per_sample_sensitivity_sums_each_samples_squared_gradient():
    model, data = mlp(), batches(2, (10,), size=3)
    got = spt.sensitivity(model, data, per_sample=True, exclude=(), progress=False)
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in data:
        for i in range(len(x)):
            model.zero_grad()
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            for n, p in model.named_parameters():
                want[n] += p.grad.square()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-12)


def test_sensitivity_leaves_the_model_as_it_was():
    model = mlp().eval()
    model[0].weight.requires_grad_(False)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    sens = spt.sensitivity(
        model,
        batches(1, (10,)),
        exclude=(),
        progress=False,
        loss_fn=lambda m, x, y: m(x).square().mean(),
    )
    assert not model.training and not model[0].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert sens["0.weight"].abs().sum() > 0  # ranked although it was frozen


def test_vit_sensitivity_excludes_head_and_embeddings():
    names = spt.sensitivity(tiny_vit(), batches(1, (3, 16, 16)), progress=False).keys()
    excluded = ("head", "cls_token", "pos_embed", "patch_embed")
    assert names and not any(k in n for n in names for k in excluded)


# ---------------------------------------------------------------- allocation


class Toy(nn.Module):
    """Two linear layers and a norm: every branch of the rule on a hand-made sensitivity."""

    def __init__(self):
        super().__init__()
        self.big = nn.Linear(20, 10)  # LoRA r=2 costs 2·(20+10) = 60, threshold 60/α
        self.small = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(10)
        self.head = nn.Linear(10, 2)


def toy_sensitivity() -> dict[str, torch.Tensor]:
    s = {n: torch.zeros(p.shape) for n, p in Toy().named_parameters() if "head" not in n}
    s["big.weight"].view(-1)[:30] = torch.linspace(10, 9, 30)  # 30 strong entries
    s["small.weight"].view(-1)[[0, 5]] = torch.tensor([8.0, 7.5])
    s["norm.weight"][:] = 6.0  # all 10 entries at once
    s["norm.bias"][3] = 5.0
    s["big.bias"][[1, 2]] = torch.tensor([4.0, 3.0])
    return s


def test_allocation_takes_every_branch():
    # Budget 83 = the plan of the 45 non-zero entries (the zeros of big.weight and big.bias
    # come free once those are structured or whole, so τ runs on through them).
    plan = spt.allocate(toy_sensitivity(), Toy(), budget=83, rank=2, alpha=2.0, beta=5.0)
    kinds = {n: e.kind for n, e in plan.entries.items()}
    # big: 30 ≥ 60/2 -> LoRA (60); small: 2 < 2·(4+3)/2 -> unstructured; norm.weight: 10
    # ≥ 10/5 -> whole; norm.bias 1 < 2 -> partial; big.bias 2 ≥ 10/5 -> whole.
    assert kinds["big.weight"] == "lora" and plan.entries["big.weight"].cost == 60
    assert kinds["small.weight"] == "unstructured"
    assert plan.entries["small.weight"].index == [0, 5]
    assert kinds["norm.weight"] == "whole" and plan.entries["norm.weight"].cost == 10
    assert kinds["norm.bias"] == "partial" and plan.entries["norm.bias"].index == [3]
    assert kinds["big.bias"] == "whole" and plan.entries["big.bias"].cost == 10
    assert not any("head" in n for n in plan.entries)
    assert plan.total == 83 and plan.tau == 45 + 170 + 8


def _brute_force_tau(sens, model, budget, **kw) -> int:
    """The largest τ whose plan fits, by trying every τ (the allocation's cost function)."""
    from stitchops.spt.allocate import _check_sensitivity, _Costs, ranked

    items = ranked(sens, _check_sensitivity(sens, model), split_fused=True)
    costs = _Costs(items, kw.get("structured", "lora"), kw["rank"], kw["alpha"], kw["beta"])
    fits = [t for t in range(1, costs.order.numel() + 1) if costs.total(t) <= budget]
    return max(fits)


@pytest.mark.filterwarnings("ignore:SPT budget")  # 10**6: more than any plan uses
@pytest.mark.parametrize("budget", [1, 25, 59, 61, 85, 97, 120, 300, 10**6])
@pytest.mark.parametrize("structured", ["lora", "adapter"])
def test_tau_search_lands_on_the_largest_total_within_budget(budget, structured):
    sens = {
        n: torch.rand(s.shape, generator=torch.Generator().manual_seed(len(n)))
        for n, s in toy_sensitivity().items()
    }
    kw = {"rank": 2, "alpha": 1.0, "beta": 5.0, "structured": structured}
    plan = spt.allocate(sens, Toy(), budget, **kw)
    assert plan.total <= budget and plan.tau == _brute_force_tau(sens, Toy(), budget, **kw)
    bigger = spt.allocate(sens, Toy(), budget + 40, **kw) if plan.tau < 292 else plan
    assert bigger.tau >= plan.tau  # the cost never decreases in τ, so neither does τ


def test_adapter_cost_and_threshold():
    # An adapter on big costs 2·2·10 + 2 + 10 = 52: at α = 1, 30 entries stay unstructured
    # (plan 30 + 2 + 10 + 1 + 10 = 53); at α = 2 they pass 26 (plan 52 + 23 = 75).
    plan = spt.allocate(toy_sensitivity(), Toy(), 53, structured="adapter", rank=2, alpha=1.0)
    assert plan.entries["big.weight"].kind == "unstructured" and plan.tau == 45
    plan = spt.allocate(toy_sensitivity(), Toy(), 75, structured="adapter", rank=2, alpha=2.0)
    assert plan.entries["big.weight"].kind == "adapter" and plan.entries["big.weight"].cost == 52


def test_plan_prints_a_table_and_round_trips_through_json(tmp_path):
    plan = spt.allocate(toy_sensitivity(), Toy(), 83, rank=2, alpha=2.0)
    text = str(plan)
    assert "big.weight" in text and "lora" in text and f"total {plan.total:,}" in text
    plan.save(tmp_path / "plan.json")
    again = spt.SPTPlan.load(tmp_path / "plan.json")
    assert again == plan


BAD_ALLOCATIONS = {
    "unknown_name": (
        dict(sensitivity={"nope.weight": torch.zeros(3)}),
        ValueError,
        "'nope.weight', which the model does not have",
    ),
    "wrong_shape": (
        dict(sensitivity={"big.weight": torch.zeros(20, 10)}),
        ValueError,
        r"shape \(10, 20\), got \(20, 10\)",
    ),
    "zero_budget": (dict(budget=0), ValueError, "budget must be a positive"),
    "negative_budget": (dict(budget=-5), ValueError, "budget must be a positive"),
    "structured": (dict(structured="prefix"), ValueError, "structured must be"),
    "too_small": (
        dict(sensitivity={"norm.weight": torch.ones(10)}, beta=20.0, budget=0.5),
        ValueError,
        "budget must be a positive|below the smallest",
    ),
    "not_a_dict": (dict(sensitivity=[1, 2]), TypeError, "non-empty dict"),
}


@pytest.mark.parametrize("change", BAD_ALLOCATIONS.values(), ids=BAD_ALLOCATIONS.keys())
def test_bad_allocations_raise_clear_errors(change):
    args, error, message = change
    kwargs = {"sensitivity": toy_sensitivity(), "model": Toy(), "budget": 100, **args}
    with pytest.raises(error, match=message):
        spt.allocate(**kwargs)


def test_budget_below_the_smallest_plan():
    # One sensitive entry of a 4-vector with β = 5: one entry ≥ 4/5, so it goes whole (4).
    model = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"below the smallest possible plan \(4 "):
        spt.allocate({"0.bias": torch.ones(4)}, model, 3, beta=5.0)


# ---------------------------------------------------------------- apply and merge


def fine_tune(model, data, weight_decay: float = 0.0) -> None:
    """A few AdamW steps on the trainable parameters (spt.param_groups), then eval mode."""
    opt = torch.optim.AdamW(spt.param_groups(model, weight_decay), lr=1e-2)
    model.train()
    for xb, yb in data:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    model.eval()


def _plan_for(model, data, budget, **kw):
    sens = spt.sensitivity(model, data, progress=False, **kw.pop("sens", {}))
    return spt.allocate(sens, model, budget, **kw)


@pytest.mark.parametrize("which", ["mlp", "vit"])
def test_apply_keeps_outputs_then_merge_round_trips(which):
    model = mlp() if which == "mlp" else tiny_vit()
    shape = (10,) if which == "mlp" else (3, 16, 16)
    data = batches(2, shape)
    sens_kw = {"exclude": ("5.",)} if which == "mlp" else {}
    budget, alpha = (60, 1.0) if which == "mlp" else (300, 4.0)
    plan = _plan_for(model, data, budget, rank=2, alpha=alpha, sens=sens_kw)
    kinds = {e.kind for e in plan.entries.values()}
    assert "unstructured" in kinds, str(plan)
    x = data[0][0]
    model.eval()
    before = model(x)
    spt.apply(model, plan, trainable=("5.", "head"))
    assert torch.equal(model(x), before)  # deltas and B start at zero
    assert any(isinstance(m, SparseDeltaLinear) for m in model.modules())
    assert spt.trainable_count(model, exclude=("5.", "head")) == plan.total
    fine_tune(model, data * 3, weight_decay=0.05)  # every delta, LoRA and vector moves
    tuned = model(x)
    assert not torch.allclose(tuned, before)
    spt.merge(model)
    assert not any(isinstance(m, (SparseDeltaLinear, LoRALinear)) for m in model.modules())
    torch.testing.assert_close(model(x), tuned, rtol=1e-5, atol=1e-5)
    names = {n for n, _ in model.named_parameters()}
    assert names == {n for n, _ in (mlp() if which == "mlp" else tiny_vit()).named_parameters()}


def test_optimizer_state_is_nnz_sized_for_the_deltas():
    model, data = mlp(), batches(2, (10,))
    plan = spt.allocate(
        spt.sensitivity(model, data, exclude=("5.",), progress=False), model, 40, rank=2, alpha=1.0
    )
    spt.apply(model, plan, trainable=())
    opt = torch.optim.AdamW(spt.param_groups(model, 0.05), lr=1e-3)
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()
    opt.step()
    state_sizes = sorted(s["exp_avg"].numel() for s in opt.state.values())
    assert sum(state_sizes) == plan.total
    for layer in (m for m in model.modules() if isinstance(m, SparseDeltaLinear)):
        assert opt.state[layer.delta]["exp_avg"].shape == layer.delta.shape
        assert layer.weight not in opt.state and not layer.weight.requires_grad
    decays = {g["weight_decay"] for g in opt.param_groups for p in g["params"] if p.dim() == 1}
    assert decays <= {0.0}


@pytest.mark.filterwarnings("ignore:SPT budget")  # a budget past the model: every entry
def test_adapter_plan_applies_and_starts_at_the_pretrained_output():
    model, data = mlp(), batches(2, (10,))
    sens = spt.sensitivity(model, data, exclude=("5.",), progress=False)
    plan = spt.allocate(sens, model, 2_000, structured="adapter", rank=2, alpha=10.0)
    assert any(e.kind == "adapter" for e in plan.entries.values())
    x = data[0][0]
    before = model.eval()(x)
    spt.apply(model, plan)
    assert any(isinstance(m, AdapterLinear) for m in model.modules())
    assert torch.equal(model(x), before)


@pytest.mark.filterwarnings("ignore:SPT budget")
def test_apply_rejects_a_model_without_linear_layers_and_foreign_plans():
    plan = spt.allocate(toy_sensitivity(), Toy(), 1_000, rank=2, alpha=2.0)
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        spt.apply(nn.Sequential(nn.LayerNorm(4)), plan)
    with pytest.raises(ValueError, match=r"'big\.weight', which the model does not have"):
        spt.apply(mlp(), plan)
    with pytest.raises(TypeError, match="plan must be an SPTPlan"):
        spt.apply(mlp(), {"entries": {}})


def test_stitched_vit_round_trip_leaves_stitching_weights_out():
    """A StitchedViT: its anchors' nn.Linear layers are tuned; a StitchingLayer's weight is
    no nn.Linear weight and is not ranked (its bias is a vector, and may be)."""
    from stitchops.models import StitchedViT

    torch.manual_seed(0)
    model = StitchedViT(
        [
            VisionTransformer(
                img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5
            ),
            VisionTransformer(
                img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5
            ),
        ]
    )
    model.select(model.stitches[1].id)
    data = batches(2, (3, 16, 16))
    sens = spt.sensitivity(model, data, progress=False)
    assert sens and all(p.dim() == 1 or "stitch" not in n for n, p in sens.items())
    plan = spt.allocate(sens, model, 500, rank=2, alpha=2.0)
    x = data[0][0]
    before = model.eval()(x)
    spt.apply(model, plan)
    assert torch.equal(model(x), before)
    fine_tune(model, data * 2)
    tuned = model(x)
    spt.merge(model)
    torch.testing.assert_close(model(x), tuned, rtol=1e-5, atol=1e-5)


def test_timm_vision_transformer_round_trip():
    timm = pytest.importorskip("timm", reason="timm does not import here (CPU torchvision)")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=16
    )
    data = batches(1, (3, 32, 32))
    plan = spt.allocate(spt.sensitivity(model, data, progress=False), model, 2_000)
    x = data[0][0]
    before = model.eval()(x)
    spt.apply(model, plan)
    assert torch.equal(model(x), before)
    assert any(isinstance(m, SparseDeltaLinear) for m in model.modules())


# ---------------------------------------------------------------- the official allocation


def deit_small_widths(depth: int = 2) -> VisionTransformer:
    """DeiT-S's widths (384, 6 heads, MLP 1536) at a small depth."""
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=32, patch_size=16, embed_dim=384, depth=depth, num_heads=6, num_classes=10
    )


def separate_qkv_names(sensitivity: dict) -> dict:
    """The sensitivities as the official separate-q/k/v model names them (and orders them:
    q, k, v where our fused qkv sits)."""
    out = {}
    for name, value in sensitivity.items():
        if ".qkv." in name:
            for i, part in enumerate("qkv"):
                out[name.replace(".qkv.", f".{part}.")] = value.chunk(3, 0)[i]
        else:
            out[name] = value
    return out


@functools.cache
def official_case():
    """(model, sensitivities, the official plans at 0.2 and 0.8 M), computed once."""
    from official_spt import official_plans

    model = deit_small_widths(depth=1)
    g = torch.Generator().manual_seed(11)
    ranked = ranked_parameters(model, EXCLUDE)
    sens = {n: torch.rand(p.shape, generator=g) for n, p in ranked.items()}
    return model, sens, official_plans(separate_qkv_names(sens), [0.2, 0.8], extra=384)


@pytest.mark.parametrize("budget_m", [0.2, 0.8])
def test_official_allocation_on_deit_small_widths(budget_m):
    """``tau_search="official"`` with q, k, v split out of the fused qkv equals the official
    allocation (its τ sweep, its per-q/k/v thresholds) written in the tests, on a ViT with
    DeiT-S's widths and random sensitivities."""
    model, sens, plans = official_case()
    structured, vectors, unstructured = plans[budget_m]
    plan = spt.allocate(sens, model, budget_m * 1e6, tau_search="official")
    got_structured = sorted(n for n, e in plan.entries.items() if e.kind == "lora")
    want = sorted(structured)
    mapped = sorted(n.replace(".qkv.weight[", ".").replace("]", ".weight") for n in got_structured)
    assert mapped == want
    got_vectors = sorted(
        n.replace(".qkv.bias[", ".").replace("]", ".bias")
        for n, e in plan.entries.items()
        if e.kind == "whole"
    )
    assert got_vectors == sorted(vectors)
    for name, index in unstructured.items():
        ours_name = name
        for part in "qkv":
            for kind in ("weight", "bias"):
                ours_name = ours_name.replace(f".{part}.{kind}", f".qkv.{kind}[{part}]")
        assert plan.entries[ours_name].index == index, name
    assert len(plan.entries) == len(structured) + len(vectors) + len(unstructured)


def test_fused_qkv_is_tuned_as_three_matrices_and_merges():
    """split_fused (default): the fused qkv's parts get their own entries and thresholds, a
    PartedLinear tunes them in their rows, the output starts unchanged, and merging folds
    every part back; split_fused=False ranks qkv as one matrix."""
    model = tiny_vit()
    data = batches(2, (3, 16, 16))
    sens = spt.sensitivity(model, data, progress=False)
    plan = spt.allocate(sens, model, 400, rank=2, alpha=4.0)
    parts = [e for e in plan.entries.values() if e.parameter is not None]
    assert parts and all(e.name.endswith(("[q]", "[k]", "[v]")) for e in parts)
    assert all(e.shape[0] == 24 for e in parts if e.shape[-1] == 24 and len(e.shape) == 2)
    fused = spt.allocate(sens, model, 400, rank=2, alpha=4.0, split_fused=False)
    assert not any(e.parameter for e in fused.entries.values())
    assert any(n.endswith("qkv.weight") for n in fused.entries)
    x = data[0][0]
    before = model.eval()(x)
    spt.apply(model, plan)
    from stitchops.nn import PartedLinear

    assert any(isinstance(m, PartedLinear) for m in model.modules())
    assert torch.equal(model(x), before)
    assert spt.trainable_count(model) == plan.total
    fine_tune(model, data * 3)
    tuned = model(x)
    spt.merge(model)
    assert not any(isinstance(m, PartedLinear) for m in model.modules())
    torch.testing.assert_close(model(x), tuned, rtol=1e-5, atol=1e-5)


def test_parted_linear_tunes_only_its_parts_rows():
    from stitchops.nn import PartedLinear

    torch.manual_seed(0)
    linear = nn.Linear(4, 6)
    frozen = linear.weight.detach().clone()
    parts = {"q": ((0, 2), "lora", None), "v": ((4, 6), "unstructured", [1, 6])}
    layer = PartedLinear(linear, parts, rank=2)
    with torch.no_grad():
        layer.lora_B["q"].fill_(0.5)
        layer.delta.fill_(1.0)
    merged = layer.merged_linear().weight
    changed = (merged != frozen).any(1).tolist()
    assert changed == [True, True, False, False, True, True]
    assert (merged - frozen)[4:].flatten().nonzero().flatten().tolist() == [1, 6]
    x = torch.randn(3, 4)
    torch.testing.assert_close(layer(x), x @ merged.T + linear.bias)


def test_allocation_refuses_nan_and_negative_sensitivities_and_says_when_saturated():
    sens = toy_sensitivity()
    sens["small.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"sensitivity\['small.weight'\] holds 1 NaN"):
        spt.allocate(sens, Toy(), 100)
    sens = toy_sensitivity()
    sens["norm.bias"][0] = -1.0
    with pytest.raises(ValueError, match=r"sensitivity\['norm.bias'\] .* negative"):
        spt.allocate(sens, Toy(), 100)
    with pytest.warns(UserWarning, match="more than any plan uses"):
        plan = spt.allocate(toy_sensitivity(), Toy(), 10**6, rank=2)
    assert plan.tau == sum(t.numel() for t in toy_sensitivity().values())


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"a": 1}', "not an SPT plan: expected a JSON object with 'entries'"),
        ("[1, 2]", "not an SPT plan"),
        ('{"entries": []}', "missing alpha, beta, budget, rank, structured, tau"),
        (
            '{"entries": [{"name": "x"}], "budget": 1, "tau": 1, "structured": "lora", "rank": 8,'
            ' "alpha": 10, "beta": 5}',
            "malformed entry",
        ),
        ("not json", "not JSON"),
    ],
)
def test_a_foreign_plan_file_is_refused_with_a_reason(tmp_path, text, message):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        spt.SPTPlan.load(path)
