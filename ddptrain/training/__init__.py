"""The training loop: one data-parallel step (``step``), this rank's batches, the trainer and its
callbacks, evaluation, the plan of steps and learning rates, and ``--debug``'s checks."""
