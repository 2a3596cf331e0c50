"""Hugging Face Trainer + snapstore: a GPT-2 fine-tune that is SIGKILLed and resumes bitwise.

Run it against a running store (``snapstore up``)::

    python docs/examples/hf_trainer.py --steps 12 --kill-at 5

It trains a small GPT-2 (built from a config: nothing is downloaded) with
:class:`snapstore.clients.hf.SnapstoreTrainer`, which snapshots the whole
training state every step. Three trainer processes run one after the other:

1. undisturbed, ``--steps`` steps (job ``<job>-clean``);
2. SIGKILLed right after it started saving step ``--kill-at`` (job ``<job>``);
3. started again with the same code and arguments, as a launcher would: its
   ``trainer.train()`` resumes from the last committed step of ``<job>``.

The final model and optimizer states of 1 and 3 are compared bitwise. The
model keeps GPT-2's dropout, the data is shuffled and the run crosses
epochs, so the RNG states, the data position and the scheduler all have to
come back exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import queue
import signal
import tempfile
import time
import uuid
from typing import Any

SAMPLES, SEQ, VOCAB = 24, 16, 128

# The trainer processes fork from a server process that imported torch and transformers
# once: each start costs a fork, not those imports again.
PRELOAD = ["__main__", "torch", "transformers.trainer", "snapstore.clients.hf"]


def _digest(tree: Any) -> str:
    import torch

    h = hashlib.sha256()

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, dict):
            for k in sorted(obj, key=str):
                walk(obj[k], f"{path}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}/{i}")
        elif isinstance(obj, torch.Tensor):
            h.update(path.encode())
            h.update(obj.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{path}={obj!r}".encode())

    walk(tree, "")
    return h.hexdigest()


def train(job: str, rundir: str | None, steps: int, kill_at: int | None, out: Any) -> None:
    """One trainer process: build, train (resuming if the store has the job), report."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

    from snapstore.clients import Client
    from snapstore.clients.hf import SnapstoreTrainer

    torch.set_num_threads(1)

    class Samples(torch.utils.data.Dataset):
        """Fixed token sequences (labels = inputs: causal LM)."""

        def __init__(self) -> None:
            g = torch.Generator().manual_seed(7)
            self.ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=g)

        def __len__(self) -> int:
            return SAMPLES

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    class KillAt(TrainerCallback):
        """A hard crash right after the snapshot of ``step`` was started (copy in flight)."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)  # dropout 0.1 everywhere, as GPT-2 has
    with tempfile.TemporaryDirectory(prefix="hf-example-") as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=steps,
            per_device_train_batch_size=4,  # 6 steps per epoch: the run crosses epochs
            learning_rate=1e-3,
            warmup_steps=2,
            seed=0,
            save_strategy="no",  # snapstore saves every step instead
            report_to="none",
            logging_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        client = Client(
            job,
            rank=args.process_index,
            world_size=args.world_size,
            rundir=rundir,
            node_id=_store_node(rundir),
        )
        trainer = SnapstoreTrainer(
            model=model, args=args, train_dataset=Samples(), snapshots=client
        )
        if kill_at is not None:
            trainer.add_callback(KillAt())  # after the snapshot callback: killed mid-save
        trainer.train()
        assert trainer.optimizer is not None
        state = {"model": model.state_dict(), "optim": trainer.optimizer.state_dict()}
        out.put(
            {
                "digest": _digest(state),
                "resumed_from": trainer.restored_step,
                "global_step": trainer.state.global_step,
                "failed_steps": trainer.snapshot_callback.failed_steps,
            }
        )
        client.close()


def _store_node(rundir: str | None) -> str:
    """A store node to stage on: this example runs on the store's own host, beside it."""
    import snapstore

    store = snapstore.connect(rundir)
    store.connect_ray()
    return next(n["node_id"] for n in store.nodes() if n["alive"])


def run(job: str, rundir: str | None, steps: int, kill_at: int | None = None) -> dict[str, Any]:
    """Run one trainer process; its report, or ``{"killed": True}`` if it was killed."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    out = ctx.Queue()
    proc = ctx.Process(target=train, args=(job, rundir, steps, kill_at, out))
    proc.start()
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            try:
                return dict(out.get(timeout=1.0))  # read before joining: no full-pipe stall
            except queue.Empty:
                if not proc.is_alive():
                    break
        if proc.exitcode == -signal.SIGKILL:
            return {"killed": True}
        raise RuntimeError(f"the trainer process ended with exit code {proc.exitcode}")
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=30)


def main(
    rundir: str | None = None, steps: int = 12, kill_at: int = 5, job: str | None = None
) -> dict[str, dict[str, Any]]:
    job = job or f"hf-example-{uuid.uuid4().hex[:8]}"
    clean = run(f"{job}-clean", rundir, steps)
    killed = run(job, rundir, steps, kill_at=kill_at)
    if not killed.get("killed"):
        raise RuntimeError(f"the trainer was to be killed at step {kill_at}: {killed}")
    resumed = run(job, rundir, steps)
    print(f"uninterrupted:                 {clean['digest'][:16]}")
    print(
        f"killed at step {kill_at}, resumed from {resumed['resumed_from']}: "
        f"{resumed['digest'][:16]}"
    )
    print("bitwise equal" if clean["digest"] == resumed["digest"] else "DIFFERENT")
    return {"clean": clean, "resumed": resumed}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--kill-at", type=int, default=5)
    p.add_argument("--runtime-dir", default=None)
    p.add_argument("--json", action="store_true", help="print the results as JSON last")
    a = p.parse_args()
    results = main(a.runtime_dir, a.steps, a.kill_at)
    if a.json:
        print(json.dumps(results))
