"""benchmarks/acceptance.py reads issue 2's targets off a results file correctly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "acceptance.py"


@pytest.fixture(scope="module")
def acceptance():
    spec = importlib.util.spec_from_file_location("acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results(triton=(2.0, 1.05), cuda=(1.5, 1.4), least_squares=12.0, shape_tokens=256 * 197):
    def impl(vs_unfused, vs_floor):
        return {"ms": 1.0, "vs_unfused": vs_unfused, "vs_floor": vs_floor, "of_roofline": 0.8}

    row = {"tokens": shape_tokens, "in": 384, "out": 1024, "rank": 16, "dtype": "bfloat16",
           "pass": "fwd+bwd", "triton": impl(*triton), "cuda": impl(*cuda)}  # fmt: skip
    other = {**row, "pass": "fwd", "triton": impl(9.0, 0.5)}
    data = {"environment": {"device": "test"}, "lora_linear": [other, row]}
    if least_squares is not None:
        data["least_squares_init"] = {"speedup": least_squares, "n": 19700, "in": 385,
                                      "device": "cuda"}  # fmt: skip
    return data


def test_met_when_the_best_backend_meets_every_target(acceptance):
    lines, ok = acceptance.check(results())
    assert ok, lines
    assert any("triton: 2.00x vs unfused" in line for line in lines)


def test_compiled_baseline_is_reported_but_not_a_target(acceptance):
    data = results(triton=(1.7, 1.2))
    data["lora_linear"][1]["compiled"] = {"ms": 1.5, "vs_unfused": 1.2, "vs_floor": 1.3}
    lines, ok = acceptance.check(data)
    assert not ok  # torch.compile's figure cannot meet a target for the fused kernels
    assert any("torch.compile" in line and "1.50x faster" in line for line in lines), lines


@pytest.mark.parametrize(
    "change",
    [
        {"triton": (1.7, 1.05)},  # too little speedup (cuda's 1.5 does not rescue it)
        {"triton": (2.0, 1.2)},  # too slow against the bare GEMM
        {"triton": (2.0, 1.2), "cuda": (1.5, 1.05)},  # each backend meets only one target
        {"least_squares": 9.0},
        {"least_squares": None},  # missing figure
        {"shape_tokens": 64 * 197},  # no row at the acceptance shape
    ],
)
def test_not_met(acceptance, change):
    lines, ok = acceptance.check(results(**change))
    assert not ok, lines


def test_command_line_reads_a_file(acceptance, tmp_path, capsys):
    path = tmp_path / "gpu-test.json"
    path.write_text(json.dumps(results()))
    assert acceptance.main([str(path)]) == 0
    assert "all targets met" in capsys.readouterr().out
    path.write_text(json.dumps(results(least_squares=1.0)))
    assert acceptance.main([str(path)]) == 1
