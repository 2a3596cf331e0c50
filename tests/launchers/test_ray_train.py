"""The Ray Train helper: a 2-worker job crashes, restarts, restores, and ends bitwise equal."""

from __future__ import annotations

import importlib.util
import os

import pytest

from tests.conftest import running_store

pytestmark = pytest.mark.cluster

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "docs", "examples", "ray_train_example.py")


def test_ray_train_example_resumes_bitwise_after_a_worker_crash() -> None:
    pytest.importorskip("ray.train.torch", reason="ray[train] is not installed")
    spec = importlib.util.spec_from_file_location("ray_train_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with running_store(nodes=4, k=3, m=1, memory_per_node="64MiB") as store:
        clean, crashed = example.main(store.rundir, steps=8, fail_at=3)
    assert clean["start"] == 0
    assert crashed["start"] > 0, "the crashed run must have resumed from a snapshot"
    assert clean["digest"] == crashed["digest"]
