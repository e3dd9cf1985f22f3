"""benchmarks/acceptance.py reads every op's declared targets off a results file correctly.

The op set and the rows come from the targets themselves (each bench_<op>.py's TARGETS):
a results file is synthesised that meets every bound by 10%, then each bound is broken in
turn, so a new op's targets are checked here without this file naming it."""

from __future__ import annotations

import copy
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


def meeting(bounds, factor: float = 1.1) -> dict:
    """An implementation's figures that meet every (metric, kind, bound) by ``factor``."""
    figures = {"ms": 1.0}
    for metric, kind, bound in bounds:
        figures[metric] = bound * factor if kind == "min" else bound / factor
    return figures


def synthesise(targets) -> dict:
    """A results file with one row per target's ``where``, every implementation of the
    target meeting its bounds (targets on the same row share it)."""
    data: dict = {"environment": {"device": "test"}}
    for target in targets:
        rows = data.setdefault(target.op, {"rows": []})["rows"]
        row = next((r for r in rows if all(r.get(k) == v for k, v in target.where.items())), None)
        if row is None:
            row = {**target.where, "baseline_impl": "official"}
            rows.append(row)
        for name in target.implementations:
            row.setdefault(name, {}).update(meeting(target.bounds))
    return data


def _row(data, target) -> dict:
    return next(
        r for r in data[target.op]["rows"] if all(r.get(k) == v for k, v in target.where.items())
    )


def test_every_benchmark_declares_targets(acceptance):
    declared = {target.op for target in acceptance.targets()}
    benches = sorted(BENCHMARKS.glob("bench_*.py"))
    assert declared and len(benches) >= len(declared)
    for target in acceptance.targets():
        assert target.what and target.implementations and target.bounds, target
        for metric, kind, _ in target.bounds:
            assert kind in ("min", "max"), (target.what, metric)


@pytest.mark.parametrize("cpu", [False, True], ids=["gpu", "cpu"])
def test_met_when_every_bound_holds(acceptance, cpu):
    chosen = [t for t in acceptance.targets() if t.on_cpu == cpu]
    lines, ok = acceptance.check(synthesise(chosen), cpu=cpu)
    assert ok, lines
    assert sum(line.startswith("[met]") for line in lines) == len(chosen)


def test_each_broken_bound_fails_its_target(acceptance):
    """Every bound of every target, broken by 10% for all its implementations: not met."""
    for cpu in (False, True):
        chosen = [t for t in acceptance.targets() if t.on_cpu == cpu]
        good = synthesise(chosen)
        for target in chosen:
            for metric, kind, bound in target.bounds:
                data = copy.deepcopy(good)
                for name in target.implementations:
                    _row(data, target)[name][metric] = bound / 1.1 if kind == "min" else bound * 1.1
                lines, ok = acceptance.check(data, cpu=cpu)
                assert not ok and f"[NOT met] {target.what}" in lines, (target.what, metric)


def test_one_implementation_must_meet_every_bound(acceptance):
    """Two implementations each meeting only one of a target's two bounds: not met."""
    pairs = [t for t in acceptance.targets() if len(t.implementations) > 1 and len(t.bounds) > 1]
    assert pairs
    for target in pairs:
        data = synthesise([target])
        first, second = target.implementations[:2]
        (m0, k0, b0), (m1, k1, b1) = target.bounds[:2]
        _row(data, target)[first][m1] = b1 / 1.1 if k1 == "min" else b1 * 1.1
        _row(data, target)[second][m0] = b0 / 1.1 if k0 == "min" else b0 * 1.1
        lines, ok = acceptance.check(data, [target])
        assert not ok, lines


def test_a_missing_row_or_implementation_fails(acceptance):
    target = acceptance.targets()[0]
    data = synthesise([target])
    lines, ok = acceptance.check({"environment": {}}, [target])
    assert not ok and "no result at" in lines[1]
    for name in target.implementations:
        del _row(data, target)[name]
    lines, ok = acceptance.check(data, [target])
    assert not ok and "was timed" in lines[1]


def test_command_line_reads_a_file(acceptance, tmp_path, capsys):
    gpu = [t for t in acceptance.targets() if not t.on_cpu]
    path = tmp_path / "gpu-test.json"
    path.write_text(json.dumps(synthesise(gpu)))
    assert acceptance.main([str(path)]) == 0
    assert "all targets met" in capsys.readouterr().out
    data = synthesise(gpu)
    metric, kind, bound = gpu[0].bounds[0]
    for name in gpu[0].implementations:
        _row(data, gpu[0])[name][metric] = bound / 2 if kind == "min" else bound * 2
    path.write_text(json.dumps(data))
    assert acceptance.main([str(path)]) == 1
    cpu = tmp_path / "cpu.json"  # the CPU targets are read off the file of that name
    cpu.write_text(json.dumps(synthesise([t for t in acceptance.targets() if t.on_cpu])))
    assert acceptance.main([str(cpu)]) == 0
