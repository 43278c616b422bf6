"""Training throughput of ddptrain against PyTorch on one CPU, and against the machine's GEMM limit.

One run measures, on the same model (default MLP 784-512-256-10, float32),
the same global batch sizes and the same thread budget (default: every core
this process may run on):

  ddptrain, 1 process        ddptrain's TrainStep with SerialComm, the budget as BLAS threads
  ddptrain, P ranks (MPI)    mpiexec -n P: TrainStep with the real MPIComm; BLAS threads per
                             rank chosen by ddptrain.threads.configure_blas_threads
  ddptrain, P ranks, no allreduce   the same ranks with the Allreduce skipped (a diagnostic:
                             what communication costs; its parameters drift apart)
  PyTorch, 1 process         an idiomatic loop: nn.Sequential, CrossEntropyLoss, SGD momentum 0.9,
                             torch.set_num_threads(budget)
  PyTorch DDP (gloo), P processes   the same loop wrapped in DistributedDataParallel, launched by
                             mpiexec, env:// rendezvous on 127.0.0.1, budget/P threads each

Every row runs in fresh processes, on real MNIST batches (``--data``; default:
ddptrain's own data file, prepared on first use) or random data of MNIST's
shape (``--data random``). Each rank holds its shard in memory as float32,
as ``python -m ddptrain`` does, and a ddptrain step is what the inner loop of
``Trainer._run_epoch`` does: gather this rank's rows of the global batch
chosen by ddptrain's sampler (``step.Batches``), then the very ``step.TrainStep``
that training runs (forward, loss, backward, gradient Allreduce, the Allreduce
of the step's loss and accuracy sums, the finite check, the SGD update); not
the callbacks (progress line, periodic replica check) or the evaluation: the
time-to-accuracy runs include those. PyTorch gathers the same rows by tensor
indexing. Warmup steps are excluded. The rows are run in ``--rounds`` rounds,
interleaved, with ``--repeats`` timed repetitions per launch: the table shows
the median and the range over all of them.

The GEMM limit is measured here too: the matrix products of one training step
(forward, weight gradients, input gradients but the first layer's) at a large
batch, in one process with every thread, and in P single-thread processes
running at the same time; the larger is the machine's limit.

Also reported: the fraction of step time spent in the gradient Allreduce
(timed around ``comm.allreduce_`` inside the step), where a ddptrain step's
time goes (matrix products, Allreduce, SGD update, ...), peak memory per rank
(ru_maxrss), the time to load a rank's shard from HDF5, to evaluate the test
set and to write a checkpoint, each against the time of one epoch, and the
wall time of ``mpiexec -n P python -m ddptrain`` until it reports 98% test
accuracy (scripts/time_to_accuracy.py).

PyTorch is an optional benchmark dependency, never needed by ddptrain:

    .venv/bin/pip install torch==2.13.0   # the project's machines have it on disk: no download

Without it the PyTorch rows are skipped (the output says so) and the ddptrain
rows still run. OpenBLAS reads OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE from the
environment; the header shows their values and the kernel that runs.

``--isa avx2`` limits the vector code of every library in every row to
AVX2 (OpenBLAS's and MKL's kernels, numpy's loops, PyTorch's ATen and
oneDNN kernels, through their environment variables): on an AVX-512 CPU it
measures what a CPU without AVX-512 would give, the same caches and memory
aside. The notes under the table say which code each side ran.
"""

# The package, one job to a module (this docstring is the command's --help):
#   cli                 the options; runs the benchmark, or one worker (--worker) in this process
#   run                 one benchmark run, start to end; rows: which rows run
#   launching           a worker in fresh processes (mpiexec, fake hosts)
#   ddptrain_rows       the ddptrain worker; step_timing: the timers put into its step
#   torch_rows          the PyTorch worker, and ddptrain's layers as PyTorch modules
#   gemm_limit          the GEMM-limit worker and its medians
#   workload            the model of a spec and each rank's rows of the data
#   environment         the CPU, its vector code, the libraries: the header
#   report, notes       the table, and the notes under it
#   targets             the verdicts; accuracy_runs: time to 98% test accuracy
#   json_output         the file of --json
#   ddptrain_internals  every import of ddptrain beyond its public API
