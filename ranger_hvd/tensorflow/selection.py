"""Choosing which entries of a flattened TensorFlow tensor to send.

``topk_indices`` returns exactly the set of ``ranger_hvd.core.reference.select``: the k largest
magnitudes, ties going to the lower index, as ascending int32. For large tensors it narrows the search
first, as DGC does, touching the full tensor only with read-only reductions:

1. estimate a threshold from a strided sample of about ``sample_fraction * n`` magnitudes, aiming a
   little low (by about three standard deviations of the count) so that enough entries pass it;
2. candidates = every index whose magnitude reaches the estimate. The tensor is viewed as B rows of
   n // B entries; a column max and a column min (two streaming reads, no full-size temporaries)
   tell which columns hold a candidate, and only those columns are gathered and tested. Listing the
   gathered [B, columns] block row by row gives the candidates in ascending index order;
3. if fewer than k passed, the estimate is lowered once, then the whole tensor is searched exactly;
4. the k-th largest candidate magnitude t (one unsorted ``top_k``) is the global one, because every
   entry at or above the estimate is a candidate and at least k of them are;
5. keep everything above t and, of the entries equal to t, the lowest-indexed ones (a running count
   over the ``== t`` mask), so the set never depends on how ties happen to be ordered.

An estimate of 0 (a mostly-zero tensor, such as an embedding's gradient) would let every entry
through; then the non-zero entries are the candidates instead (``_mostly_zero``).

The exact path (small tensors, dense selections, failed estimates) relies on one documented property
of ``tf.math.top_k``: among equal values the lower index comes first.

``random_k_indices`` serves Horovod's own tape, which sums compressed tensors elementwise: every rank
must pick the same coordinates with no message, so they come from stateless draws whose seed is
``[core.random_k_seed(seed, name), step]``.

k may be a Python int or a scalar int tensor (density warm-up changes it from step to step).
"""

from __future__ import annotations

import tensorflow as tf

from ranger_hvd.core import SAMPLE_TRIES, sample_stride, uses_sampling

# Rows of the column view. Fewer rows light up fewer columns (less to gather, one element at a
# time) but make the column reductions write more; 8 was fastest on one CPU thread at densities
# 0.01 and 0.001 (4, 16 and 32 rows, and contiguous rows of 8 to 32 entries, were slower).
_ROWS = 8


def _magnitudes(x: tf.Tensor) -> tf.Tensor:
    # fp16/bf16 -> fp32 is exact, so the order is unchanged; float64 stays float64.
    return tf.abs(x if x.dtype in (tf.float32, tf.float64) else tf.cast(x, tf.float32))


def _exact(flat: tf.Tensor, k) -> tf.Tensor:
    """The exact selection over the whole tensor (top_k puts the lower index first among ties)."""
    chosen = tf.math.top_k(_magnitudes(flat), k=k, sorted=True).indices
    return tf.sort(tf.cast(chosen, tf.int32))


def _candidates(flat: tf.Tensor, estimate: tf.Tensor):
    """(positions, magnitudes) of every entry with |flat| >= estimate, positions ascending int32."""
    n = int(flat.shape[0])
    m = n // _ROWS
    body = flat if m * _ROWS == n else flat[:m * _ROWS]
    grid = tf.reshape(body, [_ROWS, m])  # entry (i, j) is flat[i * m + j]
    e = tf.cast(estimate, flat.dtype)    # exact: the estimate is the magnitude of an entry of flat
    hot = (tf.reduce_max(grid, axis=0) >= e) | (tf.reduce_min(grid, axis=0) <= -e)
    cols = tf.cast(tf.where(hot)[:, 0], tf.int32)
    block = _magnitudes(tf.gather(grid, cols, axis=1))  # [rows, hot columns]
    keep = block >= estimate
    pos = tf.range(_ROWS, dtype=tf.int32)[:, None] * m + cols[None, :]
    # Row-major order of the block is ascending position: row i covers [i * m, (i + 1) * m).
    positions, mags = tf.boolean_mask(pos, keep), tf.boolean_mask(block, keep)
    if m * _ROWS < n:  # the last n % rows entries, after every row
        tail = _magnitudes(flat[m * _ROWS:])
        tail_keep = tail >= estimate
        tail_pos = tf.range(m * _ROWS, n, dtype=tf.int32)
        positions = tf.concat([positions, tf.boolean_mask(tail_pos, tail_keep)], 0)
        mags = tf.concat([mags, tf.boolean_mask(tail, tail_keep)], 0)
    return positions, mags


def _keep_k_lowest_ties(positions: tf.Tensor, mags: tf.Tensor, k) -> tf.Tensor:
    """The positions of the k largest ``mags``, ties at the k-th value going to lower positions.

    ``positions`` are ascending and hold at least k entries.
    """
    # The k-th largest value; an unsorted top_k is a selection, several times cheaper than a sort.
    t = tf.reduce_min(tf.math.top_k(mags, k=k, sorted=False).values)
    above = mags > t
    ties = mags == t
    need = tf.cast(k, tf.int32) - tf.reduce_sum(tf.cast(above, tf.int32))
    keep = above | (ties & (tf.cumsum(tf.cast(ties, tf.int32)) <= need))
    return tf.boolean_mask(positions, keep)


