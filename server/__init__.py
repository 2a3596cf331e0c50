"""REST monitoring for a running snapstore: health, nodes, jobs, snapshots, metrics, dashboard.

The server runs as its own process (``python -m server``, which ``snapstore
up`` starts and ``snapstore down`` stops). A background thread polls the
coordinator's published snapshot (:mod:`server.poller`); requests are served
from the last one and never wait on the store (:mod:`server.app`).
"""

from server.app import create_app
from server.auth import decide_token, is_loopback
from server.poller import CoordinatorSource, Poller, PollState, SnapshotSource
from server.views import View, build_view

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
