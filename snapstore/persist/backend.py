"""The persisted tier as the control plane uses it: one object per root.

:class:`Tier` is what the coordinator's flusher and fallback call: list,
begin, publish, retain, read manifests. :class:`FilesTier` is the real one,
over :mod:`snapstore.persist.tier` (a directory, or an fsspec URL through
:mod:`snapstore.persist.objstore`); the simulation has an in-memory one.
Rank files are written and read by nodes and clients through
:mod:`snapstore.persist.tier` directly.
"""

from __future__ import annotations

from typing import Protocol

from snapstore.persist import tier

__all__ = ["FilesTier", "Tier"]


class Tier(Protocol):
    """A persist root. Blocking calls: the coordinator runs them off its event loop."""

    root: str

    def job_dir(self, job: str) -> str: ...

    def step_dir(self, job: str, step: int) -> str: ...

    def list_jobs(self) -> list[str]: ...

    def list_steps(self, job: str) -> list[tier.PersistedStep]: ...

    def newest_first(self, job: str) -> list[tuple[int, str]]: ...

    def begin_step(self, job: str, step: int) -> str:
        """A fresh partial directory for a flush of ``step`` (leftovers removed)."""
        ...

    def publish_step(self, manifest: tier.PersistManifest) -> str: ...

    def retain(self, job: str, keep: int) -> list[int]: ...

    def read_manifest(self, path: str) -> tier.PersistManifest: ...

    def verify_rank(self, path: str, rank: int, manifest: tier.PersistManifest) -> int: ...


class FilesTier:
    """The persisted tier at a directory or fsspec URL (see :mod:`snapstore.persist.tier`)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def job_dir(self, job: str) -> str:
        return tier.job_dir(self.root, job)

    def step_dir(self, job: str, step: int) -> str:
        return tier.step_dir(self.root, job, step)

    def list_jobs(self) -> list[str]:
        return tier.list_jobs(self.root)

    def list_steps(self, job: str) -> list[tier.PersistedStep]:
        return tier.list_steps(self.root, job)

    def newest_first(self, job: str) -> list[tuple[int, str]]:
        return tier.newest_first(self.root, job)

    def begin_step(self, job: str, step: int) -> str:
        return tier.begin_step(self.root, job, step)

    def publish_step(self, manifest: tier.PersistManifest) -> str:
        return tier.publish_step(self.root, manifest)

    def retain(self, job: str, keep: int) -> list[int]:
        return tier.retain(self.root, job, keep)

    def read_manifest(self, path: str) -> tier.PersistManifest:
        return tier.read_manifest(path)

    def verify_rank(self, path: str, rank: int, manifest: tier.PersistManifest) -> int:
        return tier.verify_rank(path, rank, manifest)
