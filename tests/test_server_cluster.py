"""The REST server over real HTTP against a real 3-node store (k=2, m=1), and its dashboard.

One store serves the module: started by ``snapstore.up`` with the server and
an explicit token on 127.0.0.1 (so the token is required there); a second
server process without a token shows that loopback needs none. Tests run in
order; killing a node comes last. The dashboard is loaded in headless
Chromium (Debian's ``chromium``, installed here when missing), driven by
Playwright, so the test watches the live page turn degraded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import running_store, wait_for

pytestmark = pytest.mark.cluster

JOB = "web1"
WORLD = 3
TOKEN = "tok-" + os.urandom(8).hex()
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def store() -> Iterator[Any]:
    # reprotect_delay: the killed node's stripes stay degraded for the checks,
    # rather than being relocated onto the two survivors at once.
    with running_store(
        nodes=3,
        k=2,
        m=1,
        memory_per_node="64MiB",
        rest=True,
        rest_token=TOKEN,
        reprotect_delay=30.0,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def api(store: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=store.state["server"]["url"], headers=AUTH, timeout=5.0) as c:
        yield c


@pytest.fixture(scope="module")
def job(store: Any, api: httpx.Client) -> dict[str, Any]:
    """A job of one rank per node that saved steps 1 and 2, as the server shows it."""
    import ray

    from snapstore.bench.workers import rank_actor
    from snapstore.ops import faults

    nodes = faults.store_nodes(store)
    ranks = [rank_actor(nodes[r]).remote(JOB, r, WORLD, store.rundir, 256 << 10) for r in range(3)]
    for step in (1, 2):
        ray.get([r.save.remote(step) for r in ranks], timeout=120)
    wait_for(
        lambda: [j["latest_step"] for j in api.get("/v1/jobs").json()["jobs"]] == [2],
        10,
        "the server to show step 2",
    )
    # Node usage travels in the members' heartbeats, relayed by their group leaders.
    wait_for(
        lambda: all(
            n["data_bytes"] > 0 and n["parity_bytes"] > 0
            for n in api.get("/v1/nodes").json()["nodes"]
        ),
        10,
        "the nodes' usage to reach the server",
    )
    return {"nodes": nodes, "ranks": ranks}


def test_ready_file_and_token_required(store: Any) -> None:
    info = store.state["server"]
    assert info["host"] == "127.0.0.1" and info["port"] > 0
    assert info["url"] == f"http://127.0.0.1:{info['port']}"
    assert info["token"] == TOKEN and info["token_generated"] is False
    for path in ("/healthz", "/v1/nodes", "/v1/jobs", "/v1/events", "/metrics"):
        r = httpx.get(info["url"] + path, timeout=5)
        assert r.status_code == 401, path
        assert "bearer token" in r.json()["detail"]
        bad = httpx.get(info["url"] + path, headers={"Authorization": "Bearer x"}, timeout=5)
        assert bad.status_code == 401
    assert httpx.get(info["url"] + "/", timeout=5).status_code == 200


def test_every_endpoint(store: Any, api: httpx.Client, job: dict[str, Any]) -> None:
    h = api.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert h.json()["smps"]["alive"] == 3 and h.json()["jobs"]["protected"] == 1

    body = api.get("/v1/nodes").json()
    assert body["store_id"] == store.store_id and not body["stale"]
    assert body["snapshot_age"] < 2
    assert {n["node_id"] for n in body["nodes"]} == set(job["nodes"])
    for n in body["nodes"]:
        assert n["alive"] and n["address"] == "127.0.0.1" and n["heartbeat_age"] < 1
        assert n["budget_bytes"] == 64 << 20 and 0 < n["used_bytes"] <= n["budget_bytes"]
        assert n["data_bytes"] > 0 and n["parity_bytes"] > 0 and n["group"] == 0

    (j,) = api.get("/v1/jobs").json()["jobs"]
    assert j["job"] == JOB and j["world_size"] == WORLD and j["latest_step"] == 2
    assert j["status"] == "protected" and j["redundancy"]["status"] == "healthy"
    assert j["redundancy"]["can_lose"] == 1

    snaps = api.get(f"/v1/jobs/{JOB}/snapshots").json()["snapshots"]
    assert [(s["step"], s["state"]) for s in snaps] == [(2, "committed")]
    d = api.get(f"/v1/jobs/{JOB}/snapshots/latest").json()
    assert d == api.get(f"/v1/jobs/{JOB}/snapshots/2").json() | {
        k: d[k] for k in ("snapshot_age", "snapshot_time")
    }
    assert d["k"] == 2 and d["m"] == 1 and d["data_bytes"] > 3 * (256 << 10)
    assert {r["node"] for r in d["ranks"]} == set(job["nodes"])
    assert all(r["restore_from"]["kind"] == "home" for r in d["ranks"])
    assert len(d["stripes"]) == 3 and {s["status"] for s in d["stripes"]} == {"healthy"}

    evs = api.get("/v1/events", params={"kind": "commit"}).json()["events"]
    assert [e["step"] for e in evs if e["job"] == JOB] == [1, 2]
    assert len(api.get("/v1/events", params={"limit": 1}).json()["events"]) == 1

    m = api.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    assert "snapstore_saves_total 2.0" in m.text
    assert f'snapstore_job_latest_step{{job="{JOB}"}} 2.0' in m.text
    assert "snapstore_commit_seconds_count 2.0" in m.text
    assert "snapstore_save_waits_total" in m.text
    for n in job["nodes"]:
        assert f'snapstore_node_heartbeat_age_seconds{{node="{n}"}}' in m.text


def test_404_and_422_over_http(api: httpx.Client, job: dict[str, Any]) -> None:
    for path in ("/v1/jobs/nojob/snapshots", "/v1/jobs/nojob/snapshots/latest"):
        r = api.get(path)
        assert r.status_code == 404 and "no job 'nojob'" in r.json()["detail"]
    old = api.get(f"/v1/jobs/{JOB}/snapshots/1")
    assert old.status_code == 404
    assert "only the latest committed step (2) and steps in progress" in old.json()["detail"]
    assert api.get(f"/v1/jobs/{JOB}/snapshots/3").status_code == 404
    for path in (f"/v1/jobs/{JOB}/snapshots/two", "/v1/events?limit=-3", "/v1/events?kind=%20"):
        assert api.get(path).status_code == 422, path


def test_status_command(store: Any, job: dict[str, Any], capsys: Any) -> None:
    from snapstore.cli import main

    assert main(["--runtime-dir", store.rundir, "status", "--events", "5"]) == 0
    out = capsys.readouterr().out
    assert store.store_id in out and store.state["server"]["url"] in out
    assert all(n[:12] in out for n in job["nodes"])
    line = next(ln for ln in out.splitlines() if ln.startswith(JOB))
    assert "protected" in line and " 2 " in line and "3/0/0" in line
    assert "recent events:" in out and "commit" in out

    assert main(["--runtime-dir", store.rundir, "status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rest_url"] == store.state["server"]["url"] and data["rest_token_required"]
    assert TOKEN not in json.dumps(data)
    (j,) = data["jobs"]
    assert j["latest_step"] == 2 and j["snapshot"]["redundancy"]["status"] == "healthy"
    assert len(data["nodes"]) == 3


# -- a second server without a token, and schemathesis over real HTTP ------------------


@pytest.fixture(scope="module")
def open_server(store: Any) -> Iterator[str]:
    """``python -m snapstore.server`` on 127.0.0.1, port 0, no token, as ``up`` runs it."""
    ready = os.path.join(store.rundir, "test-open.ready")
    env = {k: v for k, v in os.environ.items() if k != "SNAPSTORE_REST_TOKEN"}
    cmd = [sys.executable, "-m", "snapstore.server", "--runtime-dir", store.rundir]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--ready-file", ready]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        info = wait_for(lambda: _read_json(ready) or proc.poll() is not None, 60, "ready file")
        if not isinstance(info, dict):
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            pytest.fail(f"server exited: {err}")
        assert info["token"] is None and info["token_generated"] is False
        yield str(info["url"])
    finally:
        proc.terminate()
        proc.wait(15)
    assert not os.path.exists(ready), "the server removes its ready file when it stops"


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def test_loopback_without_token_is_open(open_server: str, job: dict[str, Any]) -> None:
    r = httpx.get(open_server + "/v1/jobs", timeout=5)
    assert r.status_code == 200 and r.json()["jobs"][0]["job"] == JOB
    assert httpx.get(open_server + "/healthz", timeout=5).json()["status"] == "ok"


def test_schema_conformance_over_http(open_server: str, job: dict[str, Any]) -> None:
    """schemathesis over real HTTP, a few positive and negative cases per operation.

    (Driven by hand: schemathesis' pytest fixture loader does not run under pytest 9.)
    """
    from hypothesis import given
    from schemathesis import GenerationMode
    from schemathesis.core.result import Err

    schema = schemathesis.openapi.from_url(open_server + "/openapi.json")
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            pytest.fail(f"schemathesis cannot use an operation of the schema: {result.err()}")
        op = result.ok()
        modes = [GenerationMode.POSITIVE]
        if op.path_parameters or op.query:
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(
                max_examples=6,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Any) -> None:
                case.call_and_validate(timeout=10)

            run()


# -- dashboard in headless Chromium, and a node killed under it ------------------------


def _chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is missing and cannot be installed here (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "chromium"], env=env, capture_output=True)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        r = subprocess.run(["apt-get", "install", "-y", "chromium"], env=env, capture_output=True)
    found = shutil.which("chromium")
    if not found:
        pytest.skip(f"installing Debian's chromium failed: {r.stderr.decode()[-500:]}")
    return found


_PAGE_STATE = """JSON.stringify({
  ready: document.body ? document.body.dataset.ready : null,
  polls: document.body ? Number(document.body.dataset.polls || 0) : 0,
  health: document.getElementById('grid') ? document.getElementById('grid').dataset.health : null,
  nodes: [...document.querySelectorAll('#grid tbody tr')].map(
    r => [r.dataset.node, r.dataset.nodeStatus]),
  cells: [...document.querySelectorAll('#grid td.cell[data-node]')].map(
    c => [c.dataset.node, c.dataset.status]),
  jobs: [...document.querySelectorAll('#jobs tbody tr')].map(
    r => [r.dataset.job, r.dataset.status, r.querySelector('[data-latest]').dataset.latest]),
  events: document.querySelectorAll('#events li').length,
  error: document.getElementById('error').textContent,
})"""


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    """A headless Chromium page, driven by Playwright (Debian's chromium: no browser download)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    exe = _chromium()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=exe, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            yield browser.new_page()
        finally:
            browser.close()


def _state(page: Any) -> dict[str, Any]:
    return dict(json.loads(page.evaluate(_PAGE_STATE)))


def test_dashboard_then_a_killed_node_turns_it_degraded(
    store: Any, api: httpx.Client, job: dict[str, Any], page: Any
) -> None:
    from playwright.sync_api import expect

    from snapstore.ops import faults

    nodes = job["nodes"]
    page.goto(store.state["server"]["url"] + "/#token=" + TOKEN)
    expect(page.locator("body")).to_have_attribute("data-ready", "1", timeout=20_000)
    state = _state(page)
    assert not state["error"], state["error"]
    assert {n for n, _ in state["nodes"]} == set(nodes)
    assert {s for _, s in state["nodes"]} == {"alive"}
    assert state["jobs"] == [[JOB, "protected", "2"]]
    assert state["health"] == "healthy" and state["events"] > 0
    assert {s for _, s in state["cells"]} == {"healthy"}

    dead = nodes[2]
    killed_at = faults.kill_node(dead, store)["killed_at"]

    def api_says_degraded() -> bool:
        ns = {n["node_id"]: n for n in api.get("/v1/nodes").json()["nodes"]}
        d = api.get(f"/v1/jobs/{JOB}/snapshots/latest").json()
        return (
            not ns[dead]["alive"]
            and ns[dead]["status"] in ("dead", "lost")
            and d["redundancy"]["status"] == "degraded"
            and d["redundancy"]["can_lose"] == 0
            and any(r["restore_from"]["kind"] == "rebuild" for r in d["ranks"])
        )

    wait_for(api_says_degraded, 10, "the API to report the killed node")
    seen = time.time() - killed_at
    assert seen < 3.0, f"the API reported the loss {seen:.2f} s after the kill"
    (j,) = api.get("/v1/jobs").json()["jobs"]
    assert j["status"] == "degraded" and j["redundancy"]["degraded"] == 3
    assert api.get("/healthz").json()["status"] == "degraded"
    silent = [e for e in api.get("/v1/events?kind=node_dead").json()["events"]]
    assert silent and silent[-1]["node"] == dead and silent[-1]["detection_latency"] > 0

    # The node is suspect (silent) before Ray reports it dead; the page may show either
    # moment first, then settles.
    expect(page.locator("#grid")).to_have_attribute("data-health", "degraded", timeout=10_000)
    row = page.locator(f'#grid tbody tr[data-node="{dead}"]')
    expect(row).to_have_attribute("data-node-status", re.compile("^(dead|lost)$"), timeout=10_000)
    state = _state(page)
    assert {s for n, s in state["cells"] if n == dead} == {"down"}
    assert {s for n, s in state["cells"] if n != dead} == {"degraded"}
    assert state["jobs"][0][1] == "degraded"
