"""`python -m bench.failures --quick`: the failure-injection benchmark runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster


def test_failure_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.failures", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "failures.json").read_text())
    kinds = {r["kind"] for r in results["runs"]}
    assert kinds == {"node", "corrupt"}
    for r in results["runs"]:
        assert r["equal_to_reference"], r
        assert r["restore_seconds"] is not None and r["detect_seconds"] is not None
    node = next(r for r in results["runs"] if r["kind"] == "node")
    assert node["bytes_rebuilt"] > 0
    (base,) = results["baselines"]
    assert base["kind"] == "torch" and base["every"] >= 1 and base["stall_median"] > 0
    assert "| node |" in (out / "failures.md").read_text()
    assert (out / "failures.png").stat().st_size > 5_000
