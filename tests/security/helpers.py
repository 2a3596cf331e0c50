"""A real persisted step, written by the tier's own functions (as a flush writes it)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from snapstore import persist
from snapstore.format.frame import frame_size, write_trailer
from snapstore.format.pack import pack


def staged_buffer(state: Any, step: int) -> np.ndarray:
    """A rank's staged buffer of ``state``: data, manifest, trailer (what a slot holds)."""
    packed = pack(state)
    data = np.asarray(packed.data).reshape(-1).view(np.uint8)
    buf = np.zeros(frame_size(len(data), len(packed.manifest)), dtype=np.uint8)
    buf[: len(data)] = data
    write_trailer(buf, len(data), packed.manifest, step)
    return buf


def persist_step(root: str, job: str, step: int, states: list[Any], k: int = 2) -> str:
    """Flush ``states`` (one per rank) as step ``step`` of ``job``; return the step directory."""
    partial = persist.begin_step(root, job, step)
    persist.prepare_dir(partial)
    ranks = {}
    for r, state in enumerate(states):
        buf = staged_buffer(state, step)
        sums = persist.write_rank(os.path.join(partial, persist.rank_file(r)), buf, k)
        ranks[r] = persist.PersistedRank(r, persist.rank_file(r), len(buf), sums)
    man = persist.PersistManifest(job, step, len(states), k, ranks, created_at=1.0)
    return persist.publish_step(root, man)
