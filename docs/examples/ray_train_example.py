"""Ray Train + snapstore: a DDP job on CPU that survives a worker crash and resumes bitwise.

Run it against a running store (``snapstore up``)::

    python docs/examples/ray_train_example.py --steps 20 --fail-at 8

It trains the same small model twice with Ray Train's TorchTrainer (2
workers, gloo): once undisturbed, once with rank 0 crashing at ``--fail-at``
on the first attempt. Ray Train restarts the worker group
(``FailureConfig(max_failures=1)``), every worker restores the last
committed snapstore step and trains on. The final weights are compared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from typing import Any


def _digest(model: Any) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy())
    return h.hexdigest()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import torch
    import torch.nn.functional as F
    from ray import train
    from ray.train.torch import prepare_model

    from snapstore.clients.ray_train import RayTrainSnapshots

    torch.manual_seed(0)
    model = prepare_model(
        torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rank = train.get_context().get_world_rank()
    snaps = RayTrainSnapshots(config["job"], rundir=config["rundir"])

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optim": opt.state_dict()}

    start = snaps.restore(into=state(), on_restore=lambda s: opt.load_state_dict(s["optim"]))
    for step in range(start, config["steps"]):
        g = torch.Generator().manual_seed(step * 100 + rank)
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 8, (16,), generator=g)
        F.cross_entropy(model(x), y).backward()
        snaps.wait_staged()
        opt.step()
        opt.zero_grad()
        saved = snaps.save(step, state())
        if step == config["steps"] - 1:
            saved.result(60)  # the last step is committed before the worker reports
        marker = config.get("fail_marker")
        if rank == 0 and step == config.get("fail_at") and marker and not os.path.exists(marker):
            open(marker, "w").close()  # the crash must happen once only
            os._exit(1)  # a hard crash, as an OOM kill would be
    if rank == 0:
        # The example runs on one host (the embedded cluster): a file is the
        # simplest way back to the driver.
        with open(config["result_file"], "w") as f:
            json.dump({"digest": _digest(model), "start": start}, f)
    snaps.close()


def run(job: str, rundir: str | None, steps: int, fail_at: int | None) -> dict[str, Any]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory(prefix="raytrain-") as tmp:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "job": job,
                "rundir": rundir,
                "steps": steps,
                "fail_at": fail_at,
                "fail_marker": os.path.join(tmp, "crashed") if fail_at is not None else None,
                "result_file": os.path.join(tmp, "result.json"),
            },
            scaling_config=ScalingConfig(
                num_workers=2,
                resources_per_worker={"CPU": 1, "snapstore_node": 0.01},
                placement_strategy="SPREAD",
            ),
            run_config=RunConfig(
                name=job, storage_path=tmp, failure_config=FailureConfig(max_failures=1)
            ),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        with open(os.path.join(tmp, "result.json")) as f:
            return dict(json.load(f))


def main(
    rundir: str | None = None, steps: int = 20, fail_at: int = 8
) -> tuple[dict[str, Any], dict[str, Any]]:
    import snapstore

    store = snapstore.connect(rundir)
    store.connect_ray()
    clean = run("raytrain-clean", rundir, steps, None)
    crashed = run("raytrain-crash", rundir, steps, fail_at)
    print(f"uninterrupted: {clean['digest'][:16]}")
    print(
        f"with a crash at step {fail_at}: {crashed['digest'][:16]} (resumed at step "
        f"{crashed['start']})"
    )
    print("bitwise equal" if clean["digest"] == crashed["digest"] else "DIFFERENT")
    return clean, crashed


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--fail-at", type=int, default=8)
    p.add_argument("--runtime-dir", default=None)
    a = p.parse_args()
    main(a.runtime_dir, a.steps, a.fail_at)
