"""``--overlap-allreduce``: the gradient is reduced in buckets while the backward pass is still
running.

Backward fills the flat gradient from the last layer to the first, and a
layer's gradients are consecutive in the flat array, in layer order: once
the layers from index ``i`` on are done, the tail of the flat array from
their first value on is final. ``GradientBuckets`` cuts the flat gradient
into such tails of at least ``bucket_bytes`` (PyTorch DDP's buckets, in the
order backward fills them) and starts a non-blocking Allreduce
(``comm.iallreduce_``) on each as soon as its last layer is done, so that
the network carries one bucket while the processor computes the next
layers' gradients. Before the update every bucket is waited for: the step
then holds the same sums as with one Allreduce of the whole array (up to
the order in which MPI adds more than two ranks' values).

Whether it pays depends on the network: within one host an Allreduce of a
few MB is a memory copy, and the extra calls cost more than they hide;
between hosts it can hide part of the transfer (see the README's
Performance section for the figures). MPI makes progress on a
non-blocking collective only inside MPI calls, so every layer's end also
tests the buckets in flight.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    first_layer: int   # the bucket is final once backward has done this layer (and all after it)
    start: int         # its slice of the flat gradient
    stop: int


def make_buckets(model, bucket_bytes):
    """The buckets of ``model``'s flat gradient, in the order backward completes them."""
    bounds, offset = [], 0
    for layer in model.layers:   # each layer's slice of the flat gradient, in layer order
        size = sum(grad.size for grad in layer.grads.values())
        bounds.append((offset, offset + size))
        offset += size
    buckets, stop = [], offset
    for index in range(len(model.layers) - 1, -1, -1):
        start = bounds[index][0]
        if (bounds[index][1] > bounds[index][0]
                and (stop - start) * model.grads.itemsize >= bucket_bytes):
            buckets.append(Bucket(index, start, stop))
            stop = start
    if stop > 0:   # what is left: the first layers' gradients
        first = next(i for i, (a, b) in enumerate(bounds) if b > a)
        buckets.append(Bucket(first, 0, stop))
    return buckets


class GradientBuckets:
    """Reduces ``model.grads`` bucket by bucket during backward; ``finish`` waits for all of
    them."""

    def __init__(self, model, comm, bucket_bytes):
        self.model, self.comm = model, comm
        self.buckets = make_buckets(model, bucket_bytes)
        self._requests, self._started = [], 0

    def __enter__(self):
        """Around the step's own backward only (not --debug's extra passes)."""
        self._requests, self._started = [], 0
        self.model.gradient_ready = self.layer_done
        return self

    def __exit__(self, *exc):
        self.model.gradient_ready = None
        return False

    def layer_done(self, index):
        """Backward has filled the gradients of layer ``index``: start the buckets that are now
        final."""
        buckets = self.buckets
        while self._started < len(buckets) and buckets[self._started].first_layer >= index:
            self._start(buckets[self._started])
        for request in self._requests:
            request.test()   # MPI progresses a non-blocking collective only when it is called

    def finish(self):
        """Start what backward did not reach (layers it skipped), and wait for every bucket."""
        while self._started < len(self.buckets):
            self._start(self.buckets[self._started])
        for request in self._requests:
            request.wait()

    def _start(self, bucket):
        # DDP
        self._requests.append(self.comm.iallreduce_(self.model.grads[bucket.start:bucket.stop]))
        self._started += 1
