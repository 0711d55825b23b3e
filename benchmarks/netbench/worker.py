"""What every rank runs under horovodrun: compute-only steps, then each exchange mode, timed per step.

    python -m netbench.worker --model resnet50 --modes dense,fp16,ranger-0.01 --steps 10 --warmup 3 \
        --json OUT.json

Compute-only runs first and again last ("compute-end"), so that a change of load during the launch
shows, and the compute figure pools both. For each mode the model is built afresh from the same seed (each Horovod optimizer hooks the
parameters it is given), wrapped, warmed up, then timed step by step (forward, backward, exchange,
update). Compute-only runs the same model, batch and optimizer with no wrapper. Bytes per rank per
step come from the compressor's ``stats()`` for ranger modes and from numel * itemsize otherwise.
Rank 0 writes every rank's figures to ``--json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import socket
import time

from . import models

LR = 0.001


def parse_mode(mode: str) -> tuple[str, float | None]:
    """"dense" / "fp16" / "ranger-D" -> (kind, density)."""
    if mode in ("compute", "dense", "fp16"):
        return mode, None
    if mode == "compute-end":   # compute only again after the other modes: load drift shows
        return "compute", None
    if mode.startswith("ranger-"):
        return "ranger", float(mode.split("-", 1)[1])
    raise ValueError(f"unknown mode {mode!r}")


def _timed(step, warmup: int, steps: int, barrier) -> list[float]:
    for _ in range(warmup):
        step()
    barrier()  # every rank starts the timed steps together
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


# ----------------------------------------------------------------------------------------- PyTorch
def run_torch(args) -> tuple[dict, object]:
    import torch
    import horovod.torch as hvd
    from ranger_hvd.torch import RangerCompressor

    torch.set_num_threads(1)
    hvd.init()

    class TimedCompressor(RangerCompressor):
        """Adds up the time spent in compress (error feedback, selection, starting the allgather)
        and decompress (waiting for the allgather, scatter-add)."""

        compress_s = decompress_s = 0.0

        def compress(self, tensor):
            start = time.perf_counter()
            try:
                return super().compress(tensor)
            finally:
                self.compress_s += time.perf_counter() - start

        def decompress(self, tensor, ctx):
            start = time.perf_counter()
            try:
                return super().decompress(tensor, ctx)
            finally:
                self.decompress_s += time.perf_counter() - start

    def barrier(tag):
        hvd.allreduce(torch.zeros(1), name=f"bench.barrier.{tag}")

    gen = torch.Generator().manual_seed(1000 + hvd.rank())
    out = {}
    for mode in ["compute", *args.modes, "compute-end"]:
        kind, density = parse_mode(mode)
        torch.manual_seed(0)
        model, make_batch, loss_fn = models.torch_model(args.model)
        inputs, targets = make_batch(gen)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        comp = None
        if kind != "compute":
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            named = list(model.named_parameters())
            if kind == "dense":
                opt = hvd.DistributedOptimizer(opt, named_parameters=named)
            elif kind == "fp16":
                opt = hvd.DistributedOptimizer(opt, named_parameters=named, compression=hvd.Compression.fp16)
            else:
                comp = TimedCompressor(density=density)
                opt = hvd.DistributedOptimizer(opt, named_parameters=named, compression=comp)

        def step():
            opt.zero_grad()
            loss_fn(model(inputs), targets).backward()
            opt.step()

        before = None
        if comp is not None:
            for _ in range(args.warmup):
                step()
            before = (comp.stats(), comp.compress_s, comp.decompress_s)
            times = _timed(step, 0, args.steps, lambda: barrier(mode))
        else:
            times = _timed(step, args.warmup, args.steps, lambda: barrier(mode))
        out[mode] = _figures(times, params, kind, comp, before, args.steps,
                             lambda p: p.numel(), lambda p: p.element_size())
        del opt, model
        gc.collect()
    return out, hvd


# -------------------------------------------------------------------------------------- TensorFlow
def run_tf(args) -> tuple[dict, object]:
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import horovod.tensorflow as hvd
    from ranger_hvd.tensorflow import RangerCompressor

    hvd.init()

    def barrier(tag):
        hvd.allreduce(tf.zeros(1), name=f"bench.barrier.{tag}")

    out = {}
    for mode in ["compute", *args.modes, "compute-end"]:
        kind, density = parse_mode(mode)
        tf.keras.utils.set_random_seed(0)
        model, (x, y) = models.tf_model(args.model)
        variables = model.trainable_variables
        opt = tf.keras.optimizers.SGD(LR)
        loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=False)
        comp = None
        if kind == "ranger":
            comp = RangerCompressor(density=density, variables=variables)
        wrap = {"compute": None,
                "dense": lambda t: hvd.DistributedGradientTape(t),
                "fp16": lambda t: hvd.DistributedGradientTape(t, compression=hvd.Compression.fp16),
                "ranger": lambda t: hvd.DistributedGradientTape(t, compression=comp)}[kind]
        if kind != "compute":
            hvd.broadcast_variables(model.variables, root_rank=0)

        @tf.function
        def train(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            grads = (tape if wrap is None else wrap(tape)).gradient(loss, variables)
            opt.apply_gradients(zip(grads, variables))
            return loss

        def step():
            train(x, y).numpy()  # waits for the step to finish

        for _ in range(args.warmup):
            step()
        before = (comp.stats(), 0.0, 0.0) if comp is not None else None
        times = _timed(step, 0, args.steps, lambda: barrier(mode))
        out[mode] = _figures(times, variables, kind, comp, before, args.steps,
                             lambda v: int(np.prod(v.shape)), lambda v: v.dtype.size)
        del model, opt, train
        tf.keras.backend.clear_session()  # drop the previous mode's model and traces
        gc.collect()
    return out, hvd


# ------------------------------------------------------------------------------------------ common
def _figures(times, params, kind, comp, before, steps, numel, itemsize) -> dict:
    fig = {"times_s": times}
    print(f"[bench] {kind}{'' if comp is None else ' d=' + str(comp.options.density)}: median "
          f"{1e3 * sorted(times)[len(times) // 2]:.0f} ms over {len(times)} steps", flush=True)
    if kind == "compute":
        fig["bytes_per_step"] = 0
    elif kind in ("dense", "fp16"):
        fig["bytes_per_step"] = sum(numel(p) * (2 if kind == "fp16" else itemsize(p)) for p in params)
    else:
        now, (then, c0, d0) = comp.stats(), before
        per = {key: (now[key] - then[key]) / steps for key in
               ("bytes_sent", "bytes_dense", "tensors_sparse", "tensors_dense", "elements_selected")}
        fig["bytes_per_step"] = per["bytes_sent"]
        fig["profile"] = {
            "allgathers_per_step": per["tensors_sparse"],
            "dense_allreduces_per_step": per["tensors_dense"],
            "elements_selected_per_step": per["elements_selected"],
            "bytes_dense_fp32_per_step": per["bytes_dense"],
        }
        if hasattr(comp, "compress_s"):
            fig["profile"]["compress_ms_per_step"] = 1e3 * (comp.compress_s - c0) / steps
            fig["profile"]["decompress_ms_per_step"] = 1e3 * (comp.decompress_s - d0) / steps
    return fig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, choices=sorted(models.SPECS))
    p.add_argument("--modes", type=lambda s: s.split(","), required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    for mode in args.modes:
        parse_mode(mode)
    spec = models.SPECS[args.model]
    figures, hvd = (run_torch if spec.framework == "torch" else run_tf)(args)
    gathered = hvd.allgather_object(figures, name="bench.figures")
    # each test host maps the machine's hostname to its own address: proof of where each rank ran
    addresses = hvd.allgather_object(socket.gethostbyname(socket.gethostname()), name="bench.addresses")
    if hvd.rank() == 0:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "size": hvd.size(), "ranks": gathered,
                       "addresses": addresses}, f)


if __name__ == "__main__":
    main()
