"""Compression cost per tensor on one CPU thread: Ranger's selection against torch.topk and a copy.

For each size n (1e5 .. 2.5e7 float32 entries) and density d (0.01, 0.001), one run measures:

* ``clone``            one ``x.clone()``: the memory-bandwidth floor any pass over x pays;
* ``torch.topk``       ``torch.topk(x.abs(), k)``, the obvious exact selection;
* ``select``           ``ranger_hvd.torch.topk_indices`` alone (sampled threshold, exact among
                       candidates, same set as torch.topk up to ties, ties to the lower index);
* ``top-k c+d``        what the drop-in optimizer pays per tensor and step: ``compress_sparse``
                       (finiteness check, error feedback, selection, gather, residual update) plus
                       ``combine`` (one scatter-add of the payload into the zeroed gradient);
* ``random-k c+d``     the same for Horovod's own optimizer: ``compress`` (shared random
                       coordinates, error feedback) plus ``decompress``.

Times are medians over repetitions; ratios come from the same run. The Markdown table goes to
stdout and between the PyTorch markers of docs/results/selection.md (the rest of that file,
including the TensorFlow section of ``bench_selection_tf.py``, is left as it is).

    python benchmarks/bench_selection.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import sys
import time

import torch

from common import REPO, RESULTS, machine, median_seconds

sys.path.insert(0, str(REPO))

from ranger_hvd import core  # noqa: E402
from ranger_hvd.torch import RangerCompressor, topk_indices  # noqa: E402
from ranger_hvd.torch.compressor import pack_pairs  # noqa: E402
from ranger_hvd.torch.selection import SelectionScratch  # noqa: E402

SELECTION = RESULTS / "selection.md"
TORCH_BEGIN = "<!-- BEGIN PYTORCH SECTION: written by benchmarks/bench_selection.py -->"
TORCH_END = "<!-- END PYTORCH SECTION -->"
TF_BEGIN = "<!-- BEGIN TENSORFLOW SECTION: maintained by the TensorFlow backend -->"
TF_END = "<!-- END TENSORFLOW SECTION -->"

SIZES = [100_000, 1_000_000, 5_000_000, 25_000_000]
DENSITIES = [0.01, 0.001]


def bench(n: int, d: float, reps: int) -> dict:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen)
    k = core.num_selected(n, d)
    shape = (n // 1000, 1000)
    scratch = SelectionScratch()

    row = {"n": n, "d": d, "k": k}
    row["clone"] = median_seconds(lambda: x.clone(), reps)
    row["topk"] = median_seconds(lambda: torch.topk(x.abs(), k), max(1, reps // 2))
    row["select"] = median_seconds(lambda: topk_indices(x, k, 0.01, scratch), reps)

    comp = RangerCompressor(density=d, min_elements=1)
    grad = x.view(shape)
    out = torch.empty(n)

    def topk_round():
        values, indices = comp.compress_sparse("w", grad)
        comp.combine(pack_pairs(indices, values), k, out.zero_())

    row["topk_cd"] = median_seconds(topk_round, reps)

    param = torch.nn.Parameter(torch.zeros(shape))
    param.grad = grad
    rand = RangerCompressor(density=d, min_elements=1, named_parameters=[("w", param)],
                            selection="random")
    rand.world_size = 1

    def random_round():
        values, ctx = rand.compress(param.grad)
        rand.decompress(values, ctx)

    row["random_cd"] = median_seconds(random_round, reps)
    # Sanity: the selected set is torch.topk's (no ties in continuous random data).
    want = torch.sort(torch.topk(x.abs(), k).indices).values.to(torch.int32)
    assert torch.equal(topk_indices(x, k, 0.01, scratch), want)
    return row


def table(rows: list[dict]) -> str:
    head = ("| n | d | k | clone ms | torch.topk ms | select ms | top-k c+d ms | random-k c+d ms "
            "| select / clone | top-k c+d / clone | torch.topk / top-k c+d |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        ms = {key: r[key] * 1e3 for key in ("clone", "topk", "select", "topk_cd", "random_cd")}
        lines.append(
            f"| {r['n']:.1e} | {r['d']} | {r['k']} | {ms['clone']:.2f} | {ms['topk']:.2f} "
            f"| {ms['select']:.2f} | {ms['topk_cd']:.2f} | {ms['random_cd']:.2f} "
            f"| {r['select'] / r['clone']:.2f}x | {r['topk_cd'] / r['clone']:.2f}x "
            f"| {r['topk'] / r['topk_cd']:.1f}x |")
    return "\n".join(lines)


def torch_section(rows: list[dict], facts: str, seconds: float) -> str:
    return f"""{TORCH_BEGIN}
## PyTorch

Run on {_dt.date.today().isoformat()} by `python benchmarks/bench_selection.py` in {seconds:.0f} s.
Machine: {facts}.

Float32 tensors of n standard-normal entries, k = ceil(d * n); medians of repeated runs.
*select* is `ranger_hvd.torch.topk_indices` alone; *top-k c+d* is one `compress_sparse` (finiteness
check, error feedback, selection, gather, residual update) plus one `combine` (scatter-add
into the zeroed gradient), the per-tensor cost of `ranger_hvd.torch.DistributedOptimizer` and
`Ranger`; *random-k c+d* is the same for Horovod's own optimizer with `compression=RangerCompressor`
(`compress` + `decompress`). The last three columns are ratios within this run.

{table(rows)}

Reading: *clone* allocates a fresh tensor, so on large tensors it includes the page faults of new
memory. On CPU, `compress_sparse` folds the error-feedback add into the selection's candidate pass
(`ranger_hvd/core/cpu_scan.py`), so the full top-k compress + combine costs about what *select*
alone does, and `torch.topk` alone costs several times more. Small tensors are dominated by fixed
per-call costs.
{TORCH_END}"""


TF_PLACEHOLDER = f"""{TF_BEGIN}
## TensorFlow

(To be filled by the TensorFlow backend's benchmark: the same sizes and densities, same columns.)
{TF_END}"""


def write_results(section: str) -> None:
    if SELECTION.exists():
        text = SELECTION.read_text()
        pattern = re.compile(re.escape(TORCH_BEGIN) + ".*?" + re.escape(TORCH_END), re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _: section, text)
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
        if TF_BEGIN not in text:
            text = text.rstrip() + "\n\n" + TF_PLACEHOLDER + "\n"
    else:
        text = ("# Selection benchmarks\n\n"
                "Compression cost per tensor against `topk` and a plain copy (the memory-bandwidth "
                "floor). Each backend's script rewrites only its own section.\n\n"
                f"{section}\n\n{TF_PLACEHOLDER}\n")
    SELECTION.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no results file")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    facts = machine(f"PyTorch {torch.__version__}", "torch.set_num_threads(1)")
    start = time.perf_counter()
    rows = []
    for n in SIZES:
        reps = 3 if args.quick else max(3, min(15, int(2e8 // (n * 10))))
        for d in DENSITIES:
            rows.append(bench(n, d, reps))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    seconds = time.perf_counter() - start
    print()
    print(table(rows))
    if not (args.quick or args.no_write):
        write_results(torch_section(rows, facts, seconds))
        print(f"\nwrote {SELECTION.relative_to(REPO)}")


if __name__ == "__main__":
    main()
