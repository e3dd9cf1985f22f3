"""stitchops.nn.StitchingLayer: nn.Linear drop-in, LoRA, stitch biases, merge, state dicts."""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, rel_err

from stitchops.nn import StitchingLayer


def test_rank0_is_a_drop_in_for_linear():
    linear = torch.nn.Linear(12, 20).to(DEVICE)
    layer = StitchingLayer(12, 20).to(DEVICE)
    layer.load_state_dict(linear.state_dict())  # strict: same keys, same shapes
    assert list(layer.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 7, 12, device=DEVICE)
    assert rel_err(layer(x), linear(x)) < 1e-6
    layer(x).sum().backward()
    linear(x).sum().backward()
    assert rel_err(layer.weight.grad, linear.weight.grad) < 1e-6
    assert StitchingLayer(12, 20, bias=False).bias is None


def test_lora_layer_freezes_weight_and_starts_as_the_linear_map():
    layer = StitchingLayer(12, 20, rank=4, alpha=8.0).to(DEVICE)
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad
    assert layer.scale == 2.0 and torch.equal(layer.lora_B, torch.zeros(20, 4, device=DEVICE))
    x = torch.randn(5, 12, device=DEVICE)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert rel_err(layer(x), expected) < 1e-6
    layer(x).square().sum().backward()
    assert layer.weight.grad is None
    assert layer.lora_B.grad.abs().sum() > 0 and layer.bias.grad is not None
    assert torch.equal(layer.lora_A.grad, torch.zeros_like(layer.lora_A))  # B = 0 at init


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_merge_unmerge(dtype, tol):
    layer = StitchingLayer(16, 24, rank=4, num_stitch_biases=2).to(DEVICE, dtype)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.active_stitch = 1
    x = torch.randn(9, 16, device=DEVICE, dtype=dtype)
    before, weight = layer(x), layer.weight.clone()
    assert layer.merge().merged and rel_err(layer(x), before) < tol
    layer.merge()  # idempotent
    assert rel_err(layer(x), before) < tol
    assert not layer.unmerge().merged
    assert rel_err(layer.weight, weight) < tol and rel_err(layer(x), before) < tol


def test_merge_in_float64_is_exact_to_float64():
    """B·A is formed in the layer's dtype when it is wider than float32: merging a float64
    layer matches W + scale·B·A to float64 precision (peft's merge), not to float32's."""
    layer = StitchingLayer(40, 24, rank=8, alpha=3.0).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    want = layer.weight.detach() + layer.scale * layer.lora_B.detach() @ layer.lora_A.detach()
    weight = layer.weight.detach().clone()
    layer.merge()
    assert rel_err(layer.weight, want) < 1e-15
    layer.unmerge()
    assert rel_err(layer.weight, weight) < 1e-15


def test_state_dict_round_trip_keeps_merged_state():
    layer = StitchingLayer(8, 10, rank=2, num_stitch_biases=3)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.stitch_bias.normal_()
    x = torch.randn(4, 8)
    for merge in (False, True):
        if merge:
            layer.merge()
        clone = StitchingLayer(8, 10, rank=2, num_stitch_biases=3)
        clone.load_state_dict(layer.state_dict())
        assert clone.merged == merge
        for stitch in (None, 2):
            layer.active_stitch = clone.active_stitch = stitch
            assert torch.equal(clone(x), layer(x))


def test_stitch_biases_select_one_row_and_train_only_it():
    layer = StitchingLayer(8, 10, rank=2, num_stitch_biases=3)
    x = torch.randn(4, 8)
    plain = layer(x)
    with torch.no_grad():
        layer.stitch_bias[1] = torch.arange(10.0)
    layer.active_stitch = 1
    assert torch.allclose(layer(x), plain + torch.arange(10.0))
    layer(x).sum().backward()
    grad = layer.stitch_bias.grad
    assert torch.equal(grad[0], torch.zeros(10)) and torch.equal(grad[2], torch.zeros(10))
    assert torch.equal(grad[1], torch.full((10,), 4.0))
    layer.active_stitch = 3
    with pytest.raises(ValueError, match=r"active_stitch must be in \[0, 3\), got 3"):
        layer(x)


def test_least_squares_init_beats_random_init():
    from stitchops.reference.least_squares import least_squares_init as reference

    src = torch.randn(400, 16, device=DEVICE)
    dst = torch.tanh(src @ torch.randn(16, 24, device=DEVICE)) + 0.5
    layer = StitchingLayer(16, 24, rank=4).to(DEVICE)
    with torch.no_grad():
        layer.lora_B.normal_()
        random_error = (layer(src) - dst).square().mean()
        assert layer.init_least_squares(src, dst) is layer
        fitted_error = (layer(src) - dst).square().mean()
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    w_opt, b_opt = reference(src, dst)
    optimal_error = (src.double().cpu() @ w_opt.t() + b_opt - dst.double().cpu()).square().mean()
    assert fitted_error < 0.25 * random_error
    assert abs(fitted_error.item() - optimal_error.item()) < 1e-5 * optimal_error.item()
    with pytest.raises(ValueError, match="maps 16 -> 24 features but this layer is 16 -> 30"):
        StitchingLayer(16, 30).init_least_squares(src, dst)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"in_features": 0, "out_features": 4}, ValueError, "in_features must be >= 1"),
        ({"in_features": 4, "out_features": 4, "rank": -1}, ValueError, "rank must be >= 0"),
        ({"in_features": 4.0, "out_features": 4}, TypeError, "in_features must be an int"),
        (
            {"in_features": 4, "out_features": 4, "num_stitch_biases": True},
            TypeError,
            "must be an int",
        ),
    ],
)
def test_constructor_checks(kwargs, error, message):
    with pytest.raises(error, match=message):
        StitchingLayer(**kwargs)
