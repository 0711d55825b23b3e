"""The global top-k exchange's rule (core/global_topk.py): ranges, budgets, the reference."""

from __future__ import annotations

import numpy as np
import pytest

from ranger_hvd.core import OptionsError, make_options
from ranger_hvd.core import global_topk as rule


def test_ranges_equal_widths_first_then_quantiles_of_the_last_selection():
    assert rule.range_bounds(10, 3, None) == [0, 3, 6, 10]
    sel = np.array([1, 2, 3, 4, 90, 91])
    assert rule.range_bounds(100, 3, sel) == [0, 3, 90, 100]
    # each range holds about a third of the last selection
    assert rule.owner_split(sel, rule.range_bounds(100, 3, sel)) == [2, 2, 2]


def test_budgets_sum_to_k_and_keep_everything_at_density_one():
    n, world = 1003, 4
    everything = np.arange(n)
    bounds = rule.range_bounds(n, world, everything)
    budgets = rule.range_budgets(n, bounds, everything)
    assert budgets == [bounds[j + 1] - bounds[j] for j in range(world)]
    for k in (1, 7, 100):
        b = rule.range_budgets(k, rule.range_bounds(n, world, None), None)
        assert k <= sum(b) <= k + world - 1


def test_reference_exchange_conserves_and_receives_about_2k():
    rng = np.random.default_rng(0)
    n, k, world = 5000, 50, 4
    last = None
    for step in range(5):
        pairs = []
        for _ in range(world):
            idx = np.sort(rng.choice(n, k, replace=False))
            pairs.append((idx, rng.standard_normal(k).astype(np.float32)))
        g_idx, g_sums, dropped = rule.reference_exchange(pairs, n, last)
        assert np.all(np.diff(g_idx) > 0) and len(g_idx) <= k + world - 1
        # what G carries plus what went back to the senders is everything that was sent
        kept_total = np.zeros(n, np.float64)
        np.add.at(kept_total, g_idx, g_sums.astype(np.float64))
        sent_total = np.zeros(n, np.float64)
        returned = np.zeros(n, np.float64)
        for (idx, vals), back in zip(pairs, dropped):
            np.add.at(sent_total, idx, vals.astype(np.float64))
            np.add.at(returned, idx[back], vals[back].astype(np.float64))
            assert not np.isin(idx[back], g_idx).any()
        assert np.allclose(kept_total + returned, sent_total, atol=1e-5)
        last = g_idx


def test_global_topk_needs_top_k():
    assert make_options(exchange="global_topk").exchange == "global_topk"
    with pytest.raises(OptionsError, match="global_topk"):
        make_options(exchange="global_topk", selection="random")
    with pytest.raises(OptionsError, match="exchange"):
        make_options(exchange="globaltopk")
