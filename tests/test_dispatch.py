"""Backend selection: forcing, reasons, environment variable, no silent fallback."""

from __future__ import annotations

import os

import pytest
import torch

import stitchops
from stitchops import _backends, _dispatch, _runtime
from stitchops.ops import lora as lora_ops

LORA = lora_ops.LORA


def _reasons(backend, x, tensors, rank, out_features):
    """lora_linear's reasons against ``backend`` for x [T, IN] and weight's OUT."""
    written = x.shape[0] * max(out_features, x.shape[-1])
    return LORA.reasons(backend, tensors, written=written, limits=lora_ops.kernel_limits(rank))


def _args(dtype=torch.float32, rank=2):
    return (
        torch.randn(5, 8, dtype=dtype),
        torch.randn(6, 8, dtype=dtype),
        None,
        torch.randn(rank, 8, dtype=dtype),
        torch.randn(6, rank, dtype=dtype),
    )


def test_available_backends_reports_every_backend():
    found = stitchops.available_backends("cpu")
    assert set(found) == set(stitchops.BACKENDS)
    assert found["torch"] is None
    assert isinstance(found["cuda"], str) and "cuda" in found["cuda"]


def test_cpu_default_is_torch(monkeypatch):
    calls = []
    real = lora_ops.reference.lora_forward
    monkeypatch.setattr(lora_ops.reference, "lora_forward", lambda *a: calls.append(1) or real(*a))
    stitchops.lora_linear(*_args())
    assert calls == [1]


def test_forced_triton_really_runs_the_triton_kernels(monkeypatch):
    """Guards the CI claim: under TRITON_INTERPRET=1 the Triton launchers are executed."""
    if _backends.triton_missing_reason() or not (
        _runtime.triton_interpreting() or torch.cuda.is_available()
    ):
        pytest.skip("triton cannot run here")
    from stitchops.kernels import lora as triton_lora

    calls = []
    for name in ("lora_forward", "lora_backward"):
        real = getattr(triton_lora, name)
        monkeypatch.setattr(
            triton_lora, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a)
        )
    x, w, _, a, b = _args()
    a.requires_grad_()
    with stitchops.use_backend("triton"):
        stitchops.lora_linear(x, w, None, a, b).sum().backward()
    assert calls == ["lora_forward", "lora_backward"]


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="only CI promises triton")
def test_ci_runs_triton():
    assert not _reasons("triton", torch.empty(1), [torch.empty(1)], 1, 1)


def test_forcing_an_unavailable_backend_lists_every_reason():
    with stitchops.use_backend("cuda"), pytest.raises(stitchops.BackendUnavailableError) as err:
        stitchops.lora_linear(*_args())
    message = str(err.value)
    assert "'cuda' was forced" in message
    for name in stitchops.BACKENDS:
        assert f"  {name}: " in message
    assert "torch: can run" in message


def test_forced_triton_refuses_bf16_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with (
        stitchops.use_backend("triton"),
        pytest.raises(stitchops.BackendUnavailableError, match="bfloat16"),
    ):
        stitchops.lora_linear(*_args(torch.bfloat16))


