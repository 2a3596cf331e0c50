"""The README's quick start, copied as written into a shell after ``snapstore up``.

It runs from this host's driver, the embedded cluster's head node, which
has no SMP: the client stages into a store node of the same machine.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from typing import Any

import pytest

from snapstore.clients import JobControl
from tests.launchers.conftest import ROOT, user_env

pytestmark = pytest.mark.cluster

MARKER = "<!-- quick start: tests/launchers/test_quick_start.py runs this block -->"


def quick_start_block() -> str:
    """The README's quick-start training block: the bash block after its marker comment."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER) :], re.S)
    assert block is not None, "no bash block after the quick-start marker"
    return block.group(1)


def test_readme_quick_start_saves_and_restores_from_the_head_host(store: Any) -> None:
    block = quick_start_block()
    assert "snapstore up" not in block and "snapstore down" not in block
    with tempfile.TemporaryDirectory(prefix="ss-quick-") as cwd:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=cwd,
            env=user_env(store),
            capture_output=True,
            text=True,
            timeout=300,
        )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    first, second = out.index("a fresh start"), out.index("restored step 49")
    assert first < second and "step 99 committed" in out[second:], out
    job = JobControl("quickstart", store=store)
    assert job.latest() == 99
    job.drop()
