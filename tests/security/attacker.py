"""Running code as another local user (uid 65534, "nobody"): the local attacker.

Tests run as root here, so a child process can drop to uid/gid 65534 with
no supplementary groups. The child needs an interpreter it may execute: the
test's own when its path is open to others, else the system's
``/usr/bin/python3.X`` of the same minor version (same extension ABI); it
reaches this environment's packages (Ray, msgpack) through
``site.addsitedir``, read-only. Where none of that is possible (not root, no
such interpreter) the attacker tests skip and say why.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterator

import pytest

NOBODY = 65534
_SITE = sysconfig.get_paths()["purelib"]
_PRELUDE = f"import site, sys\nsite.addsitedir({_SITE!r})\n"


def _candidates() -> list[str]:
    v = f"{sys.version_info.major}.{sys.version_info.minor}"
    return [sys.executable, f"/usr/bin/python{v}", f"/usr/local/bin/python{v}"]


@contextlib.contextmanager
def _home() -> Iterator[str]:
    home = tempfile.mkdtemp(prefix="nobody-home-", dir="/tmp")
    try:
        os.chown(home, NOBODY, NOBODY)
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _run(exe: str, code: str, home: str, timeout: float, env: dict[str, str] | None) -> str:
    full_env = {
        "PATH": "/usr/bin:/bin",
        "HOME": home,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # The system interpreter may differ from the cluster's in its patch level, which
        # Ray refuses by default; an attacker would just relax that, so does this one.
        "RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL": "minor",
        **(env or {}),
    }
    p = subprocess.run(
        [exe, "-c", _PRELUDE + textwrap.dedent(code)],
        env=full_env,
        cwd=home,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if p.returncode != 0:
        raise AssertionError(
            f"attacker code failed (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        )
    return p.stdout


@functools.lru_cache(maxsize=1)
def _interpreter() -> tuple[str | None, str]:
    """An interpreter uid 65534 can run with this environment's packages, or why not."""
    if os.geteuid() != 0:
        return None, "tests do not run as root: cannot switch to uid 65534"
    why = "no interpreter that uid 65534 may execute"
    for exe in _candidates():
        if not os.path.exists(exe):
            continue
        try:
            with _home() as home:
                out = _run(exe, "import msgpack, ray; print('ok')", home, 60, None)
        except (OSError, AssertionError, subprocess.TimeoutExpired) as e:
            why = f"{exe}: {str(e).splitlines()[0][:200]}"
            continue
        if out.strip().endswith("ok"):
            return exe, ""
    return None, why


def require_attacker() -> None:
    """Skip the calling test, with the reason, when it cannot run code as uid 65534."""
    exe, why = _interpreter()
    if exe is None:
        pytest.skip(f"cannot run the local attacker: {why}")


def as_nobody(code: str, timeout: float = 120.0, env: dict[str, str] | None = None) -> str:
    """Run ``code`` (Python source) as uid 65534; return its stdout; fail on a non-zero exit.

    The code should print what it observed; the test asserts on that.
    """
    exe, why = _interpreter()
    if exe is None:
        pytest.skip(f"cannot run the local attacker: {why}")
    with _home() as home:
        return _run(exe, code, home, timeout, env)
