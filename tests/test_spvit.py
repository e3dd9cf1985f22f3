"""SPViT (stitchops.spvit, stitchops.nn.spvit): the single-path layers against the official
formulation (tests/official_spvit.py) in float64 for every gate choice, FLOPs equal to
models.flops for an unpruned model and to the pruned model's count, the searched and the
finalised model's logits equal in eval mode, the search's gradients, gates and λ, plans."""

from __future__ import annotations

import json

import pytest
import torch
from official_spvit import official_attention

from stitchops import spvit
from stitchops.models import vit_flops, vit_small_test
from stitchops.nn.spvit import UnifiedAttention, centre_taps

SPVIT_TENSORS = ("head_probs", "kernel_thresholds", "bn_1x1.", "bn_3x3.", "ffn_thresholds")


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    options = {"embed_dim": 24, "depth": 3, "num_heads": 3, **kw}
    return vit_small_test(**options).double()


def _randomise(search, thresholds):
    """Mixing, BatchNorm statistics and MLP gates away from their initial values; the
    attention gates' logits as given per block."""
    with torch.no_grad():
        for (attn, mlp), logits in zip(search.layers(), thresholds, strict=True):
            attn.head_probs.normal_(0, 0.02)
            attn.kernel_thresholds.copy_(torch.tensor(logits, dtype=torch.float64))
            mlp.ffn_thresholds.normal_(0.3, 1.0)
            for k in attn.kernel_sizes:
                bn = getattr(attn, f"bn_{k}x{k}")
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.normal_(1.0, 0.1)
                bn.bias.normal_()


def test_conversion_keeps_the_models_names():
    model = _model()
    plain = set(model.state_dict())
    spvit.apply(model, target_ratio=0.6)
    converted = set(model.state_dict())
    assert plain <= converted
    assert all(any(t in key for t in SPVIT_TENSORS) for key in converted - plain)
    missing, unexpected = model.load_state_dict(_model().state_dict(), strict=False)
    assert not unexpected and all(any(t in key for t in SPVIT_TENSORS) for key in missing)


@pytest.mark.parametrize(
    "gates", [(0, 0, 0), (1, 0, 0), (1, 1, 0), (1, 1, 1)], ids=["skip", "conv1x1", "conv3x3", "msa"]
)
def test_unified_attention_is_the_official_layer(gates):
    model = _model()
    search = spvit.apply(model, target_ratio=0.6)
    _randomise(search, [(1.0, 1.0, 1.0)] * 3)
    attn = model.blocks[1].attn.eval()
    with torch.no_grad():
        attn.kernel_thresholds.copy_(torch.tensor([5.0 if g else -5.0 for g in gates]))
    x = torch.randn(2, 1 + 16, 24, dtype=torch.float64)
    bns = {
        f"bn_{k}x{k}": [
            getattr(attn, f"bn_{k}x{k}").weight,
            getattr(attn, f"bn_{k}x{k}").bias,
            getattr(attn, f"bn_{k}x{k}").running_mean,
            getattr(attn, f"bn_{k}x{k}").running_var,
        ]
        for k in (1, 3)
    }
    weights = {name: p for name, p in attn.named_parameters(recurse=True) if "bn" not in name}
    want = official_attention(x, {**weights, **bns}, [float(g) for g in gates], 3)
    with torch.no_grad():
        got = attn(x)
    assert (got - want).abs().max() < 1e-13


def test_flops_of_an_unpruned_model_are_vit_flops():
    for options in ({}, {"embed_dim": 48, "num_heads": 4, "depth": 2, "img_size": 16}):
        model = _model(**options)
        dense = vit_flops(model.cfg)
        search = spvit.apply(model, target_ratio=0.5)
        assert search.dense_flops == dense
        assert search.flops().item() == pytest.approx(dense, rel=1e-12)


def test_searched_and_finalised_models_agree():
    """Eval mode, float64, a rectangular image: the same tokens and logits; the plan's FLOPs
    are the pruned model's count; folding BatchNorm changes nothing."""
    model = _model()
    search = spvit.apply(model, target_ratio=0.6)
    _randomise(search, [(1.0, -1.0, -1.0), (1.0, 1.0, -1.0), (1.0, 1.0, 1.0)])
    model.eval()
    x = torch.randn(2, 1, 8, 16, dtype=torch.float64)
    want_tokens, want = model.forward_features(x), model(x)
    plan = search.plan()
    assert [b.op for b in plan.blocks] == ["conv1x1", "conv3x3", "msa"]
    assert plan.flops == pytest.approx(search.flops().item())
    pruned = spvit.finalize(model, plan)
    assert (pruned.forward_features(x) - want_tokens).abs().max() < 1e-12
    assert (pruned(x) - want).abs().max() < 1e-12
    assert spvit.count_flops(pruned) == plan.flops
    spvit.fold_batchnorm(pruned)
    assert (pruned(x) - want).abs().max() < 1e-12


def test_skip_and_pruned_mlp_leave_the_residual():
    model = _model()
    search = spvit.apply(model, target_ratio=0.6)
    _randomise(search, [(-1.0, -1.0, -1.0)] * 3)
    with torch.no_grad():
        model.blocks[0].mlp.ffn_thresholds.fill_(-5.0)
    model.eval()
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    want = model(x)
    plan = search.plan()
    assert plan.blocks[0].op == "skip" and plan.blocks[0].mlp_keep == []
    pruned = spvit.finalize(model, plan)
    assert pruned.blocks[0].attn is None and pruned.blocks[0].mlp is None
    assert (pruned(x) - want).abs().max() < 1e-12
    assert spvit.count_flops(pruned) == plan.flops