def test_forced_kernel_refuses_large_rank_and_float64(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with stitchops.use_backend("triton"):
        with pytest.raises(stitchops.BackendUnavailableError, match="rank 129 > 128"):
            stitchops.lora_linear(*_args(rank=129))
        with pytest.raises(stitchops.BackendUnavailableError, match="float64 is not supported"):
            stitchops.lora_linear(*_args(torch.float64))


def test_torch_backend_takes_any_rank_and_float64():
    with stitchops.use_backend("torch"):
        y = stitchops.lora_linear(*_args(torch.float64, rank=129))
    assert y.dtype == torch.float64


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("STITCHOPS_BACKEND", "cuda")
    with pytest.raises(stitchops.BackendUnavailableError):
        stitchops.lora_linear(*_args())
    with stitchops.use_backend("torch"):  # the context manager wins over the environment
        stitchops.lora_linear(*_args())
    monkeypatch.setenv("STITCHOPS_BACKEND", "auto")
    stitchops.lora_linear(*_args())
    monkeypatch.setenv("STITCHOPS_BACKEND", "tritn")
    with pytest.raises(ValueError, match="STITCHOPS_BACKEND: unknown stitchops backend 'tritn'"):
        stitchops.lora_linear(*_args())


def test_use_backend_nests_and_restores_after_errors():
    with pytest.raises(ValueError, match="unknown stitchops backend"):
        stitchops.use_backend("fast").__enter__()
    assert _dispatch.forced_backend() is None
    with stitchops.use_backend("cuda"):
        with stitchops.use_backend(None):
            assert _dispatch.forced_backend() is None
            stitchops.lora_linear(*_args())
        with pytest.raises(stitchops.BackendUnavailableError):
            stitchops.lora_linear(*_args())
        assert _dispatch.forced_backend() == "cuda"
    assert _dispatch.forced_backend() is None


def test_cuda_backend_refuses_gpus_older_than_sm80():
    reason = _backends.capability_reason((7, 5))
    assert reason is not None and "7.5" in reason and "8.0" in reason
    assert _backends.capability_reason((8, 0)) is None
    assert _backends.capability_reason((9, 0)) is None


@pytest.mark.parametrize(
    ("capability", "built", "runs"),
    [
        ((9, 0), "80;90a", True),
        ((8, 0), "80;90a", True),
        ((8, 9), "80;90a", True),  # sm_80 machine code runs on 8.x, x >= 0
        ((8, 6), "86", True),
        ((8, 0), "86", False),  # but not on a lower minor
        ((9, 0), "80", False),  # nor across major versions
        ((10, 0), "80;90a", False),  # sm_90a runs on 9.0 only
        ((9, 0), "90", True),
        ((10, 3), "80;90a;100f", True),  # a family target runs on 10.x, x >= 0
        ((10, 0), "103f", False),
        ((12, 0), "80;90a;100f", False),
        ((9, 0), "unknown", True),  # an older build that does not say
        ((9, 0), "emulated", True),
    ],
)
def test_cuda_backend_checks_the_built_machine_code(capability, built, runs):
    reason = _backends.capability_reason(capability, built)
    assert (reason is None) == runs, reason
    if not runs:
        assert "STITCHOPS_CUDA_ARCHS" in reason and f"{capability[0]}.{capability[1]}" in reason


def test_triton_refuses_tensors_past_int32_offsets(monkeypatch):
    """Views wide enough that y [T, OUT] reaches 2^31 elements, without allocating them."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w = torch.zeros(64, 8)
    at_limit = torch.zeros(1, 8).expand(2**31 // 64, 8)  # y [T, 64] spans exactly 2^31
    reasons = _reasons("triton", at_limit, [at_limit, w], 0, 64)
    assert any("int32" in r for r in reasons), reasons
    below = at_limit[1:]
    assert not _reasons("triton", below, [below, w], 0, 64)
    # An input's own span counts too: two rows 2^31 - 7 elements apart (meta: no memory).
    strided = torch.empty_strided((2, 8), (2**31 - 7, 1), device="meta")
    for backend, refused in (("triton", True), ("cuda", False)):
        reasons = _reasons(backend, strided, [strided], 0, 64)
        assert any("int32" in r for r in reasons) == refused, (backend, reasons)


@pytest.mark.parametrize(
    ("installed", "refused"),
    [("3.4.0", True), ("3.5.1", True), ("3.6.0", False), ("3.10.0+git1234", False)],
)
def test_triton_older_than_the_tested_minimum_is_a_reason(monkeypatch, installed, refused):
    import importlib.metadata

    if _backends.installed_triton_version() is None:
        pytest.skip("triton is not installed from a distribution here")
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: installed)
    _backends.triton_missing_reason.cache_clear()
    try:
        reason = _backends.triton_missing_reason()
        assert _backends.installed_triton_version() == tuple(
            int(p) for p in installed.split("+")[0].split(".")[:2]
        )
    finally:
        _backends.triton_missing_reason.cache_clear()
    if refused:
        assert reason and installed[:3] in reason and "triton>=3.6" in reason
    else:
        assert reason is None


@pytest.mark.parametrize(
    ("triton_version", "numpy_version", "refused"),
    [
        ("3.6.0", "2.4.6", True),
        ("3.6.0", "2.3.5", False),
        ("3.7.1", "2.4.6", False),
        ("3.9.0", "3.0.0", False),
    ],
)
def test_triton_interpreter_refuses_numpy_it_cannot_run_with(
    monkeypatch, triton_version, numpy_version, refused
):
    """Triton 3.6's interpreter with NumPy >= 2.4 is a reason (checked by hand: it fails with
    a TypeError inside every lora kernel), not an InterpreterError at the first launch."""
    import importlib.metadata

    versions = {"triton": triton_version, "numpy": numpy_version}

    def version(dist: str) -> str:
        if dist not in versions:
            raise importlib.metadata.PackageNotFoundError(dist)
        return versions[dist]

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _backends.triton_interpreter_reason.cache_clear()
    try:
        reasons = _backends.device_reasons("triton", [torch.zeros(1)])
        if refused:
            with (
                stitchops.use_backend("triton"),
                pytest.raises(stitchops.BackendUnavailableError, match=r"numpy<2\.4"),
            ):
                stitchops.lora_linear(*_args())
    finally:
        _backends.triton_interpreter_reason.cache_clear()
    assert any("numpy<2.4" in r for r in reasons) == refused, reasons
    if refused:
        assert f"triton 3.6 fails with numpy {numpy_version[:3]}" in reasons[0]


def test_op_declaration_derives_the_generic_reasons(monkeypatch):
    """An op's declaration alone gives the dtype and interpreter reasons, its limits are
    appended, and its entry points resolve per backend."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    op = _dispatch.Op(
        name="probe",
        entries=("probe_forward",),
        reference="math",
        triton="math",
        kernel_dtypes=(torch.float16,),
    )
    half, double = torch.zeros(2, dtype=torch.float16), torch.zeros(2, dtype=torch.float64)
    assert op.reasons("torch", [double], limits=["too wide"]) == []
    assert "float64 is not supported (float16)" in " ".join(op.reasons("triton", [double]))
    assert op.reasons("triton", [half], limits=["too wide"])[-1] == "too wide"
    assert any("not cuda" in r for r in op.reasons("cuda", [half]))
    with pytest.raises(ValueError, match="declares no entry point 'sqrt'"):
        op.entry("torch", "sqrt")
    _dispatch.register(op)
    try:
        assert _dispatch.OPS["probe"] is op and "lora_linear" in _dispatch.OPS
        with pytest.raises(ValueError, match="declared twice"):
            _dispatch.register(_dispatch.Op("probe", (), "math", "math", ()))
    finally:
        del _dispatch.OPS["probe"]
