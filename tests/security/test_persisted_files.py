"""Finding 7: the persisted tier was world-readable (files 0644, directories from the umask).

The persist root may be a directory others can traverse (a shared mount,
``/tmp``): the job and step directories snapstore creates are 0700 and its
files 0600 whatever the umask, so another user reads no snapshot; a job
directory planted by another user is refused rather than written into.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator

import pytest
import torch

from snapstore import persist
from snapstore.errors import ConfigError
from tests.security.attacker import NOBODY, as_nobody, require_attacker
from tests.security.helpers import persist_step


@pytest.fixture
def root() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="ss-proot-", dir="/tmp")
    os.chmod(d, 0o755)  # a shared root: other users may traverse it
    old = os.umask(0o022)
    try:
        yield d
    finally:
        os.umask(old)
        shutil.rmtree(d, ignore_errors=True)


def _modes(root: str) -> dict[str, int]:
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


def test_persisted_steps_are_owner_only(root: str) -> None:
    path = persist_step(root, "j", 1, [{"w": torch.arange(100.0)}])
    modes = _modes(root)
    assert modes == {
        "j": 0o700,
        "j/step-1": 0o700,
        "j/step-1/rank-0.bin": 0o600,
        f"j/step-1/{persist.MANIFEST_NAME}": 0o600,
    }, modes
    assert persist.read_rank(path, 0).size > 0


def test_another_user_cannot_read_a_persisted_step(root: str) -> None:
    require_attacker()
    path = persist_step(root, "j", 1, [{"w": torch.arange(100.0)}])
    out = as_nobody(
        f"""
        import os
        for p in ({os.path.join(path, "rank-0.bin")!r}, {path!r}):
            try:
                open(p, "rb").read(8) if os.path.isfile(p) else os.listdir(p)
                print("READ", p)
            except PermissionError:
                print("DENIED")
        """
    )
    assert out.split() == ["DENIED", "DENIED"], out


def test_a_job_directory_planted_by_another_user_is_refused(root: str) -> None:
    require_attacker()
    planted = os.path.join(root, "j")
    os.mkdir(planted, 0o777)
    os.chmod(planted, 0o777)
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match="belongs to uid"):
        persist.begin_step(root, "j", 1)
    assert os.listdir(planted) == []


def test_rank_files_are_created_0600_under_any_umask(root: str) -> None:
    os.umask(0)
    path = persist_step(root, "j", 2, [{"w": torch.arange(10.0)}, {"w": torch.ones(3)}])
    assert {stat.S_IMODE(os.stat(os.path.join(path, f)).st_mode) for f in os.listdir(path)} == {
        0o600
    }
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
