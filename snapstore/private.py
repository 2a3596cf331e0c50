"""Files only the store's owner can read: private directories, no-follow exclusive writes.

The runtime directory holds the store's secrets (the data-plane token in the
state file, the Ray token) and the embedded cluster's sockets; the persist
directory holds every snapshot. Both may sit in a shared place (``/tmp``, a
mount), where another user can create a directory or a symlink first. The
rules here:

- :func:`private_dir`: a directory is created 0700 and, created or found,
  must be a real directory (not a symlink) owned by this user that no other
  user can write; one only readable by others is narrowed to 0700, anything
  else is refused with :class:`~snapstore.errors.ConfigError`.
- :func:`write_private` / :func:`create_private`: files are created 0600 with
  ``O_CREAT | O_EXCL | O_NOFOLLOW``, under a fresh random name and renamed
  into place (a planted ``name.new`` symlink is never followed or written).
- :func:`read_private`: a file is opened ``O_NOFOLLOW`` and used only when
  it is a regular file owned by this user with no group or other access.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat

from snapstore.errors import ConfigError

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "check_private_file",
    "create_private",
    "private_dir",
    "read_private",
    "write_private",
]

DIR_MODE = 0o700
FILE_MODE = 0o600
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def private_dir(path: str, what: str = "directory", create: bool = True) -> str:
    """Create ``path`` (0700) unless it exists, check it is private, return it.

    Parents are created as ``os.makedirs`` does; only ``path`` itself is
    checked: owned by this user, a real directory, not writable by others.
    ``create=False``: FileNotFoundError when it does not exist.
    """
    if create:
        with contextlib.suppress(FileExistsError):
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
            os.mkdir(path, DIR_MODE)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise
        raise ConfigError(f"{what} {path}: it vanished while being created") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot use it ({e.strerror})") from None
    fix = "choose another with --runtime-dir or $SNAPSTORE_RUNTIME_DIR, or remove it"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {path} is not a directory but a symlink or a file; {fix}")
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"{what} {path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()}): "
            f"another user created it and could read or replace what goes in it; {fix}"
        )
    if st.st_mode & 0o022:
        raise ConfigError(
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: other users can write "
            f"into it (plant files or symlinks); {fix}"
        )
    if st.st_mode & 0o077:
        os.chmod(path, DIR_MODE)
    return path


def _open_new(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, FILE_MODE)


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def create_private(path: str, data: bytes) -> None:
    """Create ``path`` holding ``data``, mode 0600; FileExistsError if anything is there."""
    fd = _open_new(path)
    try:
        _write_fd(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def write_private(path: str, data: bytes) -> None:
    """Replace ``path`` with a 0600 file holding ``data``, atomically.

    The bytes go to a new file of a random name in the same directory
    (exclusive, no-follow), which is then renamed over ``path``: a symlink
    at ``path`` is replaced, never followed.
    """
    tmp = os.path.join(
        os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp"
    )
    create_private(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_private_file(fd: int, path: str) -> os.stat_result:
    """The stat of an open file, if it is a regular file only this user can read or write."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} is not a regular file")
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"{path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()}); not using it"
        )
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; a secret must be 0600 "
            f"(chmod 600 {path})"
        )
    return st


def read_private(path: str, limit: int = 1 << 20) -> bytes:
    """The bytes of a private file (see :func:`check_private_file`), at most ``limit`` of them.

    FileNotFoundError when absent; ConfigError when it is a symlink, not
    ours, open to others, or larger than ``limit``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symlink; not following it") from None
        raise
    try:
        st = check_private_file(fd, path)
        if st.st_size > limit:
            raise ConfigError(f"{path} holds {st.st_size} bytes, more than {limit}")
        chunks = []
        left = limit + 1
        while left > 0:
            b = os.read(fd, min(left, 1 << 16))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise ConfigError(f"{path} holds more than {limit} bytes")
    return data
