"""What every op's tests share: case ids, float64 masters, the accuracy rule, NaN-poisoned
runs, non-contiguous / empty / bad-input helpers, opcheck and full-graph compilation.

An op's test file declares its cases and calls these; the rule for accuracy is the
project's: the error against a float64 reference is at most twice the error of the
same-dtype PyTorch reference (plus a per-dtype floor for results that reference gets
exactly).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import pytest
import torch

import stitchops
from stitchops import _backends, _runtime
from stitchops._dispatch import Op

# Where op tests put their tensors: the GPU when there is one, else the CPU (the kernels then
# run through Triton's interpreter and the CUDA host emulator). STITCHOPS_TEST_DEVICE
# overrides it; the device audit (test_device_audit.py) sets a stand-in, "meta".
DEVICE = os.environ.get("STITCHOPS_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
AUDIT = os.environ.get("STITCHOPS_TEST_AUDIT")  # a file the audit's records go to

# Relative error floors per dtype, for results whose same-dtype reference is itself exact.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPE_IDS = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}


def case_id(sizes: Sequence[tuple[str, object]], flags: Mapping[str, bool] = ()) -> str:
    """A readable parametrisation id: ``case_id([("T", (2, 37)), ("IN", 50), ("R", 3)],
    {"bias": True})`` is ``T2x37-IN50-R3-bias`` (tuples joined by x, flags named when set)."""
    parts = [
        prefix + ("x".join(map(str, value)) if isinstance(value, tuple) else str(value))
        for prefix, value in sizes
    ]
    return "-".join([*parts, *(name for name, on in dict(flags).items() if on)])


def require_backend(
    op: Op | None, backend: str, *tensors: torch.Tensor, limits: Sequence[str] = ()
) -> None:
    """Skip (with the backend's own reasons) when ``backend`` cannot run a call of ``op`` on
    ``tensors`` here; ``op=None``: only whether the backend runs on their device. Kernel
    tests pass a tensor made where their data lives (``DEVICE``); under the device audit this
    records that device and skips."""
    if AUDIT:
        record = {
            "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
            "backend": backend,
            "devices": sorted({t.device.type for t in tensors}),
        }
        with open(AUDIT, "a") as f:
            f.write(json.dumps(record) + "\n")
        pytest.skip("device audit: recorded")
    if op is None:
        reasons = [] if backend == "torch" else _backends.device_reasons(backend, tensors)
    else:
        reasons = op.reasons(backend, tensors, limits=limits)
    if reasons and backend != "torch" and not torch.cuda.is_available() and not _stand_in(backend):
        pytest.skip(
            f"no GPU: the {backend} backend needs one here (its CPU stand-in is off: "
            f"{'TRITON_INTERPRET=1' if backend == 'triton' else 'STITCHOPS_EMULATE_CUDA'})"
        )
    if reasons:
        pytest.skip(f"{backend} cannot run here: {'; '.join(reasons)}")


def _stand_in(backend: str) -> bool:
    """Whether this CPU machine runs ``backend``'s kernels anyway: Triton's interpreter, or
    the CUDA host emulator (tests/conftest.py)."""
    if backend == "triton":
        return _runtime.triton_interpreting()
    return os.environ.get("STITCHOPS_EMULATE_CUDA", "1") != "0"


def float64_masters(
    shapes: Mapping[str, tuple[tuple[int, ...], float]], seed: int = 1234, device: str = DEVICE
) -> dict[str, torch.Tensor]:
    """Float64 random tensors by name: ``{name: (shape, scale)}``, N(0, scale²) entries, drawn
    in the mapping's order from one seeded generator (the same data on every device)."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)
        for name, (shape, scale) in shapes.items()
    }


def leaves(
    masters: Mapping[str, torch.Tensor], dtype: torch.dtype, trainable: Callable[[str], bool]
) -> dict[str, torch.Tensor]:
    """Fresh leaf copies of ``masters`` in ``dtype``; ``trainable(name)`` says which need grad."""
    return {
        name: t.to(dtype).detach().requires_grad_(trainable(name)) for name, t in masters.items()
    }


def run_with_grads(fn: Callable, args: Mapping[str, torch.Tensor], grad: torch.Tensor, **kwargs):
    """(fn(**args, **kwargs), {name: gradient of every argument that requires grad})."""
    y = fn(**args, **kwargs)
    trainable = {k: v for k, v in args.items() if v.requires_grad}
    grads = torch.autograd.grad(y, list(trainable.values()), grad)
    return y, dict(zip(trainable, grads, strict=True))


