"""--reproducible under a real MPI launcher: P ranks give bitwise the bits of one process, at every
step. Run under mpiexec (tests/test_mpi.py runs tests/mpi with 2, 3 and 4 ranks).

Each test trains the one-process reference itself, in the same process, with
``SerialComm``, and compares bytes: a hash of the parameters and buffers after
every step, the step's loss and gradient norm as exact floats, and every array
of the final checkpoint (parameters, buffers, optimiser state).
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ddptrain.distributed.comm import SerialComm
from ddptrain.run import checkpoint
from ddptrain.run.config import Config
from ddptrain.run.runner import run_training
from ddptrain.training.trainer import Callback

pytestmark = pytest.mark.mpi(min_size=2)


class StepHashes(Callback):
    """After every step: a hash of the parameters and buffers, and the step's totals exactly."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, trainer, end):
        model, totals = trainer.model, end.totals
        digest = hashlib.sha256(model.params.tobytes() + model.buffers.tobytes()).hexdigest()
        self.steps.append((digest, float(totals.loss_sum).hex(), totals.correct,
                           float(totals.grad_norm).hex()))


def train(comm, config, run_dir):
    hashes = StepHashes()
    config = Config(**{**config.to_dict(), "run_dir": str(run_dir)})
    run_training(config, comm, quiet=True, callbacks=[hashes])
    final = checkpoint.newest_valid(Path(run_dir) / "checkpoints")
    arrays = {f"params/{k}": v for k, v in final.params.items()}
    arrays.update({f"buffers/{k}": v for k, v in final.buffers.items()})
    arrays.update({f"optimizer/{k}": v for k, v in final.optimizer.items()
                   if isinstance(v, np.ndarray)})
    metrics = [json.loads(line) for line
               in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return hashes.steps, {k: v.tobytes() for k, v in arrays.items()}, metrics


# Batch 29 splits unevenly over 2, 3 and 4 ranks, and each epoch ends on a short batch. Layers of
# 300 and 140 columns are 3 and 2 blocks of columns (nn/columns.py), shared out by rank count.
CASES = {
    "mlp-bn-dropout-float32": dict(model="64-300-bn-drop0.2-140-10"),
    "adam-clip-sharded-float64": dict(model="64-300-140-10", dtype="float64", optimizer="adam",
                                      lr=0.01, clip_grad_norm=0.5, shard_optimizer=True),
    "overlap-allreduce": dict(model="64-300-140-10", overlap_allreduce=True, bucket_mb=0.001),
    # 141,814 parameters: three chunks of the gradient norm, each squared by the rank whose slice
    # of the shared-memory exchange holds it
    "three-norm-chunks-clipped": dict(model="64-1100-64-10", clip_grad_norm=0.5, epochs=1),
    "accumulate-allreduce-exchange": dict(model="64-300-drop0.1-10", accumulate=2,
                                          exchange="allreduce"),
    "cnn-bn": dict(model="conv4k3p1-bn-maxpool2-flatten-150-10", epochs=1),
    # 8 rows a group: each rank trains its rows in fixed groups (training/groups.py)
    "cnn-bn-in-groups": dict(model="conv4k3p1-bn-maxpool2-flatten-150-drop0.2-10",
                             batch_size=96, virtual_shards=12),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_p_ranks_give_the_bits_of_one_process_at_every_step(comm, shared_dir, dataset, case):
    options = dict(data=dataset, epochs=2, batch_size=29, lr=0.1, momentum=0.9, seed=5,
                   log_every=1000, threads=1, reproducible=True)
    config = Config(**{**options, **CASES[case]})
    steps, arrays, metrics = train(comm, config, shared_dir / f"{case}-p{comm.size}")
    one_steps, one_arrays, one_metrics = train(
        SerialComm(), config, shared_dir / f"{case}-one-{comm.rank}")
    assert len(steps) == len(one_steps) > 0
    for step, (mine, theirs) in enumerate(zip(steps, one_steps), 1):
        assert mine == theirs, f"step {step} differs on {comm.size} ranks"
    assert arrays.keys() == one_arrays.keys()
    for name in arrays:
        assert arrays[name] == one_arrays[name], name
    for mine, theirs in zip(metrics, one_metrics):
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            assert mine[key] == theirs[key], key
