"""The client's side of the persisted tier: restore from disk, persist on demand, on SIGTERM.

:class:`snapstore.clients.Client` calls these; training code calls ``Client.restore``,
``Client.persist`` and passes ``persist_on_sigterm=True``. The coordinator
chooses the persisted step (see :mod:`snapstore.control.flush`), so every rank of
a job restores the same one; each rank then reads and verifies its own
file here (:func:`snapstore.persist.read_rank`), from the persist
directory the store recorded, which every trainer's host must see.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from snapstore import persist as disk
from snapstore.coding import checksum
from snapstore.control.messages import ErrorKind, ErrorReply
from snapstore.errors import (
    PersistedStepCorruptError,
    PersistFailedError,
    SnapshotNotFoundError,
    SnapstoreError,
    StoreTimeoutError,
    UnrecoverableError,
)
from snapstore.format.record import piece_bounds
from snapstore.format.wire import decode
from snapstore.rpc import call

if TYPE_CHECKING:
    from snapstore.clients.client import Client

__all__ = [
    "Opened",
    "install_sigterm",
    "open_persisted",
    "persist_now",
    "read_persisted",
    "still_intact",
    "uninstall_sigterm",
]

logger = logging.getLogger(__name__)


class Opened(NamedTuple):
    """A rank's committed buffer, opened for reading: from memory or from disk."""

    step: int
    buf: np.ndarray
    size: int
    tier: str  # "memory" or "persisted"
    source: str  # "local", "node <id>", or "persisted"
    path: str | None  # the persisted step's directory
    sums: list[int]  # piece checksums (memory); empty when read from disk (verified there)
    skipped: list[dict[str, Any]]  # newer persisted steps that failed verification


def open_persisted(
    client: Client,
    rank: int,
    cause: Exception,
    deadline: float,
    restarted: bool,
    retry: bool = True,
) -> Opened | None:
    """Memory could not serve (``cause``): open rank ``rank``'s buffer of the persisted step
    the coordinator chose for the job. None when the coordinator says memory serves the
    job after all and ``retry`` allows reading it again.

    Raises ``cause``, completed with why there is nothing to fall back to.
    """
    left = max(0.1, deadline - time.monotonic())
    plan = call(
        client.store.coordinator().persisted_plan.remote(
            client.job, rank, client.session, str(cause), restarted, left
        ),
        left + 5,
        "coordinator.persisted_plan",
    )
    if isinstance(plan, bytes):
        err = decode(plan, ErrorReply)
        if err.kind is ErrorKind.MEMORY and retry:
            return None
        note = f"; no persisted step to fall back to: {err.message or err.kind.value}"
        if isinstance(cause, UnrecoverableError):
            raise UnrecoverableError(cause.message + note, cause.lost) from None
        raise SnapshotNotFoundError(f"{cause}{note}") from None
    if int(plan["world_size"]) != client.world_size:
        raise SnapstoreError(
            f"job {client.job!r}: persisted step {plan['step']} ({plan['path']}) has world "
            f"size {plan['world_size']}, this client {client.world_size}; restore it with "
            "the world size it was saved with"
        )
    path = str(plan["path"])
    buf = read_persisted(client, path, rank)
    skipped = list(plan.get("skipped") or [])
    return Opened(int(plan["step"]), buf, len(buf), "persisted", "persisted", path, [], skipped)


def read_persisted(client: Client, path: str, rank: int) -> np.ndarray:
    """Rank ``rank``'s verified buffer of a persisted step directory.

    A file that fails its checksum now (it verified when the step was
    chosen) is reported to the coordinator, which hands out an older step
    to the next restore; the error says so.
    """
    try:
        return disk.read_rank(path, rank)
    except PersistedStepCorruptError as e:
        call(
            client.store.coordinator().persisted_bad.remote(client.job, path, str(e)),
            30,
            "coordinator.persisted_bad",
        )
        raise PersistedStepCorruptError(
            e.path,
            f"{e.detail}; the step is marked bad: restore every rank again to use the "
            "next older persisted step",
        ) from None


def still_intact(opened: Opened) -> bool:
    """Whether an in-memory buffer still hashes to its record's sums (it was not reused
    for a newer step while it was read)."""
    k = len(opened.sums)
    for j in range(k):
        off, length = piece_bounds(opened.size, k, j)
        if checksum(opened.buf[off : off + length]) != opened.sums[j]:
            return False
    return True


def persist_now(client: Client, timeout: float) -> int:
    """``Client.persist``: flush the job's committed step and wait; return the step."""
    reply = call(
        client.store.coordinator().persist.remote(client.job, timeout),
        timeout + 10,
        "coordinator.persist",
    )
    if not isinstance(reply, bytes):
        return int(reply["step"])
    err = decode(reply, ErrorReply)
    if err.kind is ErrorKind.NOT_FOUND:
        raise SnapshotNotFoundError(err.message)
    if err.kind is ErrorKind.TIMEOUT:
        raise StoreTimeoutError(err.message)
    raise PersistFailedError(f"job {client.job!r}: {err.message or err.kind.value}", err.failures)


def install_sigterm(client: Client, timeout: float) -> tuple[Any, Any]:
    """Persist the job's last committed step on SIGTERM, then let the signal act.

    Returns what :func:`uninstall_sigterm` needs. The handler flushes
    (bounded by ``timeout``), puts the previous handler back, and then runs
    it, or re-sends SIGTERM when it was the default (the process dies of
    it, as it would have), or does nothing when SIGTERM was ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        raise ValueError(
            "persist_on_sigterm=True needs the Client to be created on the main thread "
            "(Python runs signal handlers there)"
        )
    previous = signal.getsignal(signal.SIGTERM)
    restore_to = previous if previous is not None else signal.SIG_DFL

    def on_sigterm(signum: int, frame: Any) -> None:
        t0 = time.monotonic()
        try:
            step = client.persist(timeout=timeout)
            logger.warning(
                "SIGTERM: persisted step %d in %.1f s",
                step,
                time.monotonic() - t0,
                extra={"job": client.job, "step": step},
            )
        except Exception as e:
            logger.error(
                "SIGTERM: could not persist the last committed step: %s",
                e,
                extra={"job": client.job},
            )
        signal.signal(signal.SIGTERM, restore_to)
        client._sigterm = None
        if callable(previous):
            previous(signum, frame)
        elif restore_to == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    return on_sigterm, restore_to


def uninstall_sigterm(installed: tuple[Any, Any]) -> None:
    """Put the previous SIGTERM handler back, if ours is still the one installed."""
    ours, restore_to = installed
    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGTERM) is ours:
        signal.signal(signal.SIGTERM, restore_to)