@contextlib.contextmanager
def poisoned(backend: str) -> Iterator[None]:
    """Run on ``backend`` (forced) with every kernel output NaN before the kernel writes it."""
    with stitchops.use_backend(backend), _runtime.poison_outputs():
        yield


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    """max |value - ref| / max |ref|, computed in float64; NaN anywhere gives inf."""
    value, ref = value.double(), ref.double()
    if not torch.isfinite(value).all():
        return float("inf")
    scale = ref.abs().max().item() if ref.numel() else 1.0
    return ((value - ref).abs().max().item() if ref.numel() else 0.0) / max(scale, 1e-30)


def assert_accurate(name: str, value, same_dtype_ref, ref64) -> None:
    """The project's rule: error vs float64 at most 2x that of the same-dtype PyTorch
    reference (plus the dtype's floor, for outputs the reference gets exactly)."""
    assert value.shape == ref64.shape, f"{name}: shape {value.shape} != {ref64.shape}"
    err = rel_err(value, ref64)
    bound = 2 * rel_err(same_dtype_ref, ref64) + FLOOR[value.dtype]
    assert err <= bound, f"{name}: relative error {err:.3e} > bound {bound:.3e}"


def check_against_float64(
    op_fn: Callable,
    reference_fn: Callable,
    masters: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    trainable: Callable[[str], bool],
    backend: str,
    grad64: torch.Tensor,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """``op_fn`` on ``backend`` (poisoned outputs) against ``reference_fn``: the output and
    every gradient obey the accuracy rule, and exactly the trainable arguments get one.
    Returns the op's gradients by name."""
    ref64, grads64 = run_with_grads(
        reference_fn, leaves(masters, torch.float64, trainable), grad64, **kwargs
    )
    ref_dt, grads_dt = run_with_grads(
        reference_fn, leaves(masters, dtype, trainable), grad64.to(dtype), **kwargs
    )
    with poisoned(backend):
        y, grads = run_with_grads(
            op_fn, leaves(masters, dtype, trainable), grad64.to(dtype), **kwargs
        )
    assert y.dtype == dtype
    assert_accurate("y", y, ref_dt, ref64)
    assert set(grads) == set(grads64)
    for name in grads64:
        assert_accurate(f"d{name}", grads[name], grads_dt[name], grads64[name])
    return grads


def transposed_storage(t: torch.Tensor) -> torch.Tensor:
    """A copy of 2-D ``t`` with strides (1, rows): same values, not contiguous."""
    return t.detach().t().contiguous().t()


def every_other_element(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that is a stride-2 view of a buffer twice as long: not contiguous."""
    buffer = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], device=t.device, dtype=t.dtype)
    view = buffer[..., ::2]
    view.copy_(t.detach())
    return view


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous copy of ``t``: transposed storage for 2-D, else every other element."""
    copy = transposed_storage(t) if t.dim() == 2 else every_other_element(t)
    assert not copy.is_contiguous()
    return copy.requires_grad_(t.requires_grad)


def assert_rejected_untouched(fn: Callable, args: Mapping, error: type, message: str) -> None:
    """``fn(**args)`` raises ``error`` matching ``message`` and writes no tensor argument."""
    before = {
        k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and not v.is_meta
    }
    with pytest.raises(error, match=message):
        fn(**args)
    for name, value in before.items():
        assert torch.equal(args[name], value), f"{name} was written"


def assert_same_bits(first: tuple, second: tuple) -> None:
    """Two (output, {name: gradient}) runs are bitwise equal (determinism)."""
    (y0, grads0), (y1, grads1) = first, second
    assert torch.equal(y0, y1)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name


def opcheck(backend: str, op, *args) -> None:
    """torch.library.opcheck of ``op`` (an overload: schema, fake, autograd registration)."""
    with stitchops.use_backend(backend):
        torch.library.opcheck(op, args)


def assert_compiles_fullgraph(
    model: torch.nn.Module, x: torch.Tensor, compiler: str, cache_dir, monkeypatch
) -> None:
    """torch.compile(model, fullgraph=True) runs with no graph break and gives eager's output
    and parameter gradients (loss: the output's sum of squares)."""
    # A private inductor cache: torch's FX-graph cache does not key on a custom op's schema,
    # so graphs cached by an older stitchops could replay a stale call signature.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    torch._dynamo.reset()
    eager = model(x)
    eager.square().sum().backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    eager_grads = {n: p.grad.clone() for n, p in trained.items()}
    model.zero_grad()
    out = torch.compile(model, fullgraph=True, backend=compiler)(x)
    out.square().sum().backward()
    assert rel_err(out, eager) < 1e-5
    for name, p in trained.items():
        assert rel_err(p.grad, eager_grads[name]) < 1e-5, name
