"""ddptrain: a data-parallel trainer of numpy networks, over MPI, on image data in HDF5.

The pieces, each in a module of its own:

- ``nn``, ``losses``, ``optim``: the numpy network (no MPI in sight);
- ``data``, ``mnist``, ``sampler``: HDF5 data, preparation, and which rank
  trains on which rows at each step (``plan``: with the learning rate);
- ``comm``: the only module that imports mpi4py;
- ``step``: one data-parallel training step; ``evaluation``: evaluation;
- ``trainer``: the loop, with ``callbacks`` around it (progress, metrics,
  replica checks, checkpoints; ``debug`` for --debug);
- ``checkpoint``, ``resume``: verified checkpoints, and resuming from them;
- ``rank0``: what only rank 0 does (printing, the run folder);
- ``runner``: setting a run up; ``api``: ``train``, the Python entry point,
  over which ``cli`` (options and exit statuses) is a thin layer.

The public API, importable from here: ``train``, ``Arrays`` (in-memory
data), ``gradcheck`` (a layer's gradients against finite differences), the
errors ``UserError``, ``DataError``, ``CheckpointError`` and
``NumericalError``, and the modules ``nn``, ``losses`` and ``optim``.
"""

__version__ = "0.3.0"

# Reached lazily, so that `import ddptrain` stays cheap (the command line imports what it runs).
_PUBLIC = {"train": "api", "Arrays": "arrays", "gradcheck": "finite_differences", "Result": "runner",
           "UserError": "errors", "DataError": "errors", "CheckpointError": "errors", "NumericalError": "errors"}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name):
    if name in _PUBLIC:
        import importlib
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
