"""The root of snapstore's exception tree and the coding layer's errors.

The root lives here, in the lowest layer, so that imports stay one-way:
``snapstore`` re-exports :class:`SnapstoreError` and adds its own classes.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "BackendUnavailableError",
    "ChecksumMismatchError",
    "CodingError",
    "InsufficientChunksError",
    "SnapstoreError",
]


class SnapstoreError(Exception):
    """Base of every error snapstore raises on purpose."""


class CodingError(SnapstoreError, ValueError):
    """Invalid use of the codec: bad k or m, unequal or unwritable buffers."""


class BackendUnavailableError(CodingError):
    """The requested erasure-coding backend cannot be used on this machine."""


class InsufficientChunksError(CodingError):
    """Fewer than k usable chunks of a stripe: the missing ones cannot be rebuilt.

    ``missing`` lists the indices that are absent (or failed their checksum),
    ``present`` the usable ones, ``needed`` is k. ``corrupt`` is the part of
    ``missing`` that was given but failed its checksum.
    """

    def __init__(
        self,
        missing: Iterable[int],
        present: Iterable[int],
        needed: int,
        corrupt: Iterable[int] = (),
    ) -> None:
        self.missing = sorted(missing)
        self.present = sorted(present)
        self.needed = needed
        self.corrupt = sorted(corrupt)
        detail = f" (of which failed their checksum: {self.corrupt})" if self.corrupt else ""
        super().__init__(
            f"cannot decode: {len(self.present)} usable chunks {self.present}, "
            f"need {needed}; missing or corrupt: {self.missing}{detail}"
        )

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        # Errors cross process boundaries (Ray actors): rebuild from fields.
        return (type(self), (self.missing, self.present, self.needed, self.corrupt))


class ChecksumMismatchError(CodingError):
    """A chunk's bytes do not match the checksum recorded for it."""

    def __init__(self, what: str, expected: int, actual: int) -> None:
        self.what = what
        self.expected = expected
        self.actual = actual
        super().__init__(f"{what}: checksum {actual:#018x} != recorded {expected:#018x}")

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (type(self), (self.what, self.expected, self.actual))
