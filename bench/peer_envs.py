"""One Python environment per peer system, built on demand, outside snapstore's own.

``bench.peers`` runs each peer (lm-resiliency's GEMINI, DLRover, torchft) with
the interpreter of an environment of its own, so the product's environment
never installs them (lm-resiliency, for one, prints a TypeError from torch's
rendezvous registry on every import of ``torch.distributed``).

Contract of :func:`ensure`:

1. The environment lives in ``<cache>/<peer>-<key>``, where ``<cache>`` is
   ``$SNAPSTORE_PEERS_DIR``, else ``$XDG_CACHE_HOME/snapstore/peers``, else
   ``~/.cache/snapstore/peers``, and ``<key>`` hashes the peer's pinned
   requirements, this interpreter's version and the product environment it
   borrows torch from. Change any of them and a new one is built; an
   environment whose key matches and whose stamp file says it finished is
   reused as it is.
2. torch (2.13.0, CPU), numpy and xxhash are not installed again: the product
   environment's copies are linked into the peer's site-packages (symlinks,
   read-only use), with the distributions they require, so pip sees them as
   installed. Then pip installs the pinned requirements into the peer's
   environment only (``pip --python``), through the registries pip is set up
   with.
3. Building holds an exclusive lock on ``<dir>.lock``, so two runs never build
   the same environment at once. A failed build leaves no stamp; the next call
   builds it afresh.

It returns a :class:`PeerEnv` saying which interpreter to run, how long the
build took (0 when reused) or why there is none (no network, a failed pip).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = ["REQUIREMENTS", "PeerEnv", "cache_dir", "ensure"]

REQUIREMENTS: dict[str, tuple[str, ...]] = {
    # GEMINI: its rendezvous plugin for torchrun does not load with torch 2.13
    # (a TypeError at registration); its checkpoint manager does.
    "gemini": ("lm-resiliency==0.2.0",),
    # DLRover Flash Checkpoint with the local master `dlrover-run --standalone`
    # starts: the master needs the k8s extra (grpcio, kubernetes, tornado) and
    # protobuf 4.x (its generated modules select by protobuf version).
    "dlrover": ("dlrover[k8s]==0.6.1", "protobuf==4.25.3"),
    # torchft: the wheel ships the lighthouse binary (torchft_lighthouse).
    "torchft": ("torchft==0.2.0",),
}
"""Pinned requirements of each peer's environment."""

LINKED = ("torch", "numpy", "xxhash")
"""Distributions taken from the product environment (with what they require): the
ranks import ``snapstore.bench``, whose package imports ``snapstore.coding`` (xxhash)."""

PIP_TIMEOUT = 600.0
"""Seconds one pip install may take."""


@dataclass(frozen=True)
class PeerEnv:
    """A peer's environment: ``python`` to run, or ``error`` saying why there is none."""

    peer: str
    python: str | None
    seconds: float
    built: bool
    error: str | None = None
    path: str = ""


def cache_dir() -> str:
    """Where peer environments live (see the module docstring)."""
    explicit = os.environ.get("SNAPSTORE_PEERS_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "snapstore", "peers")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(names: Sequence[str]) -> list[md.Distribution]:
    """The named distributions of this environment and everything they require (no extras)."""
    seen: dict[str, md.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        if _norm(name) in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional dependency this environment lacks
        seen[_norm(name)] = dist
        for req in dist.requires or ():
            if "extra ==" in req:
                continue
            m = re.match(r"[A-Za-z0-9_.-]+", req)
            if m:
                todo.append(m.group(0))
    return list(seen.values())


def _key(peer: str) -> str:
    linked = sorted(f"{d.metadata['Name']}=={d.version}" for d in _closure(LINKED))
    blob = json.dumps(
        {
            "requirements": REQUIREMENTS[peer],
            "python": sys.version,
            "prefix": sys.prefix,
            "linked": linked,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _site_packages(env: str) -> str:
    return os.path.join(
        env, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages"
    )


def _link(site: str) -> None:
    """Symlink torch, numpy and what they require from this environment into ``site``."""
    for dist in _closure(LINKED):
        base = str(dist.locate_file(""))
        tops = {f.parts[0] for f in dist.files or () if f.parts}
        for top in tops:
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            src, dst = os.path.join(base, top), os.path.join(site, top)
            if os.path.exists(src) and not os.path.lexists(dst):
                os.symlink(src, dst)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stale(root: str, peer: str, keep: str) -> None:
    """Remove this peer's older environments whose linked torch is gone (a deleted checkout)."""
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if not name.startswith(f"{peer}-") or path == keep or not os.path.isdir(path):
            continue
        torch_link = os.path.join(_site_packages(path), "torch")
        if os.path.islink(torch_link) and not os.path.exists(torch_link):
            shutil.rmtree(path, ignore_errors=True)


def ensure(peer: str, log: str | None = None) -> PeerEnv:
    """The environment of ``peer`` (a key of :data:`REQUIREMENTS`), built if missing.

    ``log``: a file that receives pip's output. Never raises for a failed
    build: the returned ``error`` says what failed.
    """
    if peer not in REQUIREMENTS:
        raise ValueError(f"unknown peer {peer!r}; expected one of {sorted(REQUIREMENTS)}")
    t0 = time.perf_counter()
    root = cache_dir()
    os.makedirs(root, exist_ok=True)
    env = os.path.join(root, f"{peer}-{_key(peer)}")
    python = os.path.join(env, "bin", "python")
    stamp = os.path.join(env, ".snapstore-peer-ready")
    with _locked(env + ".lock"):
        if os.path.exists(stamp) and os.path.exists(python):
            return PeerEnv(peer, python, time.perf_counter() - t0, built=False, path=env)
        shutil.rmtree(env, ignore_errors=True)
        with contextlib.suppress(OSError):
            _stale(root, peer, env)
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", "--without-pip", env],
                check=True,
                capture_output=True,
                timeout=120,
            )
            _link(_site_packages(env))
            pip = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet"]
            with open(log or os.devnull, "a") as out:
                proc = subprocess.run(
                    [*pip, *REQUIREMENTS[peer]],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=PIP_TIMEOUT,
                    env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"),
                )
            if proc.returncode != 0:
                raise RuntimeError(
                    f"pip install {' '.join(REQUIREMENTS[peer])} exited {proc.returncode}"
                    + (f" (its output: {log})" if log else "")
                )
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            shutil.rmtree(env, ignore_errors=True)
            return PeerEnv(peer, None, time.perf_counter() - t0, built=True, error=str(e))
        with open(stamp, "w") as f:
            f.write(json.dumps({"requirements": REQUIREMENTS[peer], "built": time.time()}))
    return PeerEnv(peer, python, time.perf_counter() - t0, built=True, path=env)
