"""Finding 1, attached clusters: ``up --address`` on a Ray cluster without token
authentication refuses (or, when told to, attaches and warns), because anyone who
reaches such a cluster's ports can drive the store and read every snapshot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import Any

import pytest

import snapstore
from snapstore.errors import ClusterError, ConfigError
from snapstore.ops.cluster import kill_tree, start_head

pytestmark = pytest.mark.cluster


def test_up_refuses_an_unauthenticated_cluster_unless_told(caplog: Any) -> None:
    import ray

    tmp = tempfile.mkdtemp(prefix="ss-noauth-", dir="/tmp")
    rundir = os.path.join(tmp, "rt")
    gcs, head = start_head(os.path.join(tmp, "ray"), 100 << 20, control=False, ray_token_file=None)
    try:
        with pytest.raises(ClusterError, match="without token authentication"):
            snapstore.up(address=gcs, k=1, m=1, rundir=rundir, rest=False)
        assert not ray.is_initialized()
        assert not os.path.exists(os.path.join(rundir, "store.json"))
        assert not [n for n in os.listdir(rundir) if n.endswith(".token")]
        caplog.set_level(logging.WARNING, logger="snapstore.ops.lifecycle")
        # Told to: past the authentication gate (this one-node cluster is then too small).
        with pytest.raises(ConfigError, match="has 1 nodes"):
            snapstore.up(
                address=gcs, k=1, m=1, rundir=rundir, rest=False, allow_unauthenticated_ray=True
            )
        assert any("without token authentication" in r.getMessage() for r in caplog.records)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        with contextlib.suppress(Exception):
            snapstore.down(rundir=rundir)
        kill_tree(head.procs)
        shutil.rmtree(tmp, ignore_errors=True)
