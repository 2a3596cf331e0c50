"""snapstore's exception tree: one class per thing a caller can act on.

Everything derives from :class:`SnapstoreError` (defined in ``snapstore.coding`` so the
lowest layer can raise it too), which derives from :class:`Exception`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from snapstore.coding.errors import (
    BackendUnavailableError,
    ChecksumMismatchError,
    CodingError,
    InsufficientChunksError,
    SnapstoreError,
)

__all__ = [
    "ActorUnavailableError",
    "BackendUnavailableError",
    "ChecksumMismatchError",
    "ClusterError",
    "CodingError",
    "ConfigError",
    "FaultInjectionError",
    "FormatError",
    "IllegalTransitionError",
    "InsufficientChunksError",
    "MemoryBudgetError",
    "PersistFailedError",
    "PersistedStepCorruptError",
    "RestoreRequiredError",
    "SaveFailedError",
    "SnapshotNotFoundError",
    "SnapstoreError",
    "StoreNotRunningError",
    "StoreTimeoutError",
    "UnrecoverableError",
    "UnsupportedTypeError",
]


class FormatError(SnapstoreError, ValueError):
    """A manifest or data buffer is malformed: truncated, wrong version, bad offsets."""


class UnsupportedTypeError(SnapstoreError, TypeError):
    """A state holds a value the snapshot format cannot store; ``path`` names it."""

    def __init__(self, path: str, value_type: type) -> None:
        self.path = path
        self.value_type = value_type
        super().__init__(
            f"{path}: unsupported type {value_type.__qualname__} "
            "(store tensors, numpy arrays, numbers, str, bytes, None and "
            "dicts/lists/tuples of them)"
        )

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        # Errors cross process boundaries (Ray actors): rebuild from fields.
        return (type(self), (self.path, self.value_type))


class ConfigError(SnapstoreError, ValueError):
    """A setting is out of range or inconsistent with the cluster."""


class ClusterError(SnapstoreError):
    """Starting, attaching to or stopping the Ray cluster failed."""


class StoreNotRunningError(SnapstoreError):
    """No running store was found (no state file, or its cluster is gone)."""


class StoreTimeoutError(SnapstoreError, TimeoutError):
    """A call did not finish within its timeout."""


class ActorUnavailableError(SnapstoreError):
    """An SMP or the coordinator could not be reached (its node died, or it is restarting)."""


class MemoryBudgetError(SnapstoreError):
    """A save needs more memory on a node than its budget allows."""

    def __init__(self, job: str, node: str, needed: int, used: int, budget: int) -> None:
        self.job = job
        self.node = node
        self.needed = needed
        self.used = used
        self.budget = budget
        super().__init__(
            f"job {job!r} needs {needed} more bytes on node {node} but {used} of its "
            f"{budget}-byte budget are in use; raise --memory-per-node or "
            "spread ranks over more nodes (the last committed step is intact)"
        )

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (type(self), (self.job, self.node, self.needed, self.used, self.budget))


class SnapshotNotFoundError(SnapstoreError, LookupError):
    """The job has no committed step (or not the one asked for)."""


class UnrecoverableError(SnapstoreError):
    """More chunks of a stripe are lost than its parity can rebuild.

    ``lost`` lists every lost or corrupt chunk that made it so, as readable
    strings ("stripe 2 of group 0: data chunk 1 on node 3f2a…").
    """

    def __init__(self, message: str, lost: Sequence[str]) -> None:
        self.message = message
        self.lost = list(lost)
        detail = "; ".join(self.lost)
        super().__init__(f"{message}: {detail}" if detail else message)

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (type(self), (self.message, self.lost))


class _PartiesError(SnapstoreError):
    """An operation several parties took part in failed; ``failures`` maps each to its error."""

    def __init__(self, message: str, failures: Mapping[str, str] | None = None) -> None:
        self.message = message
        self.failures = dict(failures or {})
        detail = "; ".join(f"{who}: {why}" for who, why in self.failures.items())
        super().__init__(f"{message} ({detail})" if detail else message)

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (type(self), (self.message, self.failures))


class SaveFailedError(_PartiesError):
    """A step could not be committed; ``failures`` maps each party to its error.

    The previous committed step is intact and is what restore returns.
    """


class IllegalTransitionError(SnapstoreError):
    """A lifecycle was asked for a transition its current state does not allow.

    ``machine`` names what (a node, a step of a job), ``state`` where it
    was and ``transition`` what was refused: a bug in the control plane, or
    a message that arrived too late to matter.
    """

    def __init__(self, machine: str, state: str, transition: str) -> None:
        self.machine = machine
        self.state = state
        self.transition = transition
        super().__init__(f"{machine}: cannot {transition} in state {state}")

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (type(self), (self.machine, self.state, self.transition))


class RestoreRequiredError(SaveFailedError):
    """This process must restore before it saves again: another rank of the job restarted
    (or the job fell back to its persisted step) and every rank resumes from one step.

    Raised by the next ``save`` once the store refused one of this process's
    saves for that reason. Let the process fail: the launcher (torchrun, Ray
    Train) restarts every rank, and each restores the same step.
    """


class FaultInjectionError(SnapstoreError):
    """A fault was refused: it would act on a cluster ``snapstore up`` did not start."""


class PersistFailedError(_PartiesError):
    """A flush of a committed step to the persist directory did not complete.

    ``failures`` maps each party (a node, a rank, the manifest) to its error.
    The previous persisted step is intact; the in-memory step is unaffected.
    """


class PersistedStepCorruptError(SnapstoreError):
    """A persisted step's file is missing, truncated or fails its checksum.

    ``path`` names the file or directory; the step must not be restored.
    """

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"{path}: {detail}")

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (type(self), (self.path, self.detail))
