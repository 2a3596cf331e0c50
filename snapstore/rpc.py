"""Waiting on actor calls: timeouts, and snapstore's own errors instead of Ray's wrappers.

A method that raises in an actor reaches the caller as a ``RayTaskError``
wrapping the original; callers of snapstore should see the original
(``MemoryBudgetError``, ``UnrecoverableError``...) with its own message.
"""

from __future__ import annotations

from typing import Any

from snapstore.errors import ActorUnavailableError, SnapstoreError, StoreTimeoutError

__all__ = ["call"]


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
        raise SnapstoreError(f"{what} failed: {_last_line(cause or e)}") from None
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
        raise ActorUnavailableError(f"{what}: actor unavailable ({_last_line(e)})") from None


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
