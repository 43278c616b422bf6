"""Callbacks that keep the replicas identical: a check that they are, and rank 0's buffers
broadcast.

The run's other callbacks (progress, metrics, checkpoints: rank 0's files)
are in ``run/callbacks.py``; ``runner`` registers them all, in the order of
the work after a step: check, report, record, save.
"""

from __future__ import annotations

import hashlib

from ddptrain.training.trainer import Callback


class ReplicaDivergence(RuntimeError):
    """The ranks' parameters or buffers are no longer identical."""

    all_ranks = True


def state_digest(model):
    """A short hash of the model's parameters and buffers: equal on every rank, or a replica
    diverged."""
    h = hashlib.blake2b(model.params.tobytes(), digest_size=8)
    h.update(model.buffers.tobytes())
    return h.hexdigest()


def check_replicas(model, comm, step):
    """Stop with a clear error if the ranks' parameters or buffers are not bitwise identical. A
    collective."""
    digests = comm.allgather(state_digest(model))   # DDP
    if len(set(digests)) > 1:
        raise ReplicaDivergence(f"parameters or buffers differ across ranks at step {step}: "
                                + ", ".join(f"rank {r} {d}" for r, d in enumerate(digests)))


class ReplicaCheck(Callback):
    """Every ``every`` steps and at the end: every rank must hold the same parameters and
    buffers."""

    def __init__(self, every):
        self.every = every

    def on_step_end(self, trainer, end):
        if trainer.position.step % self.every == 0:
            check_replicas(trainer.model, trainer.comm, trainer.position.step)

    def on_fit_end(self, trainer):
        check_replicas(trainer.model, trainer.comm, trainer.position.step)


class BroadcastBuffers(Callback):
    """After every step, rank 0's buffers on every rank: what plain PyTorch DDP does
    (``broadcast_buffers``).

    For ``--batchnorm local``, where each rank's running statistics come from
    its own rows: the replicas stay identical, with rank 0's statistics.
    """

    def on_step_end(self, trainer, end):
        trainer.comm.bcast_(trainer.model.buffers)   # DDP
