"""Every op's kernel tests put their data where the kernels run: on a GPU machine the GPU.

The audit reruns each op's kernel tests (``-k "triton or cuda"``) with the test device set to
a stand-in, "meta" (``STITCHOPS_TEST_DEVICE``): ``harness.require_backend`` records the
device of the tensor each test probes the backend with, then skips. A test that builds its
data on the CPU, whatever the machine, records "cpu" (or fails mixing devices) and this test
names it: on a GPU machine it would skip its kernels or test them on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from op_tables import ops

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_tests_put_their_tensors_on_the_harness_device(tmp_path):
    records, junit = tmp_path / "audit.jsonl", tmp_path / "junit.xml"
    files = sorted({f"tests/{op.test_file}" for op in ops()})
    env = {**os.environ, "STITCHOPS_TEST_DEVICE": "meta", "STITCHOPS_TEST_AUDIT": str(records)}
    result = subprocess.run(
        [
            sys.executable,
            *"-m pytest -q -p no:cacheprovider -k".split(),
            "triton or cuda",
            f"--junitxml={junit}",
            *files,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    broken = [
        f"{c.get('classname')}::{c.get('name')}"
        for c in ElementTree.parse(junit).iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    assert not broken, (
        f"kernel tests that mix devices under the audit: {broken}\n" + (result.stdout[-3000:])
    )
    seen = [json.loads(line) for line in records.read_text().splitlines()]
    off_device = sorted({r["test"] for r in seen if r["devices"] != ["meta"]})
    assert not off_device, f"kernel tests probing the backend on the CPU: {off_device}"
    for file in files:
        for backend in ("triton", "cuda"):
            count = sum(r["backend"] == backend and r["test"].startswith(file) for r in seen)
            assert count, f"{file}: no {backend} test reached require_backend"
