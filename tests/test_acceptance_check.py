"""benchmarks/acceptance.py reads every op's declared targets off a results file correctly."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def acceptance():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("acceptance", BENCHMARKS / "acceptance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def impl(vs_baseline, vs_floor=None):
    timing = {"ms": 1.0, "vs_baseline": vs_baseline, "of_roofline": 0.8}
    return timing if vs_floor is None else {**timing, "vs_floor": vs_floor}


def results(triton=(2.0, 1.05), cuda=(1.5, 1.4), least_squares=12.0, shape_tokens=256 * 197,
            stitched=(0.99, 0.97), sparse=(1.6, 1.05), cluster=(25.0, 0.7),
            focus=(6.0, 12.0)):  # fmt: skip
    row = {"tokens": shape_tokens, "in": 384, "out": 1024, "rank": 16, "dtype": "bfloat16",
           "pass": "fwd+bwd", "baseline_impl": "unfused", "triton": impl(*triton),
           "cuda": impl(*cuda)}  # fmt: skip
    other = {**row, "pass": "fwd", "triton": impl(9.0, 0.5)}
    data = {"environment": {"device": "test"}, "lora_linear": {"rows": [other, row]}}
    if least_squares is not None:
        data["least_squares_init"] = {"rows": [
            {"n": 19_700, "in": 384, "out": 384, "device": "cuda", "baseline_impl": "cpu_pinv",
             "stitchops": impl(least_squares)}]}  # fmt: skip
    data["sparse_delta_linear"] = {"rows": [
        {"work": "fwd_bwd", "in": i, "out": o, "density": d, "device": "cuda",
         "baseline_impl": "dense_gather",
         "triton": {**impl(sparse[0]), "vs_dense_gather": sparse[0], "vs_floor": sparse[1]}}
        for i, o in ((768, 3072), (3072, 768)) for d in (0.001, 0.01)]}  # fmt: skip
    data["token_cluster"] = {"rows": [
        {"work": "cluster", "batch": b, "map": "40x40", "device": "cuda", "baseline_impl":
         "official", "triton": {**impl(cluster[0]), "of_roofline": cluster[1]}}
        for b in (1, 8)]}  # fmt: skip
    data["focus_attention"] = {"rows": [
        *({"kind": "hrca", "map": m, "work": "forward", "device": "cuda",
           "baseline_impl": "official",
           "triton": {**impl(focus[0]), "memory_vs_baseline": focus[1]}}
          for m in ("128x128", "256x512")),
        *({"kind": "masked", "map": m, "work": "forward", "device": "cuda",
           "baseline_impl": "official", "triton": impl(focus[0])}
          for m in ("64x64", "128x256"))]}  # fmt: skip
    data["stitched_overhead"] = {"rows": [
        {"device": "cuda", "pass": name, "baseline_impl": "anchor", "stitched": impl(ratio)}
        for name, ratio in zip(("train step", "forward"), stitched, strict=True)]}  # fmt: skip
    return data


def test_every_op_declares_its_targets(acceptance):
    ops = {target.op for target in acceptance.targets()}
    assert ops == {"lora_linear", "least_squares_init", "stitched_overhead",
                   "sparse_delta_linear", "token_cluster", "focus_attention"}  # fmt: skip


def test_met_when_the_best_backend_meets_every_target(acceptance):
    lines, ok = acceptance.check(results())
    assert ok, lines
    assert any("lora_linear triton: vs_baseline 2.00 (min 1.8)" in line for line in lines), lines


@pytest.mark.parametrize(
    "change",
    [
        {"triton": (1.7, 1.05)},  # too little speedup (cuda's 1.5 does not rescue it)
        {"triton": (2.0, 1.2)},  # too slow against the bare GEMM
        {"triton": (2.0, 1.2), "cuda": (1.5, 1.05)},  # each backend meets only one target
        {"least_squares": 9.0},
        {"least_squares": None},  # missing figure
        {"shape_tokens": 64 * 197},  # no row at the acceptance shape
        {"stitched": (0.99, 0.9)},  # the forward 1.11x the anchor's time
        {"sparse": (1.4, 1.05)},  # sparse delta: too little over dense-then-gather
        {"sparse": (1.6, 1.2)},  # sparse delta: too slow against the frozen GEMM
        {"cluster": (15.0, 0.7)},  # token clustering: too little over the dense algorithm
        {"cluster": (25.0, 0.4)},  # token clustering: too far from the roofline
    ],
)
def test_not_met(acceptance, change):
    lines, ok = acceptance.check(results(**change))
    assert not ok, lines


def test_cpu_targets_are_read_off_the_cpu_file(acceptance, tmp_path, capsys):
    rows = [{"work": "delta_grad", "in": 768, "out": 3072, "nnz": 3000, "device": "cpu",
             "baseline_impl": "official",
             "torch": {**impl(12.0), "memory_vs_baseline": 2.0}}]  # fmt: skip
    rows += [{"work": "fwd_bwd", "in": i, "out": o, "density": d, "device": "cpu",
              "baseline_impl": "dense_gather", "torch": {**impl(1.3), "vs_dense_gather": 1.3}}
             for i, o in ((768, 3072), (3072, 768)) for d in (0.001, 0.01)]  # fmt: skip
    clusters = [{"work": work, "batch": b, "map": m, "device": "cpu", "threads": t, "busy": 1,
                 "baseline_impl": "official",
                 **{name: {**impl(2.0), "memory_vs_baseline": 1.5}
                    for name in ("torch", "torch_topk")}}
                for work in ("cluster", "reconstruct") for b, m in ((1, "40x40"), (8, "40x40"),
                                                                    (1, "32x32"))
                for t in (1, 2)]  # fmt: skip
    focus = [{"kind": "hrca", "map": m, "work": "forward", "device": "cpu",
              "baseline_impl": "official", "torch": {**impl(4.0), "memory_vs_baseline": 5.0}}
             for m in ("128x128", "256x512")]  # fmt: skip
    path = tmp_path / "cpu.json"

    def write():
        path.write_text(json.dumps({"environment": {}, "sparse_delta_linear": {"rows": rows},
                                    "token_cluster": {"rows": clusters},
                                    "focus_attention": {"rows": focus}}))  # fmt: skip

    write()
    assert acceptance.main([str(path)]) == 0
    rows[0]["torch"]["memory_vs_baseline"] = 0.5
    write()
    assert acceptance.main([str(path)]) == 1
    assert "with less peak memory" in capsys.readouterr().out


def test_command_line_reads_a_file(acceptance, tmp_path, capsys):
    path = tmp_path / "gpu-test.json"
    path.write_text(json.dumps(results()))
    assert acceptance.main([str(path)]) == 0
    assert "all targets met" in capsys.readouterr().out
    path.write_text(json.dumps(results(least_squares=1.0)))
    assert acceptance.main([str(path)]) == 1