def test_a_saved_pruned_model_loads_into_its_plans_structure():
    model = _model()
    search = spvit.apply(model, target_ratio=0.6)
    _randomise(search, [(1.0, 1.0, -1.0), (1.0, -1.0, -1.0), (1.0, 1.0, 1.0)])
    model.eval()
    plan = search.plan()
    pruned = spvit.finalize(model, plan)
    fresh = spvit.prune(
        _model(seed=1), spvit.Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    )
    fresh.load_state_dict(pruned.state_dict())
    fresh.eval()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert torch.equal(fresh(x), pruned(x))


def test_search_gradients_and_gates():
    """Training mode: gates drawn from the seeded stream (the same seed, the same gates); a
    closed branch's own weights get no gradient; the gate logits get one; two parameter
    groups cover every trainable parameter once."""
    model = _model()
    search = spvit.apply(model, target_ratio=0.6)
    with torch.no_grad():
        for attn, _ in search.layers():
            attn.kernel_thresholds.copy_(torch.tensor([30.0, -30.0, -30.0]))  # conv1x1 always
    model.train()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    search.seed(3)
    first = model(x)
    search.seed(3)
    assert torch.equal(model(x), first)
    loss = first.square().mean() + search.complexity_loss() if search.lam != "auto" else None
    assert loss is None
    lam = search.calibrate(first.square().mean().item())
    assert search.complexity_loss().item() == pytest.approx(1.1 * first.square().mean().item())
    assert lam > 0
    search.seed(4)  # a loss on every token (the class token bypasses the convolutions)
    (model.forward_features(x).square().mean() + search.complexity_loss()).backward()
    attn = model.blocks[1].attn
    dim = attn.dim
    assert attn.qkv.weight.grad[: 2 * dim].abs().max() == 0  # q and k: MSA closed
    assert attn.qkv.weight.grad[2 * dim :].abs().max() > 0  # v feeds the 1×1 conv
    assert attn.bn_3x3.weight.grad is None or attn.bn_3x3.weight.grad.abs().max() == 0
    assert attn.kernel_thresholds.grad is not None
    arch, weights = search.arch_parameters(), search.weight_parameters()
    assert {id(p) for p in arch}.isdisjoint(id(p) for p in weights)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(arch) + len(weights) == len(trainable) and len(arch) == 2 * len(model.blocks)


def test_centre_taps_and_bad_arguments():
    assert centre_taps(1, 3) == [4] and centre_taps(3, 3) == list(range(9))
    assert centre_taps(3, 5) == [6, 7, 8, 11, 12, 13, 16, 17, 18]
    model = _model()
    with pytest.raises(ValueError, match="exactly one of target_flops and target_ratio"):
        spvit.apply(model)
    with pytest.raises(ValueError, match="target_ratio must be in"):
        spvit.apply(_model(), target_ratio=1.5)
    with pytest.raises(ValueError, match="kernel_sizes must be odd, at most 7 and increasing"):
        spvit.apply(_model(), kernel_sizes=(3, 1), target_ratio=0.5)
    with pytest.raises(ValueError, match="lam must be 'auto' or a number"):
        spvit.apply(_model(), target_ratio=0.5, lam="big")
    spvit.apply(model, target_ratio=0.5)
    with pytest.raises(ValueError, match="already converted"):
        spvit.apply(model, target_ratio=0.5)
    with pytest.raises(ValueError, match="op 'conv5x5' is not one of"):
        spvit.Plan.from_dict(
            {"kernel_sizes": [1, 3], "blocks": [{"op": "conv5x5", "mlp_keep": []}]}
        )
    with pytest.raises(ValueError, match="not an SPViT plan"):
        spvit.Plan.from_dict({"blocks": []})
    plan = spvit.Plan((1, 3), [spvit.BlockPlan("msa", [0, 1])])
    with pytest.raises(ValueError, match="the plan has 1 blocks, the model 3"):
        spvit.prune(_model(), plan)


def test_plan_table_and_json(tmp_path):
    model = _model()
    search = spvit.apply(model, target_ratio=0.6)
    _randomise(search, [(1.0, -1.0, -1.0), (-1.0, -1.0, -1.0), (1.0, 1.0, 1.0)])
    plan = search.plan()
    plan.save(tmp_path / "plan.json")
    again = spvit.Plan.load(tmp_path / "plan.json")
    assert again == plan
    table = plan.table(search.geometry)
    assert "conv1x1" in table and "skip" in table and "msa" in table and "of dense" in table
    assert isinstance(model.blocks[0].attn, UnifiedAttention)


def test_a_pruned_anchor_stitches():
    """StitchedViT over a pruned small anchor: every route runs, and its FLOPs are summed
    block by block (the pruned anchor's own stitch: its count)."""
    from stitchops.models import StitchedViT

    small = _model(embed_dim=24, depth=3, num_heads=3)
    search = spvit.apply(small, target_ratio=0.6)
    _randomise(search, [(1.0, -1.0, -1.0), (-1.0, -1.0, -1.0), (1.0, 1.0, 1.0)])
    small.eval()
    pruned = spvit.finalize(small, search.plan())
    large = _model(seed=2, embed_dim=48, depth=4, num_heads=4)
    stitched = StitchedViT([pruned, large], two_way=True, rank=2).double().eval()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert stitched.stitches[0].flops == spvit.count_flops(pruned)
    for stitch in stitched.stitches:
        stitched.select(stitch.id)
        assert torch.isfinite(stitched(x)).all()
    stitched.select(0)
    assert torch.allclose(stitched(x), pruned(x))
