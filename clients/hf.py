"""Hugging Face Trainer: a snapshot every optimizer step, and resumes from the store.

::

    from snapstore.clients.hf import SnapstoreTrainer

    args = TrainingArguments(output_dir=..., save_strategy="no", ...)
    trainer = SnapstoreTrainer(model=model, args=args, train_dataset=ds, snapshots="gpt2-ft")
    trainer.train()  # from the job's last committed step if there is one, else from scratch

``snapshots`` is a job name (a :class:`~snapstore.clients.Client` is made
with ``rank=args.process_index`` and ``world_size=args.world_size``) or a
Client. Every optimizer step :class:`SnapstoreCallback` saves the model's
state dict, the optimizer, the LR scheduler, the gradient scaler (if any),
every RNG state (Python, NumPy, torch CPU and each CUDA device) and the
trainer state (global step, epoch, log history, stateful callbacks) as one
snapstore step numbered ``state.global_step``. The copy is lazy: it runs
while the next batch is fetched and forward and backward run, and is
waited for before the optimizer changes the parameters (``on_pre_optimizer_step``;
before the next forward instead when the model has persistent buffers,
such as BatchNorm statistics, that a forward updates).

Resuming goes through the Trainer's own resume path, fed from the store
instead of a checkpoint directory: ``train()`` restores the last committed
step, and the Trainer loads the model, optimizer, scheduler, scaler and
RNG states from it (``_load_*`` hooks), reads the trainer state from a
JSON file in a private temporary directory (its only file), and skips the
batches already trained in the current epoch, as it does after
``resume_from_checkpoint``. A resumed run continues bitwise where the
killed one stopped when training is deterministic (see docs/client.md,
"Bitwise resume").

A launcher (torchrun, accelerate launch) restarts every process after a
failure; each calls ``train()`` again and resumes. A save the store refused
because the job restarted raises RestoreRequiredError out of ``train()``:
let the process fail. Other failed saves are logged and counted in
:attr:`SnapstoreCallback.failed_steps`; training goes on, and the previous
committed step stays what a restart resumes from.

Supported: one process, or DDP (each rank saves its own copy; pass a Client
with ``dp=`` to store replicated state once). FSDP and DeepSpeed shard
state their own way: use :mod:`snapstore.clients.dcp` with them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import tempfile
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState

from snapstore.clients.client import Client
from snapstore.clients.future import SaveFuture
from snapstore.errors import RestoreRequiredError, SnapshotNotFoundError, SnapstoreError

__all__ = ["SnapstoreCallback", "SnapstoreTrainer", "rng_states", "set_rng_states"]

logger = logging.getLogger(__name__)


def rng_states() -> dict[str, Any]:
    """Every RNG state a training step may draw from: Python, NumPy, torch CPU, each CUDA device."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.random.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Set the RNG states :func:`rng_states` returned (as restored from a snapshot)."""
    random.setstate(_as_tuples(states["python"]))
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.random.set_rng_state_all(list(states["cuda"]))


def _as_tuples(obj: Any) -> Any:
    """random.setstate wants tuples all the way down."""
    if isinstance(obj, (list, tuple)):
        return tuple(_as_tuples(x) for x in obj)
    return obj


def _exported(callbacks: list[Any]) -> dict[str, Any]:
    """``TrainerState.stateful_callbacks`` now: each ExportableState's ``state()`` by class
    name (a list when several share a class), as the Trainer writes them into a checkpoint."""
    out: dict[str, Any] = {}
    for cb in callbacks:
        if not isinstance(cb, ExportableState):
            continue
        name = type(cb).__name__
        if name in out:
            prev = out[name]
            out[name] = [*prev, cb.state()] if isinstance(prev, list) else [prev, cb.state()]
        else:
            out[name] = cb.state()
    return out


def _forward_changes_state(model: torch.nn.Module) -> bool:
    """Whether a forward may change the model's state dict: persistent buffers
    (BatchNorm's running statistics) are updated in forward, parameters are not."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    return any(k in buffers and k not in params for k in model.state_dict())


class SnapstoreCallback(TrainerCallback):
    """Saves the training state as snapstore step ``state.global_step`` after every
    optimizer step. See the module docstring for what is saved and when it is copied.

    ``trainer``: lets the snapshot include the gradient scaler and every stateful
    callback's state (:class:`SnapstoreTrainer` passes itself). ``lazy=False``
    copies synchronously in ``on_step_end``.
    """

    def __init__(self, client: Client, *, trainer: Trainer | None = None, lazy: bool = True):
        self.client = client
        self.trainer = trainer
        self.lazy = lazy
        self.failed_steps: list[int] = []
        """Steps whose save failed (logged; the previous committed step is intact)."""
        self._last: SaveFuture | None = None
        self._wait_before_forward: bool | None = None

    # -- events --------------------------------------------------------------------------

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._wait_before_forward:
            self.client.wait_staged()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.client.wait_staged()  # the optimizer is about to change the saved tensors

    def on_step_end(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None or optimizer is None:
            raise SnapstoreError("SnapstoreCallback needs the Trainer's model and optimizer")
        if self._wait_before_forward is None:
            self._wait_before_forward = _forward_changes_state(model)
        self._note_failure()
        step = int(state.global_step)
        snapshot = self.snapshot(state, control, model, optimizer, lr_scheduler)
        try:
            self._last = self.client.save(step, snapshot, lazy=self.lazy)
        except RestoreRequiredError:
            raise
        except SnapstoreError as e:  # no memory for it, the store unreachable...: go on
            self._last = None
            self.failed_steps.append(step)
            logger.warning("snapshot of step %d failed: %s", step, e)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The last step is committed (or known to have failed) before ``train()`` returns."""
        self.client.wait_staged()
        last, self._last = self._last, None
        if last is None:
            return
        try:
            last.result(self.client.timeout)
        except RestoreRequiredError:
            raise
        except SnapstoreError as e:
            self.failed_steps.append(last.step)
            logger.warning("snapshot of step %d failed: %s", last.step, e)

    # -- what a snapshot holds ------------------------------------------------------------

    def snapshot(
        self, state: Any, control: Any, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any
    ) -> dict[str, Any]:
        """The state saved for one step: model, optimizer, scheduler, scaler, RNG, trainer state."""
        trainer_state = dataclasses.asdict(state)
        callbacks = self.trainer.callback_handler.callbacks if self.trainer is not None else []
        trainer_state["stateful_callbacks"] = _exported([*callbacks, control])
        out: dict[str, Any] = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
            "rng": rng_states(),
            "trainer_state": json.dumps(trainer_state, sort_keys=True),
        }
        scaler = getattr(getattr(self.trainer, "accelerator", None), "scaler", None)
        if scaler is not None:
            out["scaler"] = scaler.state_dict()
        return out

    def _note_failure(self) -> None:
        """The previous save, if it has failed by now: log it and go on."""
        last = self._last
        if last is None or not last.done():
            return
        try:
            last.result(0)
        except RestoreRequiredError:
            raise
        except SnapstoreError as e:
            self.failed_steps.append(last.step)
            logger.warning("snapshot of step %d failed: %s", last.step, e)


