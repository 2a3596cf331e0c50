"""The staged-buffer trailer (slot.py) and the store's settings (config.py).

A staged buffer must describe itself: restore splits it without asking
anyone, and anything that does not carry a consistent trailer is refused
with FormatError. Settings follow one rule, argument over ``SNAPSTORE_*``
environment over default, and a bad value is a ConfigError that names it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapstore.config import StoreConfig, check_job_name, format_size, parse_size
from snapstore.errors import ConfigError, FormatError
from snapstore.format.frame import TRAILER_SIZE, frame_size, read_frame, write_trailer

# -- slot -----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=300),
    manifest=st.binary(max_size=200),
    step=st.integers(0, (1 << 64) - 1),
    spare=st.integers(0, 100),
)
def test_trailer_round_trips(data: bytes, manifest: bytes, step: int, spare: int) -> None:
    size = frame_size(len(data), len(manifest))
    buf = np.full(size + spare, 0xEE, dtype=np.uint8)  # a slot larger than the snapshot
    buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    assert write_trailer(buf, len(data), manifest, step) == size == len(data) + len(manifest) + 32
    assert TRAILER_SIZE == 32
    framed = read_frame(buf, size)
    assert framed.data.tobytes() == data
    assert np.shares_memory(framed.data, buf) or not data  # data is a view, not a copy
    assert framed.manifest == manifest
    assert framed.step == step
    assert (buf[size:] == 0xEE).all(), "wrote past the snapshot"


def test_write_trailer_refuses_a_slot_too_small() -> None:
    buf = np.zeros(100, dtype=np.uint8)
    with pytest.raises(ValueError, match="cannot hold"):
        write_trailer(buf, 60, b"x" * 9, 1)  # 60 + 9 + 32 = 101


def _framed(data_n: int = 40, manifest: bytes = b"manifest", step: int = 9) -> np.ndarray:
    buf = np.zeros(frame_size(data_n, len(manifest)), dtype=np.uint8)
    write_trailer(buf, data_n, manifest, step)
    return buf


def test_read_frame_refuses_a_size_without_room_for_a_trailer() -> None:
    buf = _framed()
    for size in (0, TRAILER_SIZE - 1, len(buf) + 1):
        with pytest.raises(FormatError, match="trailer"):
            read_frame(buf, size)


def test_read_frame_refuses_bad_magic() -> None:
    buf = _framed()
    buf[-TRAILER_SIZE] ^= 0xFF
    with pytest.raises(FormatError, match="magic"):
        read_frame(buf, len(buf))


@pytest.mark.parametrize("delta", [-1, 1, 64])
def test_read_frame_refuses_sizes_that_disagree_with_the_trailer(delta: int) -> None:
    buf = _framed()
    # The same trailer read at another end: its lengths no longer add up.
    bigger = np.zeros(len(buf) + 64, dtype=np.uint8)
    at = max(0, delta)
    bigger[at : at + len(buf)] = buf
    with pytest.raises(FormatError):
        read_frame(bigger, len(buf) + delta)


def test_read_frame_refuses_trailer_lengths_that_do_not_add_up() -> None:
    buf = _framed()
    # Bump the recorded manifest length (bytes 16..24 of the trailer, little-endian).
    buf[len(buf) - TRAILER_SIZE + 16] += 1
    with pytest.raises(FormatError, match="trailer says"):
        read_frame(buf, len(buf))


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=120), size=st.integers(-5, 130))
def test_read_frame_on_random_bytes_is_format_error_or_consistent(raw: bytes, size: int) -> None:
    buf = np.frombuffer(raw, dtype=np.uint8)
    try:
        framed = read_frame(buf, size)
    except FormatError:
        return
    assert len(framed.data) + len(framed.manifest) + TRAILER_SIZE == size


# -- sizes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("512", 512),
        ("1b", 1),
        ("1B", 1),
        ("1k", 1 << 10),
        ("1K", 1 << 10),
        ("1KB", 1000),
        ("1KiB", 1 << 10),
        ("2M", 2 << 20),
        ("2mb", 2_000_000),
        ("2MiB", 2 << 20),
        ("1.5g", 3 << 29),
        ("1GB", 10**9),
        ("1gib", 1 << 30),
        ("1T", 1 << 40),
        ("1TB", 10**12),
        ("1TiB", 1 << 40),
        (" 512 MiB ", 512 << 20),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size_units(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", " ", "abc", "MiB", "-1", "1.5.2", "1 XB", "1e3", "1 2", "1PiB", -5]
)
def test_parse_size_errors_name_what_and_show_an_example(text: str | int) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(text, "memory_per_node")
    msg = str(info.value)
    assert msg.startswith("memory_per_node:")
    assert repr(text) in msg or str(text) in msg
    if isinstance(text, str):
        assert "e.g. 512MiB" in msg


def test_format_size() -> None:
    assert format_size(0) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 << 30) == "3.0 GiB"
    assert format_size(5 << 50) == "5120.0 TiB"


# -- settings -------------------------------------------------------------------


def test_defaults_need_no_environment() -> None:
    cfg = StoreConfig.resolve(env={})
    assert cfg == StoreConfig()
    assert (cfg.k, cfg.m, cfg.nodes, cfg.backend, cfg.transport) == (
        3,
        1,
        4,
        "isa_l_rs_vand",
        "auto",
    )


def test_argument_over_environment_over_default() -> None:
    env = {"SNAPSTORE_K": "4", "SNAPSTORE_NODES": "6", "SNAPSTORE_TRANSPORT": "tcp"}
    cfg = StoreConfig.resolve(env=env, k=2, m=None)
    assert cfg.k == 2  # argument beats environment
    assert cfg.nodes == 6  # environment beats default
    assert cfg.transport == "tcp"
    assert cfg.m == 1  # None means "not given": default
    assert StoreConfig.resolve(env=env).k == 4


def test_every_field_can_come_from_the_environment() -> None:
    env = {
        "SNAPSTORE_K": "5",
        "SNAPSTORE_M": "2",
        "SNAPSTORE_NODES": "8",
        "SNAPSTORE_MEMORY_PER_NODE": "2GiB",
        "SNAPSTORE_BACKEND": "isa_l_rs_cauchy",
        "SNAPSTORE_HEARTBEAT_INTERVAL": "0.1",
        "SNAPSTORE_FAILURE_TIMEOUT": "0.5",
        "SNAPSTORE_REPROTECT_DELAY": "0",
        "SNAPSTORE_SAVE_TIMEOUT": "60",
        "SNAPSTORE_RESEND_INTERVAL": "0.5",
        "SNAPSTORE_STATUS_AFTER": "3",
        "SNAPSTORE_RELAY_GROUPS": "4",
        "SNAPSTORE_TRANSPORT": "tcp",
        "SNAPSTORE_NAMESPACE": "ns",
        "SNAPSTORE_OBJECT_STORE_MEMORY": "200M",
        "SNAPSTORE_CPUS_PER_NODE": "3",
        "SNAPSTORE_PERSIST_DIR": "/srv/ckpt",
        "SNAPSTORE_PERSIST_EVERY": "50",
        "SNAPSTORE_PERSIST_KEEP": "2",
        "SNAPSTORE_PERSIST_BANDWIDTH": "64MiB",
        "SNAPSTORE_PERSIST_TIMEOUT": "120",
        "SNAPSTORE_UNRELATED": "ignored",
        "SNAPSTORE_EXTRA": "not a field one can set",
    }
    cfg = StoreConfig.resolve(env=env)
    assert cfg.to_dict() == {
        "k": 5,
        "m": 2,
        "nodes": 8,
        "memory_per_node": 2 << 30,
        "backend": "isa_l_rs_cauchy",
        "heartbeat_interval": 0.1,
        "failure_timeout": 0.5,
        "reprotect_delay": 0.0,
        "save_timeout": 60.0,
        "resend_interval": 0.5,
        "status_after": 3.0,
        "relay_groups": 4,
        "transport": "tcp",
        "namespace": "ns",
        "object_store_memory": 200 << 20,
        "cpus_per_node": 3,
        "persist_dir": "/srv/ckpt",
        "persist_every": 50,
        "persist_keep": 2,
        "persist_bandwidth": 64 << 20,
        "persist_timeout": 120.0,
        "extra": {},
    }
    assert StoreConfig.from_dict({**cfg.to_dict(), "future_field": 1}) == cfg


def test_process_environment_is_the_default_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPSTORE_NODES", "7")
    assert StoreConfig.resolve().nodes == 7
    assert StoreConfig.resolve(nodes=2).nodes == 2


@pytest.mark.parametrize("value", ["auto", "AUTO", " auto "])
def test_memory_auto_means_zero(value: str) -> None:
    assert StoreConfig.resolve(env={"SNAPSTORE_MEMORY_PER_NODE": value}).memory_per_node == 0
    assert StoreConfig.resolve(env={}, memory_per_node=value).memory_per_node == 0


@pytest.mark.parametrize(
    ("where", "changes", "field"),
    [
        ("env", {"SNAPSTORE_K": "three"}, "k"),
        ("env", {"SNAPSTORE_K": "2.5"}, "k"),
        ("env", {"SNAPSTORE_NODES": ""}, "nodes"),
        ("env", {"SNAPSTORE_HEARTBEAT_INTERVAL": "fast"}, "heartbeat_interval"),
        ("env", {"SNAPSTORE_MEMORY_PER_NODE": "lots"}, "memory_per_node"),
        ("env", {"SNAPSTORE_OBJECT_STORE_MEMORY": "-1"}, "object_store_memory"),
        ("arg", {"k": 0}, "k"),
        ("arg", {"m": -1}, "m"),
        ("arg", {"k": 30, "m": 3}, "32"),
        ("arg", {"nodes": 0}, "nodes"),
        ("arg", {"memory_per_node": -1}, "memory_per_node"),
        ("arg", {"transport": "udp"}, "transport"),
        ("arg", {"heartbeat_interval": 2.0}, "heartbeat_interval"),
        ("arg", {"heartbeat_interval": 0}, "heartbeat_interval"),
        ("arg", {"failure_timeout": 0.1}, "failure_timeout"),
        ("env", {"SNAPSTORE_HEARTBEAT_INTERVAL": "nan"}, "heartbeat_interval"),
        ("arg", {"reprotect_delay": -1}, "reprotect_delay"),
        ("arg", {"cpus_per_node": "many"}, "cpus_per_node"),
        ("arg", {"persist_every": -1}, "persist_every"),
        ("arg", {"persist_keep": 0}, "persist_keep"),
        ("env", {"SNAPSTORE_PERSIST_BANDWIDTH": "fast"}, "persist_bandwidth"),
        ("arg", {"persist_timeout": 0}, "persist_timeout"),
        ("arg", {"persist_dir": "s3://key:secret@bucket/x"}, "persist_dir"),
        ("arg", {"persist_dir": "memory://x"}, "persist_dir"),
        ("arg", {"persist_dir": "://x"}, "persist_dir"),
    ],
)
def test_invalid_values_are_config_errors_naming_the_field(
    where: str, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        if where == "env":
            StoreConfig.resolve(env=changes)
        else:
            StoreConfig.resolve(env={}, **changes)
    assert field in str(info.value)


def test_unknown_setting_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown settings: bogus, nope"):
        StoreConfig.resolve(env={}, nope=1, bogus=2)


@pytest.mark.parametrize("value", [-1.0, 0.0])
def test_save_timeout_must_be_positive(value: float) -> None:
    with pytest.raises(ConfigError, match="save_timeout"):
        StoreConfig.resolve(env={}, save_timeout=value)


def test_fractional_integer_argument_is_refused() -> None:
    with pytest.raises(ConfigError, match="k"):
        StoreConfig.resolve(env={}, k=3.5)


# -- job names ------------------------------------------------------------------


@pytest.mark.parametrize("job", ["a", "0", "job-1", "A.b_c", "x" * 64])
def test_tame_job_names_pass(job: str) -> None:
    assert check_job_name(job) == job


@pytest.mark.parametrize(
    "job",
    ["", "-a", ".a", "_a", "a/b", "a b", "x" * 65, "ü", "a\x00", "../a", 5, None],
)
def test_other_job_names_are_config_errors(job: Any) -> None:
    with pytest.raises(ConfigError, match="job name"):
        check_job_name(job)


@pytest.mark.parametrize("job", ["job\n", "x" * 64 + "\n"])
def test_job_name_with_trailing_newline_is_refused(job: str) -> None:
    with pytest.raises(ConfigError):
        check_job_name(job)
