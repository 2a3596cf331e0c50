"""Smoke tests of the store benchmarks: each runs with --quick, for real, and prints its tables.

Every benchmark starts (and stops) its own embedded store, so they run as
subprocesses, one after another, each when a test first asks for it (four
stores of five raylets at once would crowd a 2-core machine until raylets
miss Ray's registration deadline; in turn they take about 20-140 s each).
Only bench.scale (no store, seconds) runs by default; the rest are the slow
tier, ``scripts/test.sh --all``. The tests check that each finished,
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
IN_CI = {"scale"}
"""Run by default; the others are in the slow tier (``scripts/test.sh --all``): each
starts its own store and they take 5-8 minutes together on 2 cores."""
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


class Runs:
    """Each benchmark's --quick run, started the first time a test asks for it (so that a
    selection runs only the benchmarks it needs), one at a time."""

    def __init__(self, reference_cache: str, out_dir: str) -> None:
        from snapstore.bench.reference import CACHE_ENV

        self.root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.out_dir = out_dir
        # bench.chaos shares its fault-free reference with test_demo (the same training).
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **{CACHE_ENV: reference_cache})
        self.dirs_before = set(glob.glob("/tmp/ssb-*"))
        self.scratch_before = set(glob.glob(_scratch_glob()))
        self.done: dict[str, dict[str, Any]] = {}

    def __getitem__(self, name: str) -> dict[str, Any]:
        if name not in self.done:
            self.done[name] = self._run(name)
        return self.done[name]

    def _run(self, name: str) -> dict[str, Any]:
        path = os.path.join(self.out_dir, f"{name}.json")
        cmd = [sys.executable, "-m", f"bench.{name}", "--quick", "--json", path]
        started = time.monotonic()
        with open(os.path.join(self.out_dir, f"{name}.log"), "w+") as log:
            proc = subprocess.Popen(
                cmd, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
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
        return {"rc": rc, "output": output, "json": data, "seconds": time.monotonic() - started}


@pytest.fixture(scope="module")
def runs(reference_cache: str, request: pytest.FixtureRequest) -> Iterator[Runs]:
    out_dir = tempfile.mkdtemp(prefix="bench-quick-")
    runs = Runs(reference_cache, out_dir)
    yield runs
    # What each benchmark cost the suite, on the terminal (CI time is budgeted).
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None and runs.done:
        took = ", ".join(f"{n} {r['seconds']:.0f} s" for n, r in runs.done.items())
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nbench --quick runs: {took}")
    shutil.rmtree(out_dir, ignore_errors=True)


@pytest.mark.parametrize(
    "name", [n if n in IN_CI else pytest.param(n, marks=pytest.mark.slow) for n in BENCHES]
)
def test_quick_run_completes_and_prints_tables(runs: Runs, name: str) -> None:
    r = runs[name]
    assert r["rc"] == 0, f"bench.{name} exited {r['rc']}:\n{r['output'][-4000:]}"
    for text in BENCHES[name]:
        assert text in r["output"], f"bench.{name} did not print {text!r}:\n{r['output']}"
    assert "| --- |" in r["output"]
    assert r["json"] is not None
    assert r["json"]["info"]["bench"] in (f"bench.{name}", f"snapstore.bench.{name}")


@pytest.mark.slow
@pytest.mark.parametrize("system", PEERS)
def test_peers_measures_each_system(runs: Runs, system: str) -> None:
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


def test_scale_saves_and_reprotects(runs: Runs) -> None:
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


@pytest.mark.slow
def test_no_store_left_behind(runs: Runs) -> None:
    """Each benchmark stops its store: its runtime dir is gone and none of its processes run."""
    import psutil

    for name in BENCHES:
        runs[name]  # every benchmark has run (a selection may have skipped some)
    before = runs.dirs_before
    assert all("store up in" in runs[name]["output"] for name in BENCHES if name not in STORELESS)
    new_dirs = set(glob.glob("/tmp/ssb-*")) - before
    assert not new_dirs, f"benchmark runtime dirs left behind: {sorted(new_dirs)}"
    scratch = set(glob.glob(_scratch_glob())) - runs.scratch_before
    assert not scratch, f"snapstore.bench.persist left its files behind: {sorted(scratch)}"
    leftovers = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        for arg in p.info["cmdline"] or ():
            m = re.search(r"/tmp/ssb-[A-Za-z0-9_]+", arg)
            if m and m.group(0) not in before:
                leftovers.append(p.info["pid"])
                break
    assert not leftovers, f"processes of a benchmark store still running: {leftovers}"
