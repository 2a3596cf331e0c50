"""Waiting on actor calls: timeouts, and snapstore's own errors instead of Ray's wrappers.

A method that raises in an actor reaches the caller as a ``RayTaskError``
wrapping the original; callers of snapstore should see the original
(``MemoryBudgetError``, ``UnrecoverableError``...) with its own message.
"""

from __future__ import annotations

from typing import Any

from snapstore.errors import ActorUnavailableError, SnapstoreError, StoreTimeoutError

__all__ = ["call", "describe", "root_cause"]


def call(ref: Any, timeout: float | None, what: str) -> Any:
    """``ray.get(ref)`` with a timeout, raising snapstore errors.

    - the call did not finish in time: StoreTimeoutError naming ``what``;
    - the actor raised a SnapstoreError: that error, as raised;
    - the actor raised anything else: SnapstoreError naming ``what`` and the cause;
    - the actor is dead or unreachable: ActorUnavailableError.
    """
    import ray

    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise StoreTimeoutError(f"{what} did not finish within {timeout} s") from None
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, SnapstoreError):
            raise cause from None
        raise SnapstoreError(f"{what} failed: {describe(cause or e)}") from None
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
        raise ActorUnavailableError(f"{what}: actor unavailable ({describe(e)})") from None


def root_cause(e: BaseException) -> BaseException:
    """The exception an actor raised, unwrapped from Ray's RayTaskError chain."""
    for _ in range(8):
        cause = getattr(e, "cause", None)
        if cause is None:
            break
        e = cause
    return e


def describe(e: BaseException) -> str:
    """One line saying what went wrong: the root cause's last line ("timed out" for timeouts)."""
    import asyncio

    root = root_cause(e)
    if isinstance(root, (asyncio.TimeoutError, TimeoutError)) and not str(root).strip():
        return "timed out"
    lines = [ln for ln in str(root).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(root).__name__
