"""Ray Train + snapstore: a DDP job that survives worker crashes and node losses, bitwise.

Run it against a running store (``snapstore up``)::

    python docs/examples/ray_train_example.py --steps 40

It trains a small model with Ray Train's TorchTrainer over gloo, one worker
per store node (:func:`snapstore.clients.ray_train.one_rank_per_node`), and a
snapshot every step. There is no failure handling in it: when a worker
crashes or a node is lost with its workers, Ray Train restarts the worker
group (``FailureConfig``) on the surviving and replacement nodes, every
worker restores the last committed step and trains on; the store ends the
failed group's pending steps and rebuilds a lost node's ranks from parity
onto the nodes their new workers run on. It prints the final model's
digest; tests/launchers/test_ray_train.py kills a worker and then a whole
node while it runs and compares that digest with a run without failures.

It trains the same model on the same data as docs/examples/torchrun_ddp.py,
so the same job launched by torchrun or by Ray Train ends in the same bits
(the tests compare both with one run without failures).

DDP runs with ``find_unused_parameters=True``: DDP then keeps the gradient
buckets of its first iteration instead of rebuilding them after it, so a
restarted group reduces gradients in the same order as the uninterrupted
one, and the result is the same to the bit.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from typing import Any


def _digest(model: Any, opt: Any) -> str:
    """SHA-256 over the parameters and the optimizer state, bitwise."""
    import torch

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for pid, st in sorted(opt.state_dict()["state"].items()):
        for name, t in sorted(st.items()):
            h.update(f"{pid}.{name}".encode())
            h.update(torch.as_tensor(t).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import torch
    import torch.nn.functional as F
    from ray import train
    from ray.train.torch import prepare_model

    from snapstore.clients.ray_train import RayTrainSnapshots

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    model = prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": True})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rank = train.get_context().get_world_rank()
    snaps = RayTrainSnapshots(config["job"], rundir=config["rundir"])

    def state() -> dict[str, Any]:
        return {"model": net.state_dict(), "optim": opt.state_dict()}

    def load(saved: dict[str, Any]) -> None:
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optim"])

    # Every worker restores, every time the loop starts (0: a fresh job).
    start = snaps.restore(on_restore=load)
    saved = None
    for step in range(start, config["steps"]):
        g = torch.Generator().manual_seed(step * 1000 + rank)  # the data is a function of the step
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 8, (16,), generator=g)
        F.cross_entropy(model(x), y).backward()
        snaps.wait_staged()  # the previous step's copy is done: parameters may change
        opt.step()
        opt.zero_grad()
        saved = snaps.save(step, state())  # RestoreRequiredError ends the worker: let it
        time.sleep(config["pause"])
    if saved is not None:
        saved.result(120)  # the last step is committed before the workers report
    metrics = {"digest": _digest(net, opt), "start": start}
    if rank == 0:  # the trained model goes to Ray Train's storage, as any final checkpoint
        with tempfile.TemporaryDirectory() as d:
            torch.save(net.state_dict(), os.path.join(d, "model.pt"))
            train.report(metrics, checkpoint=train.Checkpoint.from_directory(d))
    else:
        train.report(metrics)
    snaps.close()


def run(
    job: str,
    rundir: str | None = None,
    steps: int = 40,
    workers: int | None = None,
    pause: float = 0.0,
    max_failures: int = 3,
) -> dict[str, Any]:
    """Train ``steps`` steps on one worker per store node; return rank 0's final metrics."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from snapstore.clients.ray_train import one_rank_per_node

    with tempfile.TemporaryDirectory(prefix="raytrain-") as tmp:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"job": job, "rundir": rundir, "steps": steps, "pause": pause},
            scaling_config=one_rank_per_node(workers, rundir=rundir),
            run_config=RunConfig(
                name=job,
                storage_path=tmp,  # Ray Train's own files; snapshots live in the store
                failure_config=FailureConfig(max_failures=max_failures),
            ),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        return dict(result.metrics)


def main() -> None:
    import snapstore

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", default="raytrain-ddp")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workers", type=int, default=None, help="[one per alive store node]")
    p.add_argument("--runtime-dir", default=None)
    a = p.parse_args()
    snapstore.connect(a.runtime_dir).connect_ray()
    got = run(a.job, a.runtime_dir, a.steps, a.workers)
    print(f"final digest {got['digest']} (this run started at step {got['start']})")


if __name__ == "__main__":
    main()
