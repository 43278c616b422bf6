"""The sampler is a pure function: the global batches do not depend on the number of ranks."""

import numpy as np
import pytest

from ddptrain.data.sampler import epoch_plan, owned_blocks, shard_bounds, steps_per_epoch
from ddptrain.errors import UserError
from helpers import global_batches

RANK_COUNTS = [1, 2, 3, 4, 6, 8]   # every divisor of the default 24 virtual shards up to 8
SIZES = [(1003, 64), (240, 32), (96, 9), (50, 24), (1000, 100)]


def plans(n, batch, ranks, seed=3, epoch=1, drop_last=False):
    return [epoch_plan(n, batch, r, ranks, seed, epoch, drop_last=drop_last) for r in range(ranks)]


@pytest.mark.parametrize("ranks", RANK_COUNTS)
@pytest.mark.parametrize("n,batch", SIZES)
def test_the_union_of_local_batches_is_the_same_global_batch_for_any_rank_count(n, batch, ranks):
    expected = global_batches(n, batch, seed=3, epoch=1)
    per_rank = plans(n, batch, ranks)
    for step, global_batch in enumerate(expected):
        union = np.concatenate(
            [p.global_rows[p.step_bounds[step]:p.step_bounds[step + 1]] for p in per_rank])
        assert np.array_equal(np.sort(union), global_batch), f"step {step}"


@pytest.mark.parametrize("ranks", RANK_COUNTS)
@pytest.mark.parametrize("n,batch", SIZES)
def test_each_rank_trains_only_on_rows_of_its_own_shard(n, batch, ranks):
    for rank, plan in enumerate(plans(n, batch, ranks)):
        blocks = owned_blocks(n, rank, ranks)
        owned = np.concatenate([np.arange(a, b) for a, b in blocks])
        assert np.isin(plan.global_rows, owned).all()
        # local_rows index the rank's in-memory copy (its blocks concatenated in order)
        assert np.array_equal(owned[plan.local_rows], plan.global_rows)


@pytest.mark.parametrize("ranks", RANK_COUNTS)
@pytest.mark.parametrize("n,batch", SIZES)
def test_an_epoch_covers_every_sample_exactly_once(n, batch, ranks):
    rows = np.concatenate([p.global_rows for p in plans(n, batch, ranks)])
    assert np.array_equal(np.sort(rows), np.arange(n))
    assert all(p.n_steps == steps_per_epoch(n, batch) for p in plans(n, batch, ranks))


def test_drop_last_drops_only_the_short_final_batch():
    n, batch = 1003, 64
    batches = global_batches(n, batch, seed=3, epoch=1, drop_last=True)
    assert len(batches) == n // batch and all(len(b) == batch for b in batches)
    assert len(np.unique(np.concatenate(batches))) == (n // batch) * batch


@pytest.mark.parametrize("ranks", RANK_COUNTS)
def test_local_batches_differ_by_at_most_one_sample(ranks):
    per_rank = plans(1003, 100, ranks)
    for step in range(per_rank[0].n_steps):
        sizes = [len(p.local_batch(step)) for p in per_rank]
        assert max(sizes) - min(sizes) <= 1
        assert sum(sizes) == per_rank[0].global_counts[step]


def test_the_order_depends_on_seed_and_epoch_and_is_reproducible():
    a = global_batches(1000, 100, seed=1, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, global_batches(1000, 100, seed=1, epoch=0)))
    assert not np.array_equal(a[0], global_batches(1000, 100, seed=1, epoch=1)[0])
    assert not np.array_equal(a[0], global_batches(1000, 100, seed=2, epoch=0)[0])


def test_every_global_batch_draws_from_every_virtual_shard():
    bounds = shard_bounds(2400, 24)
    for batch in global_batches(2400, 96, seed=0, epoch=0):
        shards = np.searchsorted(bounds, batch, side="right") - 1
        assert np.array_equal(np.bincount(shards, minlength=24), np.full(24, 4))


def test_shards_are_contiguous_blocks_that_cover_the_rows():
    bounds = shard_bounds(1003, 24)
    assert bounds[0] == 0 and bounds[-1] == 1003
    assert set(np.diff(bounds)) == {41, 42}


@pytest.mark.parametrize("kwargs,message", [
    (dict(n=1000, global_batch=64, world_size=5), "virtual shards"),
    (dict(n=1000, global_batch=2, world_size=4), "smaller than the number of ranks"),
    (dict(n=1000, global_batch=-1, world_size=1), "must be positive"),
    (dict(n=10, global_batch=4, world_size=1), "fewer than the 24 virtual shards"),
])
def test_impossible_layouts_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(UserError, match=message):
        epoch_plan(rank=0, seed=0, epoch=0, **kwargs)


@pytest.mark.parametrize("ranks", range(1, 9))
def test_with_840_virtual_shards_every_rank_count_from_1_to_8_gets_the_same_global_batches(ranks):
    """840 = lcm(1..8): --virtual-shards 840 lets 5 and 7 ranks train the same batches as 1."""
    n, batch, shards = 5000, 250, 840
    expected = global_batches(n, batch, seed=3, epoch=1, n_shards=shards)
    per_rank = [epoch_plan(n, batch, r, ranks, 3, 1, n_shards=shards) for r in range(ranks)]
    for step, global_batch in enumerate(expected):
        union = np.concatenate(
            [p.global_rows[p.step_bounds[step]:p.step_bounds[step + 1]] for p in per_rank])
        assert np.array_equal(np.sort(union), global_batch)
    owned = [np.concatenate([np.arange(a, b) for a,
                             b in owned_blocks(n, r, ranks, shards)]) for r in range(ranks)]
    assert all(np.isin(p.global_rows, mine).all() for p, mine in zip(per_rank, owned))
    assert np.array_equal(np.sort(np.concatenate([p.global_rows for p in per_rank])), np.arange(n))
