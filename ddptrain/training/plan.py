"""What every step of a run trains on, and at which learning rate: pure functions of the options.

The global batches depend on the seed, the epoch and the data size only
(``sampler``), the learning rate on the global step only (``schedule``):
neither depends on the number of ranks, which is what lets P ranks
reproduce one process and a resumed run continue exactly where it stopped.
"""

from __future__ import annotations

from ddptrain.data.sampler import epoch_plan, steps_per_epoch
from ddptrain.data.stream_order import StreamedEpochPlan, StreamLayout
from ddptrain.optim.schedule import learning_rate


class TrainingPlan:
    """The epochs of a run, as seen by one rank. ``order``: the ``StreamOrder`` of streamed rows
    (``stream_order``); None: each rank's shard in memory, in the sampler's order."""

    def __init__(self, config, n_train, rank, world_size, order=None):
        self.config, self.n_train, self.rank, self.world_size = config, n_train, rank, world_size
        self.order = order
        self.layout = None if order is None else StreamLayout(
            n_train, config.batch_size, rank, world_size, config.seed, config.virtual_shards,
            config.drop_last, order)
        self.epochs, self.seed = config.epochs, config.seed
        self.steps_per_epoch = steps_per_epoch(n_train, config.batch_size, config.drop_last)
        # This rank's largest share of a global batch: ceil(B / P), where a batch holds at most
        # every row.
        self.max_local_rows = -(-min(config.batch_size, n_train) // world_size)

    @property
    def total_steps(self):
        """The steps the run trains: every epoch's, or --max-steps where it comes first."""
        every_epoch = self.epochs * self.steps_per_epoch
        return min(every_epoch, self.config.max_steps or every_epoch)

    def epoch(self, epoch):
        """This rank's rows of every global batch of ``epoch`` (an ``EpochPlan``, or a
        ``StreamedEpochPlan``)."""
        if self.layout is not None:
            return StreamedEpochPlan(self.layout, epoch)
        c = self.config
        return epoch_plan(self.n_train, c.batch_size, self.rank, self.world_size, c.seed, epoch,
                          c.virtual_shards, c.drop_last)

    def lr(self, step):
        """The learning rate of global step ``step``."""
        return learning_rate(self.config, step, self.steps_per_epoch)
