"""REST monitoring for a running snapstore: health, nodes, jobs, snapshots, metrics, dashboard.

The server runs as its own process (``python -m snapstore.server``, which ``snapstore
up`` starts and ``snapstore down`` stops). A background thread polls the
coordinator's published snapshot (:mod:`snapstore.server.poller`); requests are served
from the last one and never wait on the store (:mod:`snapstore.server.app`).
"""

from snapstore.server.app import create_app
from snapstore.server.auth import decide_token, is_loopback
from snapstore.server.poller import CoordinatorSource, Poller, PollState, SnapshotSource
from snapstore.server.views import View, build_view

__all__ = [
    "CoordinatorSource",
    "PollState",
    "Poller",
    "SnapshotSource",
    "View",
    "build_view",
    "create_app",
    "decide_token",
    "is_loopback",
]
