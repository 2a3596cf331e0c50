"""Another user on the store's machine (uid 65534) against a live store started like `up`.

One embedded store (head + 2 worker raylets, REST on, every committed step
flushed to the default persist directory under the runtime directory),
created in a runtime directory that did not exist before, under a parent
other users can traverse (as ``/tmp`` is). The attacker runs as uid 65534
(see :mod:`tests.security.attacker`) and tries what the security review
did: attach to Ray, read the state file, the tokens and the persisted
files, reach Ray's sockets, read the SMPs' data servers; and a web page's
DNS rebinding against the REST server.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import job_status, running_store, smp_infos, wait_for
from tests.security.attacker import as_nobody, require_attacker

pytestmark = pytest.mark.cluster

JOB = "secret-job"


@pytest.fixture(scope="module")
def store() -> Iterator[Any]:
    require_attacker()
    base = tempfile.mkdtemp(prefix="ss-sec-", dir="/tmp")
    os.chmod(base, 0o755)  # like /tmp: any user may look up names in it
    try:
        with running_store(
            rundir=os.path.join(base, "rt"),
            nodes=2,
            k=1,
            m=1,
            memory_per_node="64MiB",
            rest=True,
            persist_every=1,
        ) as s:
            from snapstore.clients import Client

            node = s.nodes()[0]["node_id"]
            client = Client(JOB, 0, 1, store=s, node_id=node, timeout=60)
            client.save(1, {"w": torch.arange(4096, dtype=torch.float32)}).result(60)
            client.close()
            root = s.config.persist_dir
            wait_for(
                lambda: os.path.exists(os.path.join(root, JOB, "step-1", "rank-0.bin")),
                60,
                "step 1 persisted",
            )
            yield s
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _probe_paths(paths: dict[str, str]) -> dict[str, str]:
    """As uid 65534: try to list or read each path; return what happened to each."""
    out = as_nobody(
        f"""
        import json, os
        result = {{}}
        for name, path in {paths!r}.items():
            try:
                if os.path.isdir(path):
                    os.listdir(path)
                else:
                    with open(path, "rb") as f:
                        f.read(16)
                result[name] = "READ"
            except OSError as e:
                result[name] = type(e).__name__
        print(json.dumps(result))
        """
    )
    return dict(json.loads(out.strip().splitlines()[-1]))


def test_runtime_directory_and_secrets_are_private(store: Any) -> None:
    # Finding 3: the runtime directory was 0755 (created as a parent of the persist
    # directory), so its files were reachable; now 0700 and its secrets 0600.
    rundir = store.rundir
    assert _mode(rundir) == 0o700 and os.lstat(rundir).st_uid == os.geteuid()
    assert _mode(store.path) == 0o600
    assert store.ray_token_file and _mode(store.ray_token_file) == 0o600
    seen = _probe_paths(
        {
            "runtime dir": rundir,
            "state file": store.path,
            "ray token": store.ray_token_file,
            "ray temp dir": store.state["temp_dir"],
            "ray session": os.path.join(store.state["temp_dir"], "session_latest"),
        }
    )
    assert seen == dict.fromkeys(seen, "PermissionError"), seen


def test_attacker_cannot_attach_to_the_ray_cluster(store: Any) -> None:
    # Finding 1: Ray ran without authentication; anyone local could talk to the GCS
    # (read its KV, list and kill actors), attach, run code as the owner and call SMP
    # methods (destroy, drop_job, commit). Ray's token authentication now.
    code = f"""
        import ray
        from ray._raylet import GcsClient

        def auth(e):
            text = repr(e) + repr(e.__cause__)
            return "InvalidAuthToken" in text or "Unauthenticated" in text

        try:
            c = GcsClient(address={store.address!r})
            print(f"GCS-OPEN {{len(c.internal_kv_keys(b'', None))}} keys", flush=True)
        except Exception as e:
            print(f"GCS-REFUSED {{auth(e)}}", flush=True)
        try:
            ray.init(address={store.address!r}, namespace={store.namespace!r},
                     logging_level="ERROR", log_to_driver=False)
            print("DRIVER-ATTACHED")
        except Exception as e:
            print(f"DRIVER-REFUSED {{auth(e)}}")
        """
    # One GCS connection attempt, not Ray's default 20, and no event log files (the
    # attacker cannot write Ray's log directory): the attacker's own choices.
    quick = {"RAY_gcs_server_port_wait_time_s": "1", "RAY_event_log_reporter_enabled": "0"}
    no_token = as_nobody(code, env=quick)
    guessed = as_nobody(code, env={**quick, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64})
    for out in (no_token, guessed):
        assert out.strip().splitlines()[-2:] == ["GCS-REFUSED True", "DRIVER-REFUSED True"], out


def test_attacker_cannot_read_the_data_servers(store: Any) -> None:
    # Finding 6: the SMPs' data servers accept connections from anyone; without the
    # store's token they answer nothing but a refusal (the token never crosses the wire).
    import ray

    from snapstore.control.messages import NodeInfo
    from snapstore.format.wire import decode
    from snapstore.node.store import smp_name

    store.connect_ray()
    peers = [
        decode(
            ray.get(
                ray.get_actor(smp_name(n["node_id"]), namespace=store.namespace).info.remote(),
                timeout=30,
            ),
            NodeInfo,
        ).peer.to_dict()
        for n in store.nodes()
    ]
    assert len(peers) == 2
    out = as_nobody(
        f"""
        import numpy as np
        from snapstore.node.transport import PeerInfo, Transport, host_key
        from snapstore.node.segments import data_name
        t = Transport(host_key(), "guessed-token", force_tcp=True)
        for p in {peers!r}:
            try:
                t.read_into(PeerInfo.from_dict(p), data_name({JOB!r}, 0, 1), 0,
                            np.empty(16, dtype=np.uint8))
                print("READ")
            except Exception as e:
                print("REFUSED", "bad token" in str(e))
        """
    )
    assert out.strip().splitlines() == ["REFUSED True"] * len(peers), out


def test_attacker_cannot_drive_the_smps_control_channels(store: Any) -> None:
    # The control channels (snapstore.node.channel) take the coordinator's and leaders'
    # orders, drop_job among them. Without the store's token a connection is refused
    # before any call reaches an SMP, and the job is still there after the attempts.

    peers = [(info.node, info.peer.address, info.peer.control_port) for info in smp_infos(store)]
    assert len(peers) == 2 and all(port for _, _, port in peers), peers
    out = as_nobody(
        f"""
        import asyncio
        from snapstore.node.channel import Channels, ChannelUnreachable
        async def main():
            for node, address, port in {peers!r}:
                try:
                    await Channels("guessed-token").call(node, address, port, "drop_job", {JOB!r})
                    print("CALLED")
                except ChannelUnreachable as e:
                    print("REFUSED", "another store's token" in str(e))
        asyncio.run(main())
        """
    )
    assert out.strip().splitlines() == ["REFUSED True"] * len(peers), out
    assert job_status(store, JOB)["latest_step"] == 1


def test_attacker_cannot_read_persisted_steps(store: Any) -> None:
    # Finding 7: persisted files were 0644 in umask-made directories.
    root = store.config.persist_dir
    step = os.path.join(root, JOB, "step-1")
    assert _mode(os.path.join(root, JOB)) == 0o700 and _mode(step) == 0o700
    assert {_mode(os.path.join(step, f)) for f in os.listdir(step)} == {0o600}
    seen = _probe_paths(
        {"rank file": os.path.join(step, "rank-0.bin"), "step dir": step, "root": root}
    )
    assert seen == dict.fromkeys(seen, "PermissionError"), seen


def test_rest_server_answers_only_its_own_host(store: Any) -> None:
    # Finding 8: a page whose name resolves to 127.0.0.1 (DNS rebinding) could read it.
    url = store.state["server"]["url"]
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    port = store.state["server"]["port"]
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io"):
        r = httpx.get(f"{url}/v1/jobs", headers={"Host": host}, timeout=10)
        assert r.status_code == 400, (host, r.status_code)
    assert httpx.get(f"{url}/v1/jobs", headers={"Host": f"localhost:{port}"}).status_code == 200
