"""Smoke tests of the store benchmarks: each runs with --quick, for real, and prints its tables.

Every benchmark starts (and stops) its own embedded store, so they run as
subprocesses, one after another (four stores of five raylets at once would
crowd a 2-core machine until raylets miss Ray's registration deadline; in
turn they take about 20-45 s each). The tests check that each finished,
printed its tables, wrote its JSON, and left no store behind; the numbers
themselves are for docs/performance-store.md, not for asserts.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.cluster

BENCHES = {
    "save": ["| 4 MiB |", "client.save, sync (blocking)", "dcp.async_save, blocking part"],
    "restore": ["| 4 MiB |", "node loss", "bitwise OK"],
    "overhead": ["| lazy |", "| sync |", "blocked in save + wait_staged"],
    "delta": ["with deltas", "fraction of full", "bitwise OK"],
    "peers": [
        "| snapstore client.save, sync |",
        "| lm-resiliency GEMINI",
        "| DLRover 0.6.1 Flash Checkpoint",
        "| torchft 0.2.0",
    ],
    # --quick flushes to a URL only (test_persist_cluster covers directories).
    "persist": ["to a file:// URL |", "every piece checked, file:// URL"],
    "scale": ["| 16 x 8 | 4 |", "coordinator CPU per step by cause", "a group loses m = 2"],
    "chaos": [
        "faults by kind",
        "| faults injected | 4 |",
        "| false detections (dead or lost, nothing killed) | 0 |",
        "| final state bitwise equal to the reference | yes |",
    ],
}
STORELESS = {"scale"}
"""Benchmarks that start no store (bench.scale --quick simulates its nodes)."""
TIMEOUT = 240.0
"""Seconds one benchmark may take."""
TIMEOUTS = {"peers": 480.0, "chaos": 480.0}
"""bench.peers starts every peer's launchers, and may first build their environments."""
PEERS = ("snapstore", "gemini", "dlrover", "torchft")


def _scratch_glob() -> str:
    from snapstore.bench._common import disk_dir

    return os.path.join(disk_dir(), "bench-persist-*")


@pytest.fixture(scope="module")
def runs(
    reference_cache: str, request: pytest.FixtureRequest
) -> Iterator[dict[str, dict[str, Any]]]:
    """Run every benchmark with --quick, one at a time; collect output, exit code, JSON."""
    from snapstore.bench.reference import CACHE_ENV

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    before = set(glob.glob("/tmp/ssb-*"))
    scratch_before = set(glob.glob(_scratch_glob()))
    out_dir = tempfile.mkdtemp(prefix="bench-quick-")
    # bench.chaos shares its fault-free reference with test_demo (the same training).
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{CACHE_ENV: reference_cache})
    results: dict[str, dict[str, Any]] = {}
    for name in BENCHES:
        path = os.path.join(out_dir, f"{name}.json")
        cmd = [sys.executable, "-m", f"bench.{name}", "--quick", "--json", path]
        started = time.monotonic()
        with open(os.path.join(out_dir, f"{name}.log"), "w+") as log:
            proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=TIMEOUTS.get(name, TIMEOUT))
            except subprocess.TimeoutExpired:
                proc.terminate()  # the benchmark's finally stops its store
                try:
                    rc = proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
            log.seek(0)
            output = log.read()
        data = None
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
        results[name] = {
            "rc": rc,
            "output": output,
            "json": data,
            "seconds": time.monotonic() - started,
        }
    results["_dirs_before"] = {"dirs": before, "scratch": scratch_before}
    # What each benchmark costs the suite, on the terminal (CI time is budgeted).
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        took = ", ".join(f"{n} {results[n]['seconds']:.0f} s" for n in BENCHES)
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nbench --quick runs: {took}")
    yield results
    shutil.rmtree(out_dir, ignore_errors=True)


@pytest.mark.parametrize("name", list(BENCHES))
def test_quick_run_completes_and_prints_tables(runs: dict[str, Any], name: str) -> None:
    r = runs[name]
    assert r["rc"] == 0, f"bench.{name} exited {r['rc']}:\n{r['output'][-4000:]}"
    for text in BENCHES[name]:
        assert text in r["output"], f"bench.{name} did not print {text!r}:\n{r['output']}"
    assert "| --- |" in r["output"]
    assert r["json"] is not None
    assert r["json"]["info"]["bench"] in (f"bench.{name}", f"snapstore.bench.{name}")


@pytest.mark.parametrize("system", PEERS)
def test_peers_measures_each_system(runs: dict[str, Any], system: str) -> None:
    """Every system of bench.peers ran its saves and both restores, bitwise right; a peer
    whose environment could not be built (no registry reachable) is skipped, saying so."""
    data = runs["peers"]["json"]
    assert data is not None, runs["peers"]["output"][-4000:]
    res = data["results"].get(system)
    assert res is not None, f"bench.peers did not run {system}"
    if "could not be built" in res.get("error", ""):
        pytest.skip(f"{system}: {res['error']}")
    assert "error" not in res, f"{system} failed: {res['error']}"
    assert res["crash"].get("same_as_loss") or res["crash"]["ok"], res["crash"]
    assert res["loss"]["ok"], res["loss"]
    assert res["memory"]["bytes"] > 0 and res["memory"]["state"] > 0, res["memory"]
    assert res["corruption"]["outcome"], res["corruption"]


def test_scale_saves_and_reprotects(runs: dict[str, Any]) -> None:
    """bench.scale's simulated stores commit every measured step (with and without the
    coordinator's CPU charged), their commits take a bounded number of message delays,
    and the 16-node store is protected again after each loss."""
    data = runs["scale"]["json"]
    assert data is not None, runs["scale"]["output"][-4000:]
    sizes = {r["shape"]["nodes"]: r for r in data["sim"]}
    assert set(sizes) == {4, 16}
    for n, r in sizes.items():
        assert r["failed_steps"] == 0 and r["steps_measured"] == 2, (n, r)
        assert len(r["step_cpu"]) == 2 and min(r["step_cpu"]) > 0, (n, r["step_cpu"])
        delays = sorted(r["beyond_free"])[len(r["beyond_free"]) // 2] / 0.0005
        assert 4 <= delays <= 40, f"{n} nodes: a commit took {delays:.1f} message delays"
    assert [loss["ok"] for loss in sizes[16]["losses"]] == [True, True], sizes[16]["losses"]
    assert [loss["ok"] for loss in sizes[4]["losses"]] == [False, False]


def test_no_store_left_behind(runs: dict[str, Any]) -> None:
    """Each benchmark stops its store: its runtime dir is gone and none of its processes run."""
    import psutil

    before = runs["_dirs_before"]["dirs"]
    assert all("store up in" in runs[name]["output"] for name in BENCHES if name not in STORELESS)
    new_dirs = set(glob.glob("/tmp/ssb-*")) - before
    assert not new_dirs, f"benchmark runtime dirs left behind: {sorted(new_dirs)}"
    scratch = set(glob.glob(_scratch_glob())) - runs["_dirs_before"]["scratch"]
    assert not scratch, f"snapstore.bench.persist left its files behind: {sorted(scratch)}"
    leftovers = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        for arg in p.info["cmdline"] or ():
            m = re.search(r"/tmp/ssb-[A-Za-z0-9_]+", arg)
            if m and m.group(0) not in before:
                leftovers.append(p.info["pid"])
                break
    assert not leftovers, f"processes of a benchmark store still running: {leftovers}"
