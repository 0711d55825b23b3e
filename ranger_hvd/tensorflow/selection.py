"""Choosing which entries of a flattened TensorFlow tensor to send.

``topk_indices`` returns exactly the set of ``ranger_hvd.core.reference.select``: the k largest
magnitudes, ties going to the lower index, as ascending int32. It relies on one documented property of
``tf.math.top_k``: among equal values the lower index comes first (the tests check it against the
reference, ties included). For large tensors it first narrows the search, as DGC does:

1. estimate a threshold from a strided sample of about ``sample_fraction * n`` magnitudes, aiming a
   little low so that enough entries pass it;
2. candidates = every index whose magnitude reaches the estimate (``tf.where`` lists them ascending);
3. if at least k passed, the true k-th largest magnitude is at or above the estimate, so the whole
   top-k set (ties included) lies among the candidates, and an exact ``top_k`` over the candidates
   (kept in ascending index order, so ties still go to the lower index) gives the same set;
4. otherwise fall back to an exact ``top_k`` over the whole tensor.

``random_k_indices`` serves Horovod's own tape, which sums compressed tensors elementwise: every rank
must pick the same coordinates with no message, so they come from a stateless generator whose seed is
derived from ``core.random_k_seed`` and the tensor's step counter.

k may be a Python int or a scalar int tensor (density warm-up changes it from step to step).
"""

from __future__ import annotations

import tensorflow as tf

# Below this size one exact top_k is cheaper than sampling and its bookkeeping.
SAMPLING_MIN_NUMEL = 1 << 14
# Aim the estimate at a rank this much above the expected one so one pass usually yields k candidates.
_SAMPLE_MARGIN = 1.5
_SAMPLE_SLACK = 4


def _exact(mag: tf.Tensor, k) -> tf.Tensor:
    return tf.math.top_k(mag, k=k, sorted=True).indices


def topk_indices(flat: tf.Tensor, k, sample_fraction: float = 0.01) -> tf.Tensor:
    """Indices (int32, ascending) of the k largest |flat|, ties to the lower index.

    ``flat`` is 1-D with a static length and holds no NaN (callers check finiteness first).
    """
    n = int(flat.shape[0])
    # Magnitudes in float32 at least: fp16/bf16 -> fp32 is exact, so the order is unchanged.
    mag = tf.abs(flat if flat.dtype in (tf.float32, tf.float64) else tf.cast(flat, tf.float32))
    static_k = k if isinstance(k, int) else None
    if static_k is not None and static_k >= n:
        return tf.range(n, dtype=tf.int32)
    stride = max(1, int(round(1.0 / sample_fraction)))
    sampled = n >= SAMPLING_MIN_NUMEL and stride > 1 and (static_k is None or static_k * 4 <= n)
    if not sampled:
        chosen = _exact(mag, k)
    else:
        k_t = tf.convert_to_tensor(k, dtype=tf.int32)
        sample = mag[::stride]
        m = int(sample.shape[0])
        # Rank of the true threshold inside the sample, widened by a margin and a constant slack.
        expected = tf.cast(k_t, tf.float64) * (m / n)
        rank = tf.cast(tf.math.ceil(expected * _SAMPLE_MARGIN), tf.int32) + _SAMPLE_SLACK
        rank = tf.minimum(rank, m)
        estimate = tf.reduce_min(tf.math.top_k(sample, k=rank, sorted=False).values)
        candidates = tf.cast(tf.where(mag >= estimate)[:, 0], tf.int32)  # ascending

        def among_candidates():
            pos = tf.math.top_k(tf.gather(mag, candidates), k=k_t, sorted=True).indices
            return tf.gather(candidates, pos)

        chosen = tf.cond(tf.size(candidates) >= k_t, among_candidates, lambda: _exact(mag, k_t))
    return tf.sort(tf.cast(chosen, tf.int32))


def seed_pair(base_seed: int, step) -> tf.Tensor:
    """The stateless-RNG seed of one (tensor, step): [low 31 bits of the core seed, step]."""
    return tf.stack([tf.constant(base_seed & 0x7FFFFFFF, tf.int64), tf.cast(step, tf.int64)])


def random_k_indices(n: int, k, seed: tf.Tensor) -> tf.Tensor:
    """k distinct indices in [0, n), ascending int32, a pure function of (n, k, seed).

    The k smallest of n stateless uniform draws form a uniformly random k-subset; every rank computes
    the same draws from the same seed, so all ranks pick the same coordinates.
    """
    if isinstance(k, int) and k >= n:
        return tf.range(n, dtype=tf.int32)
    draws = tf.random.stateless_uniform([n], seed=seed, dtype=tf.float32)
    chosen = tf.math.top_k(-draws, k=k, sorted=False).indices
    return tf.sort(tf.cast(chosen, tf.int32))


def k_schedule(numel: int, options) -> list[int]:
    """k for steps 0, 1, ..., warmup_steps (the last entry holds for every later step)."""
    from ranger_hvd.core import density_at, num_selected

    total = max(0, options.warmup_steps)
    return [num_selected(numel, density_at(t, options)) for t in range(total + 1)]


def k_for_step(numel: int, options, step):
    """A Python int when k never changes, else a scalar int32 tensor read from the warm-up schedule."""
    table = k_schedule(numel, options)
    if len(set(table)) == 1:
        return table[0]
    index = tf.minimum(tf.cast(step, tf.int32), len(table) - 1)
    return tf.gather(tf.constant(table, tf.int32), index)


__all__ = ["topk_indices", "random_k_indices", "seed_pair", "k_schedule", "k_for_step",
           "SAMPLING_MIN_NUMEL"]
