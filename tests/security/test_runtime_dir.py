"""Finding 3: the runtime directory was trusted blindly.

Another user pre-created the runtime directory (``/tmp/snapstore-<uid>`` is
a guessable name in a world-writable place) and planted ``store.json.new``
as a symlink to a file of theirs; the owner's ``up`` then wrote the state
file, with the data-plane token, through the symlink. Now the directory
must be the owner's, private and real before anything goes into it, and
files are created exclusively without following symlinks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

import snapstore
from snapstore.control.handle import connect, read_state, write_state
from snapstore.errors import ConfigError, StoreNotRunningError
from snapstore.private import private_dir, read_private, write_private
from tests.security.attacker import NOBODY, as_nobody, require_attacker

SECRET = {"version": 2, "token": "the-data-plane-token", "store_id": "x"}


@pytest.fixture
def base() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="ss-rt-", dir="/tmp")
    os.chmod(d, 0o1777)  # like /tmp: anyone may create names in it
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _planted_by_nobody(base: str) -> tuple[str, str]:
    """The attack, as uid 65534: pre-create the runtime dir, plant the symlink, wait."""
    rundir, loot = os.path.join(base, "snapstore-0"), os.path.join(base, "loot")
    as_nobody(
        f"""
        import os
        os.mkdir({rundir!r}, 0o755)
        fd = os.open({loot!r}, os.O_WRONLY | os.O_CREAT, 0o666)
        os.fchmod(fd, 0o666)
        os.close(fd)
        os.symlink({loot!r}, os.path.join({rundir!r}, "store.json.new"))
        """
    )
    return rundir, loot


def test_a_runtime_dir_planted_by_another_user_is_refused(base: str) -> None:
    require_attacker()
    rundir, loot = _planted_by_nobody(base)
    with pytest.raises(ConfigError, match="belongs to uid"):
        write_state(os.path.join(rundir, "store.json"), SECRET)
    # What the attacker gets back: nothing.
    assert as_nobody(f"print(open({loot!r}).read())").strip() == ""


def test_up_refuses_a_foreign_runtime_dir_before_starting_anything(base: str) -> None:
    require_attacker()
    rundir, loot = _planted_by_nobody(base)
    try:
        with pytest.raises(ConfigError, match="another user created it"):
            snapstore.up(rundir=rundir, nodes=2, k=1, m=1, rest=False)
    finally:
        # On a build without the check, up would have started a cluster: stop it.
        if os.path.exists(os.path.join(rundir, "store.json")):
            snapstore.down(rundir=rundir)
    assert os.path.getsize(loot) == 0
    assert not [n for n in os.listdir(rundir) if n.startswith("ray-")]


def test_a_symlink_in_an_own_dir_is_replaced_not_followed(base: str) -> None:
    rundir = private_dir(os.path.join(base, "rt"))
    victim = os.path.join(base, "victim")
    with open(victim, "w") as f:
        f.write("untouched")
    os.symlink(victim, os.path.join(rundir, "store.json.new"))
    os.symlink(victim, os.path.join(rundir, "store.json"))
    write_state(os.path.join(rundir, "store.json"), SECRET)
    with open(victim) as f:
        assert f.read() == "untouched"
    assert not os.path.islink(os.path.join(rundir, "store.json"))
    assert read_state(os.path.join(rundir, "store.json"))["token"] == SECRET["token"]
    assert oct(os.stat(os.path.join(rundir, "store.json")).st_mode & 0o777) == oct(0o600)


@pytest.mark.parametrize(
    ("mode", "outcome"),
    [(0o700, 0o700), (0o755, 0o700), (0o750, 0o700), (0o777, None), (0o1777, None), (0o770, None)],
)
def test_own_dirs_are_narrowed_or_refused(base: str, mode: int, outcome: int | None) -> None:
    d = os.path.join(base, "d")
    os.mkdir(d)
    os.chmod(d, mode)
    if outcome is None:
        with pytest.raises(ConfigError, match="other users can write"):
            private_dir(d)
    else:
        private_dir(d)
        assert os.stat(d).st_mode & 0o7777 == outcome


def test_a_symlinked_runtime_dir_is_refused(base: str) -> None:
    real = private_dir(os.path.join(base, "real"))
    link = os.path.join(base, "link")
    os.symlink(real, link)
    with pytest.raises(ConfigError, match="symlink"):
        private_dir(link)


def test_state_files_others_could_have_written_are_not_read(base: str) -> None:
    rundir = private_dir(os.path.join(base, "rt"))
    path = os.path.join(rundir, "store.json")
    write_private(path, json.dumps(SECRET).encode())
    os.chmod(path, 0o644)
    with pytest.raises(StoreNotRunningError, match="mode 0644"):
        connect(rundir)
    os.chmod(path, 0o600)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(StoreNotRunningError, match="belongs to uid"):
        connect(rundir)
    os.unlink(path)
    os.symlink(os.path.join(base, "elsewhere"), path)
    with pytest.raises(StoreNotRunningError, match="symlink"):
        connect(rundir)


def test_read_private_is_bounded(base: str) -> None:
    path = os.path.join(private_dir(os.path.join(base, "rt")), "big")
    write_private(path, b"x" * 100)
    assert read_private(path, 100) == b"x" * 100
    with pytest.raises(ConfigError, match="more than 99"):
        read_private(path, 99)
