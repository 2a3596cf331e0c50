"""The Hugging Face Trainer example: a GPT-2 trainer SIGKILLed mid-save resumes bitwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import running_store

pytestmark = pytest.mark.cluster

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "docs", "examples", "hf_trainer.py")


def test_hf_trainer_example_resumes_bitwise_after_its_trainer_is_killed() -> None:
    pytest.importorskip("transformers", reason="transformers is not installed")
    steps, kill_at = 12, 5
    with running_store(nodes=2, k=1, m=1, memory_per_node="64MiB") as store:
        done = subprocess.run(
            [
                *(sys.executable, EXAMPLE, "--runtime-dir", store.rundir, "--json"),
                *("--steps", str(steps), "--kill-at", str(kill_at)),
            ],
            capture_output=True,
            text=True,
            timeout=540,
        )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    clean, resumed = results["clean"], results["resumed"]
    assert clean["resumed_from"] is None and clean["global_step"] == steps
    # Killed right after starting to save step kill_at: that step or the one before committed.
    assert resumed["resumed_from"] in (kill_at - 1, kill_at), resumed
    assert resumed["global_step"] == steps
    assert clean["failed_steps"] == [] and resumed["failed_steps"] == []
    assert resumed["digest"] == clean["digest"]
