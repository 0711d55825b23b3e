"""TensorFlow selection benchmark, the counterpart of ``bench_selection.py`` (PyTorch).

    python benchmarks/bench_selection_tf.py [--sizes 1e5,1e6,5e6,2.5e7] [--densities 0.01,0.001]
                                            [--repeats 5] [--no-write]

Per tensor, all traced with tf.function on one CPU thread (intra- and inter-op), medians of repeats:

copy          x * s with s a variable: one read and one write (a constant factor would be folded away);
tf.math.top_k top_k(|x|, k) alone;
select        ranger_hvd.tensorflow.selection.topk_indices alone (sampled threshold, exact top-k
              among candidates; the same set as core.reference.select);
top-k c+d     one error-feedback step as every TF entry point runs it (finiteness check, then on
              CPU the compiled pass of ``tensorflow/cpu_path.py``: acc = e + g with the candidate
              screen, exact selection, values, residual) plus the decompression of one rank's payload
              (``exchange.finish``: the scatter-add into a zeroed tensor);
c+d, TF ops   the same step traced with the compiled pass switched off: TensorFlow's own ops
              (acc = e + g in the residual's buffer, ``topk_indices``, gather, in-place zeroing),
              the path of GPUs and of tensors too small for a sampled threshold; the baseline;
random-k c+d  RangerCompressor.compress + decompress, the path under Horovod's own tape.

Rewrites only the TensorFlow section of docs/results/selection.md (between its markers).
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import time

import numpy as np
import tensorflow as tf

from common import REPO, RESULTS, machine, median_seconds, tf_ready

sys.path.insert(0, str(REPO))

from ranger_hvd.core import num_selected  # noqa: E402
from ranger_hvd.tensorflow import RangerCompressor, cpu_path, exchange  # noqa: E402
from ranger_hvd.tensorflow.selection import topk_indices  # noqa: E402

SELECTION = RESULTS / "selection.md"
BEGIN = "<!-- BEGIN TENSORFLOW SECTION: maintained by the TensorFlow backend -->"
END = "<!-- END TENSORFLOW SECTION -->"


def median_ms(fn, repeats):
    """Median ms of a traced function; the first call traces it and is not timed."""
    return median_seconds(fn, repeats, ready=tf_ready) * 1e3


def _topk_step(n, d, x):
    """One top-k error-feedback step of an n-entry variable and the decompression of its payload."""
    bench = RangerCompressor(density=d, min_elements=1, compress_1d=True)
    bench.world_size = 1
    variable = tf.Variable(tf.zeros([n]))
    bench.build([variable])

    @tf.function
    def step():
        idx, vals = bench.compress_variable(variable, x)
        packed = exchange.pack_pairs(idx, vals, tf.float32)
        ctx = exchange.Context("topk", (n,), tf.float32, gathered=packed, k=tf.size(idx))
        return exchange.finish(tf.ones([1]), ctx, "float32")

    return step


def _tf_ops_only(fn):
    """``fn`` traced now with the compiled CPU pass switched off (the choice is made while tracing)."""
    real = cpu_path.usable
    cpu_path.usable = lambda *args, **kwargs: False
    try:
        fn()
    finally:
        cpu_path.usable = real
    return fn


def run(sizes, densities, repeats):
    rows = []
    for n in sizes:
        x = tf.constant(np.random.default_rng(0).standard_normal(n).astype(np.float32))
        scale = tf.Variable(1.0)
        t_copy = median_ms(tf.function(lambda: x * scale), repeats)
        for d in densities:
            k = num_selected(n, d)
            t_cd = median_ms(_topk_step(n, d, x), repeats)
            t_cd_ops = median_ms(_tf_ops_only(_topk_step(n, d, x)), repeats)

            comp = RangerCompressor(density=d, min_elements=1, compress_1d=True, selection="random")
            comp.world_size = 1

            @tf.function
            def random_cd():
                return comp.decompress(*comp.compress(x))

            t_topk = median_ms(tf.function(lambda: tf.math.top_k(tf.abs(x), k=k).indices), repeats)
            t_sel = median_ms(tf.function(lambda: topk_indices(x, k)), repeats)
            t_rk = median_ms(random_cd, repeats)
            # The fast selection is the exact one.
            assert np.array_equal(np.sort(tf.math.top_k(tf.abs(x), k=k).indices.numpy()),
                                  topk_indices(x, k).numpy())
            rows.append((n, d, k, t_copy, t_topk, t_sel, t_cd, t_cd_ops, t_rk))
            print(f"n={n:.1e} d={d} k={k} copy={t_copy:.2f} top_k={t_topk:.2f} select={t_sel:.2f} "
                  f"topk_cd={t_cd:.2f} topk_cd_tf_ops={t_cd_ops:.2f} randomk_cd={t_rk:.2f} ms",
                  flush=True)
    return rows


def section(rows, seconds, facts):
    lines = [
        BEGIN,
        "## TensorFlow",
        "",
        f"Run on {datetime.date.today()} by `python benchmarks/bench_selection_tf.py` in "
        f"{seconds:.0f} s.",
        f"Machine: {facts}.",
        "",
        "Float32 tensors of n standard-normal entries, k = ceil(d * n); medians of repeated runs, all "
        "traced with `tf.function`. *copy* is `x * s` (s a variable); *select* is "
        "`ranger_hvd.tensorflow.selection.topk_indices` alone; *top-k c+d* is one error-feedback step "
        "as every TF entry point runs it on a CPU (finiteness check, then the compiled pass of "
        "`tensorflow/cpu_path.py`: acc = e + g with the candidate screen, exact selection, values and "
        "residual in one `tf.numpy_function`) plus `exchange.finish` on the payload; *c+d, TF ops* is "
        "the same step traced with the compiled pass switched off (TensorFlow's own ops: the path of "
        "GPUs and of small tensors), the baseline; *random-k c+d* is `RangerCompressor.compress` + "
        "`decompress` at shared random coordinates. The ratio columns are within this run.",
        "",
        "| n | d | k | copy ms | tf.math.top_k ms | select ms | top-k c+d ms | c+d, TF ops ms "
        "| random-k c+d ms | top-k c+d / copy | TF ops / compiled | tf.math.top_k / select |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, d, k, c, tk, s, cd, cdo, rk in rows:
        lines.append(f"| {n:.1e} | {d} | {k} | {c:.2f} | {tk:.2f} | {s:.2f} | {cd:.2f} | {cdo:.2f} "
                     f"| {rk:.2f} | {cd / c:.2f}x | {cdo / cd:.2f}x | {tk / s:.1f}x |")
    lines += [
        "",
        "Reading: *top-k c+d* against *c+d, TF ops* is what the compiled pass saves: TensorFlow's ops "
        "take a pass for the add into the residual, two column reductions over an [8, n/8] view to "
        "find candidates, gathers and masks of the candidate block, an unsorted top_k among them and "
        "an in-place zeroing at about 100 ns per index, where the compiled pass reads e and g and "
        "writes acc once, listing candidates as it goes. Both include the finiteness sum (a read) and "
        "the scatter-add into a fresh tensor (allocating and zeroing it costs about a copy; "
        "`unsorted_segment_sum` where the pairs are dense, else `scatter_nd` at 70-150 ns per pair). "
        "Random-k draws k + a few indices, keeps the first k distinct and sorts them (no pass over n) "
        "and writes its output with `SparseToDense`. Small tensors are dominated by fixed per-call "
        "costs.",
        END,
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1e5,1e6,5e6,2.5e7")
    ap.add_argument("--densities", default="0.01,0.001")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    facts = machine(f"TensorFlow {tf.__version__}", "one intra-op and one inter-op thread")
    t0 = time.time()
    rows = run([int(float(s)) for s in args.sizes.split(",")],
               [float(s) for s in args.densities.split(",")], args.repeats)
    text = section(rows, time.time() - t0, facts)
    print(text)
    if not args.no_write and SELECTION.exists():
        old = SELECTION.read_text()
        if BEGIN in old and END in old:
            new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: text, old,
                         flags=re.S)
        else:
            new = old.rstrip("\n") + "\n\n" + text + "\n"
        SELECTION.write_text(new)


if __name__ == "__main__":
    main()
