"""The result of a training run without failures, cached on disk by what determines it.

``snapstore demo`` and ``bench.chaos`` end by comparing a run through
failures, bitwise, with the same training run without failures (the
*reference*). That run depends only on the model and training code
(:mod:`snapstore.bench.gpt`, :mod:`snapstore.bench.training`), the model
config, the steps, the number of ranks and the torch version -- not on the
store's layout or the failures -- so it is kept in
``$SNAPSTORE_REFERENCE_CACHE`` (else ``<XDG cache or ~/.cache>/snapstore``)
under a key hashed from all of them, and any run with the same key reuses
it. A changed line of either module is a new key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["CACHE_ENV", "cache_path", "load", "save"]

CACHE_ENV = "SNAPSTORE_REFERENCE_CACHE"
"""A directory for cached references (tests point it at one per session)."""


def _key(cfg: dict[str, Any], steps: int, world: int) -> str:
    import torch

    from snapstore.bench import gpt, training

    h = hashlib.sha256()
    for mod in (gpt, training):
        h.update(Path(mod.__file__ or "").read_bytes())
    h.update(json.dumps([cfg, steps, world], sort_keys=True).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def cache_path(cfg: dict[str, Any], steps: int, world: int) -> Path:
    """Where the reference for this model config, step count and world size is kept."""
    base = os.environ.get(CACHE_ENV)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "snapstore")
    return Path(base) / f"demo-reference-{_key(cfg, steps, world)}.json"


def load(cfg: dict[str, Any], steps: int, world: int) -> dict[str, Any] | None:
    """The cached reference (a ``RunReport.to_dict()``), or None when there is none."""
    path = cache_path(cfg, steps, world)
    try:
        got = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return got if isinstance(got, dict) and isinstance(got.get("digests"), list) else None


def save(cfg: dict[str, Any], steps: int, world: int, reference: dict[str, Any]) -> Path:
    """Keep ``reference`` for later runs (best effort: a read-only home only costs time)."""
    path = cache_path(cfg, steps, world)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(reference))
        os.replace(tmp, path)
    return path