class SnapstoreTrainer(Trainer):
    """A Trainer that snapshots every step to snapstore and resumes from it.

    ``snapshots``: a job name, or a Client of this rank. ``lazy``: see
    :class:`SnapstoreCallback`. Other arguments are the Trainer's.
    """

    def __init__(self, *args: Any, snapshots: Client | str, lazy: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise SnapstoreError(
                "SnapstoreTrainer supports one process or DDP; FSDP and DeepSpeed shard the "
                "state their own way: save it through snapstore.clients.dcp instead"
            )
        if isinstance(snapshots, str):
            snapshots = Client(
                snapshots, rank=self.args.process_index, world_size=self.args.world_size
            )
        if (snapshots.rank, snapshots.world_size) != (
            self.args.process_index,
            self.args.world_size,
        ):
            raise ValueError(
                f"the client is rank {snapshots.rank} of {snapshots.world_size}, the Trainer's "
                f"process is {self.args.process_index} of {self.args.world_size}"
            )
        self.snapshots = snapshots
        self.snapshot_callback = SnapstoreCallback(snapshots, trainer=self, lazy=lazy)
        self.add_callback(self.snapshot_callback)
        self.restored_step: int | None = None
        """The step the last ``train()`` resumed from (None: it started fresh)."""
        self._restored: dict[str, Any] | None = None
        self._resume_dir: str | None = None

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """Train, resuming from the job's last committed snapstore step if there is one.

        ``resume_from_checkpoint``: None (default) resumes from the store (from
        scratch when the job has no committed step); False starts from scratch;
        a directory or True resumes from the Trainer's own checkpoint
        directories as the Trainer does.
        """
        if resume_from_checkpoint is False:
            return super().train(None, *args, **kwargs)
        if resume_from_checkpoint is not None:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        model = self._model()
        step, restored = -1, None
        with contextlib.suppress(SnapshotNotFoundError):  # nothing committed: a new job
            step, restored = self.snapshots.restore(into={"model": model.state_dict()})
        if restored is None:
            # From scratch, outside the except block: a training error is not chained to it.
            self.restored_step = None
            return super().train(None, *args, **kwargs)
        self.restored_step = step
        with tempfile.TemporaryDirectory(prefix="snapstore-hf-") as resume_dir:
            # The Trainer reads its state from a checkpoint directory's JSON file; every
            # other part comes from the restored snapshot through the _load_* hooks below.
            with open(os.path.join(resume_dir, TRAINER_STATE_NAME), "w", encoding="utf-8") as f:
                f.write(restored["trainer_state"])
            self._restored, self._resume_dir = restored, resume_dir
            try:
                return super().train(resume_dir, *args, **kwargs)
            finally:
                self._restored, self._resume_dir = None, None

    # -- the Trainer's resume hooks, fed from the restored snapshot -------------------------

    def _model(self) -> torch.nn.Module:
        if self.model is None:
            raise SnapstoreError("SnapstoreTrainer needs a model (or model_init)")
        return self.model

    def _from_store(self, checkpoint: str | None) -> dict[str, Any] | None:
        if checkpoint is None or checkpoint != self._resume_dir:
            return None
        return self._restored

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        restored = self._from_store(resume_from_checkpoint)
        if restored is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        (model if model is not None else self._model()).load_state_dict(restored["model"])

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        restored = self._from_store(checkpoint)
        if restored is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        if self.optimizer is None:
            raise SnapstoreError("the Trainer has no optimizer to load the restored state into")
        self.optimizer.load_state_dict(restored["optimizer"])
        if restored["scheduler"] is not None and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(restored["scheduler"])

    def _load_scaler(self, checkpoint: str | None) -> None:
        restored = self._from_store(checkpoint)
        if restored is None:
            super()._load_scaler(checkpoint)
            return
        scaler = getattr(self.accelerator, "scaler", None)
        if restored.get("scaler") is not None and scaler is not None:
            scaler.load_state_dict(restored["scaler"])

    def _load_rng_state(self, checkpoint: str | None) -> None:
        restored = self._from_store(checkpoint)
        if restored is None:
            super()._load_rng_state(checkpoint)
            return
        set_rng_states(restored["rng"])
