"""ddptrain: a data-parallel trainer of numpy networks, over MPI, on image data in HDF5.

The packages, from the bottom up (each imports only those above it in this list):

- ``backends``: optional speed machinery (MKL, BLAS axpby, denormals, threads);
- ``nn``, ``optim``: the numpy network and its optimisers (no MPI in sight);
- ``distributed``: communicators, launchers, agreement checks, the gradient exchange;
- ``data``: the HDF5 data file, IDX sets, and which rank reads which rows;
- ``training``: one data-parallel step, the loop and its callbacks, evaluation;
- ``run``: options, start-up checks, set-up, checkpoints, rank 0's files, signals;
- ``api`` (``train``), over which ``cli`` (options and exit statuses) is a thin layer;
  ``verification`` (``verify``) compares runs on different numbers of ranks.

The public API, importable from here: ``train``, ``verify`` (P ranks against
one process, for a model of your own), ``Arrays`` (in-memory
data), ``gradcheck`` (a layer's gradients against finite differences),
``Result``, ``Callback`` (the hooks around the training loop), the errors
``UserError``, ``DataError``, ``CheckpointError`` and ``NumericalError``, and
the packages ``nn`` and ``optim`` (``losses`` is ``nn.losses``).
"""

__version__ = "0.3.0"

import importlib

# Reached lazily, so that `import ddptrain` stays cheap (the command line imports what it runs).
_PUBLIC = {"train": "api", "verify": "verification", "Arrays": "data.arrays",
           "gradcheck": "nn.gradcheck", "Result": "run.runner", "Callback": "training.trainer",
           "UserError": "errors",
           "DataError": "errors", "CheckpointError": "errors", "NumericalError": "errors"}
_PUBLIC_MODULES = {"nn": "nn", "optim": "optim", "losses": "nn.losses"}

__all__ = ["__version__", *_PUBLIC, *_PUBLIC_MODULES]


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    if name in _PUBLIC_MODULES:
        return importlib.import_module(f"{__name__}.{_PUBLIC_MODULES[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
