"""Skipping unchanged tensors must not skip what an optimizer step wrote, fused or not."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from snapstore.clients.staging import Stager, region_keys


def _keys(tensors: list[torch.Tensor]) -> list[Any]:
    return region_keys([(t.detach(),) for t in tensors])


@pytest.mark.parametrize("kind", ["fused", "foreach", "for-loop"])
def test_an_optimizer_step_changes_the_keys_of_what_it_wrote(kind: str) -> None:
    Stager(deltas=True).close()  # installs the step hook, as every client with deltas does
    trained = torch.nn.Parameter(torch.randn(8))
    frozen = torch.nn.Parameter(torch.randn(8))  # in the optimizer, but no gradient
    # Neither asked for (None): on CPU tensors, torch picks the for-loop.
    fused = True if kind == "fused" else None
    foreach = True if kind == "foreach" else None
    opt = torch.optim.AdamW([trained, frozen], lr=1e-2, fused=fused, foreach=foreach)
    trained.grad = torch.randn(8)
    opt.step()  # creates the state
    state = [opt.state[trained]["exp_avg"], opt.state[trained]["exp_avg_sq"]]
    before = _keys([trained, *state]), _keys([frozen])
    trained.grad = torch.randn(8)
    opt.step()
    after = _keys([trained, *state]), _keys([frozen])
    changed = [a != b for a, b in zip(before[0], after[0], strict=True)]
    assert changed == [True, True, True], kind  # a stale copy otherwise
    assert before[1] == after[1]  # a frozen parameter still skips its copy
