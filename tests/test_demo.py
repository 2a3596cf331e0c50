"""The README's first command: `snapstore demo`, run for real (fewer steps), end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster


def test_demo_trains_through_failures_and_ends_bitwise_equal(
    tmp_path: Path, reference_cache: str
) -> None:
    from snapstore.bench.chaos import quick_faults, steps_for
    from snapstore.bench.reference import CACHE_ENV

    # As many steps on 4 ranks as bench.chaos --quick (test_bench_quick): the same
    # reference, which whichever runs first in the session leaves for the other.
    steps = steps_for(quick_faults())
    failures = f"trainer@{steps // 4},smp@{steps // 2},node@{3 * steps // 4}"
    env = dict(os.environ, **{CACHE_ENV: reference_cache})
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snapstore.cli",
            "demo",
            "--steps",
            str(steps),
            "--failures",
            failures,
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bitwise equal" in proc.stdout
    # Only the demo's own report: Ray's messages about the workers and the node
    # it killed go to the log it names, and nothing warns.
    assert proc.stderr.strip() == "", proc.stderr[-3000:]
    for noise in ("(raylet)", "A worker died", "Warning", "warnings.warn", "Traceback"):
        assert noise not in proc.stdout, proc.stdout[-3000:]
    messages = out / "cluster-messages.log"
    assert str(messages) in proc.stdout and messages.exists()
    report = json.loads((out / "demo-report.json").read_text())
    assert report["bitwise_equal"] is True
    kinds = [f["kind"] for f in report["run"]["failures"]]
    assert kinds == ["trainer", "smp", "node"]
    for f in report["run"]["failures"]:
        # A survivor blocked in the old group's all-reduce would wait for
        # gloo's 60 s timeout; it is replaced instead (bench.training._recover).
        assert f["downtime_seconds"] < 45, f
    node = report["run"]["failures"][2]
    assert node["bytes_rebuilt"] > 0 and node["resumed_step"] is not None
    assert (out / "demo-report.png").stat().st_size > 10_000
    # Nothing left running: the demo's private store is gone.
    assert not any(
        p.name.startswith("ss-demo-") for p in Path("/tmp").iterdir() if (p / "store.json").exists()
    )