def _mostly_zero(flat: tf.Tensor, k) -> tf.Tensor:
    """The exact selection when the sampled threshold is 0: most entries are zero (an embedding's
    gradient touches a few rows). The non-zero entries are found in one pass; if there are at least k,
    the k largest of them; else all of them and, ties to the lower index, the first zeros, which lie
    within the first k + (non-zeros) positions."""
    mags = _magnitudes(flat)
    nonzero = tf.cast(tf.where(mags > 0)[:, 0], tf.int32)
    count = tf.size(nonzero)

    def pad_with_zeros():
        window = mags[: k + count]
        zeros = tf.cast(tf.where(tf.equal(window, 0))[:, 0], tf.int32)[: k - count]
        return tf.sort(tf.concat([nonzero, zeros], 0))

    return tf.cond(count >= k, lambda: _keep_k_lowest_ties(nonzero, tf.gather(mags, nonzero), k),
                   pad_with_zeros)


def topk_indices(flat: tf.Tensor, k, sample_fraction: float = 0.01) -> tf.Tensor:
    """Indices (int32, ascending) of the k largest |flat|, ties to the lower index.

    ``flat`` is 1-D with a static length and holds no NaN (callers check finiteness first).
    """
    n = int(flat.shape[0])
    static_k = k if isinstance(k, int) else None
    if static_k is not None and static_k >= n:
        return tf.range(n, dtype=tf.int32)
    stride = sample_stride(sample_fraction)
    if not uses_sampling(n, static_k, sample_fraction):
        return _exact(flat, k)
    k_t = tf.convert_to_tensor(k, dtype=tf.int32)
    # Every stride-th entry; a column of a [n // stride, stride] view is cheaper than a strided slice.
    m = max(1, n // stride)  # a stride beyond n still samples the first entry
    stride = min(stride, n)
    body = flat if m * stride == n else flat[:m * stride]
    sample = _magnitudes(tf.reshape(body, [m, stride])[:, 0])
    expected = tf.cast(k_t, tf.float64) * (m / n)  # rank of the true threshold inside the sample

    def attempt(tries):
        if not tries:
            return _exact(flat, k_t)
        (a, b, c), rest = tries[0], tries[1:]
        rank = tf.cast(tf.math.ceil(a * expected + b * tf.sqrt(expected)), tf.int32) + c
        rank = tf.minimum(rank, m)
        estimate = tf.reduce_min(tf.math.top_k(sample, k=rank, sorted=False).values)

        def from_candidates():
            positions, mags = _candidates(flat, estimate)
            return tf.cond(tf.size(positions) >= k_t,
                           lambda: _keep_k_lowest_ties(positions, mags, k_t),
                           lambda: attempt(rest))

        # An estimate of 0 (a mostly-zero tensor) would let every entry through.
        return tf.cond(estimate > 0, from_candidates, lambda: _mostly_zero(flat, k_t))

    return attempt(SAMPLE_TRIES)


def seed_pair(base_seed: int, step) -> tf.Tensor:
    """The stateless-RNG seed of one (tensor, step): [core.random_k_seed(seed, name), step]."""
    return tf.stack([tf.constant(base_seed, tf.int64), tf.cast(step, tf.int64)])


def _random_k_dense(n: int, k, seed: tf.Tensor) -> tf.Tensor:
    # The k smallest of n uniform draws: a uniform k-subset, at the cost of a pass over n.
    draws = tf.random.stateless_uniform([n], seed=seed, dtype=tf.float32)
    chosen = tf.math.top_k(-draws, k=k, sorted=False).indices
    return tf.sort(tf.cast(chosen, tf.int32))


def _random_k_sparse(n: int, k, seed: tf.Tensor) -> tf.Tensor:
    """The first k distinct values of a stream of uniform draws in [0, n): sampling without
    replacement, so a uniform k-subset, at a cost of O(k) instead of O(n)."""
    k_t = tf.convert_to_tensor(k, tf.int32)
    # About k^2 / 2n draws repeat an earlier one; draw twice that plus six standard deviations and
    # a constant, so that running short (then the dense method decides) practically never happens.
    repeats = tf.cast(k_t, tf.float64) ** 2 / n
    extra = tf.cast(tf.math.ceil(repeats + 6.0 * tf.sqrt(repeats)), tf.int32) + 16
    # int64 draws: the modulo bias of mapping 64 random bits to [0, n) is negligible.
    draws = tf.random.stateless_uniform(tf.reshape(k_t + extra, [1]), seed=seed, minval=0,
                                        maxval=n, dtype=tf.int64)
    distinct = tf.unique(draws).y  # first occurrences, in draw order
    return tf.cond(tf.size(distinct) >= k_t,
                   lambda: tf.sort(tf.cast(distinct[:k_t], tf.int32)),
                   lambda: _random_k_dense(n, k_t, seed))


def random_k_indices(n: int, k, seed: tf.Tensor) -> tf.Tensor:
    """k distinct indices in [0, n), ascending int32, a pure function of (n, k, seed).

    Every rank computes the same draws from the same seed, so all ranks pick the same coordinates.
    Sparse selections draw indices directly; dense ones (k >= n / 8) take the k smallest of n
    uniform draws.
    """
    if isinstance(k, int):
        if k >= n:
            return tf.range(n, dtype=tf.int32)
        return (_random_k_dense if k * 8 >= n else _random_k_sparse)(n, k, seed)
    k_t = tf.convert_to_tensor(k, tf.int32)
    return tf.cond(k_t * 8 >= n, lambda: _random_k_dense(n, k_t, seed),
                   lambda: _random_k_sparse(n, k_t, seed))


__all__ = ["topk_indices", "random_k_indices", "seed_pair"]
