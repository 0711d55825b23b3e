"""Arrays that exercise the selection: shared by the backends' selection tests."""

import numpy as np


def selection_inputs(rng: np.random.Generator):
    """(name, array) pairs: random, heavily tied, and built to defeat the sampled estimate."""
    out = []
    for n in (1, 7, 100, 4096, 20_000, 100_003):
        out.append((f"normal{n}", rng.standard_normal(n).astype(np.float32)))
        out.append((f"ints{n}", rng.integers(-3, 4, n).astype(np.float32)))
    n = 50_000
    out.append(("zeros", np.zeros(n, np.float32)))
    out.append(("constant", np.full(n, -2.5, np.float32)))
    few = np.zeros(n, np.float32)
    few[rng.integers(0, n, 7)] = 1.0
    out.append(("few_nonzero", few))
    # The strided sample sees only zeros: the estimate is 0 and every entry is a candidate.
    hidden = rng.standard_normal(n).astype(np.float32)
    hidden[::100] = 0.0
    out.append(("sample_sees_zeros", hidden))
    # The sample sees only huge values: the estimate is far too high and selection must fall back.
    decoy = rng.standard_normal(n).astype(np.float32)
    decoy[::100] = 1000.0
    out.append(("sample_sees_decoys", decoy))
    # The sample sees only tiny values: the estimate is far too low and lets nearly all through.
    tiny = rng.standard_normal(n).astype(np.float32) + 10.0
    tiny[::100] = 1e-6
    out.append(("sample_sees_tiny", tiny))
    # Magnitude ties with both signs, and signed zeros.
    signs = np.tile(np.array([3, -3, 0, -0.0, 1, -1], np.float32), n // 6 + 1)[:n]
    out.append(("signed_ties", signs))
    ramp = np.arange(n, dtype=np.float32)[::-1].copy()  # strictly decreasing: the answer is a prefix
    out.append(("ramp", ramp))
    return out
