"""Finding 9: ``snapstore export --job`` took any string as the job, so an absolute path
(or ``..``) escaped the persist root: export read "persisted steps" from wherever the
caller pointed. Job names are checked as everywhere else, in the CLI and in the tier.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from snapstore import persist
from snapstore.cli import main
from snapstore.errors import ConfigError
from tests.security.helpers import persist_step


@pytest.fixture
def dirs() -> Iterator[dict[str, str]]:
    base = tempfile.mkdtemp(prefix="ss-exp-", dir="/tmp")
    d = {n: os.path.join(base, n) for n in ("root", "outside", "out")}
    os.mkdir(d["root"])
    # A well-formed "job" outside the persist root, as an attacker-chosen path would be.
    persist_step(os.path.dirname(d["outside"]), "outside", 1, [{"w": torch.arange(8.0)}])
    yield d
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("job", ["ABS", "..", "../outside", "a/b", "", ".hidden", "x" * 65])
def test_export_refuses_a_job_name_that_is_a_path(
    dirs: dict[str, str], job: str, capsys: Any
) -> None:
    job = dirs["outside"] if job == "ABS" else job
    rc = main(
        [
            "export",
            "--job",
            job,
            "--source",
            "persisted",
            "--persist-dir",
            dirs["root"],
            "--to",
            dirs["out"],
        ]
    )
    assert rc == 2
    assert "job name" in capsys.readouterr().err
    assert not os.path.exists(dirs["out"])


def test_the_tier_itself_refuses_such_names(dirs: dict[str, str]) -> None:
    for job in (dirs["outside"], "..", "a/b"):
        with pytest.raises(ConfigError, match="job name"):
            persist.job_dir(dirs["root"], job)
        with pytest.raises(ConfigError, match="job name"):
            persist.newest_first(dirs["root"], job)


def test_a_valid_job_still_exports(dirs: dict[str, str]) -> None:
    persist_step(dirs["root"], "good", 3, [{"w": torch.arange(8.0)}])
    rc = main(
        [
            "export",
            "--job",
            "good",
            "--source",
            "persisted",
            "--persist-dir",
            dirs["root"],
            "--to",
            dirs["out"],
        ]
    )
    assert rc == 0
    got = torch.load(os.path.join(dirs["out"], "rank-0.pt"), weights_only=True)
    assert torch.equal(got["w"], torch.arange(8.0))
