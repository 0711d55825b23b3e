"""What every rank runs under horovodrun: compute-only steps and each exchange mode, interleaved.

    python -m netbench.worker --model resnet50 --modes dense,fp16,ranger-0.01 --steps 10 --warmup 3 \
        --json OUT.json

Every mode gets its own model, built from the same seed (each Horovod optimizer hooks the parameters
it is given), its own optimizer and wrapper; compute-only is the same model, batch and optimizer with
no wrapper. After each mode's warm-up steps, the timed steps are interleaved: each round times one
step of every mode, in an order that rotates from round to round, so a change of load during the
launch (other work, memory pressure, clocks) reaches every mode alike and the ratios stay fair. Every
timed step starts after a barrier. Bytes per rank per step come from the compressor's ``stats()`` for
ranger modes and from numel * itemsize otherwise. Rank 0 writes every rank's figures to ``--json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import time

from . import models

LR = 0.001


def parse_mode(mode: str) -> tuple[str, float | None]:
    """"dense" / "fp16" / "floor" / "ranger-D" / "hook-D" / "pertensor-D" / "global-D" -> (kind,
    density).

    ``ranger-D`` is ranger_hvd's own entry point (PyTorch: ``ranger_hvd.torch.DistributedOptimizer``
    with ``compression=RangerCompressor``, which hands Horovod groups that match the compressor's
    allgather buckets; TensorFlow: ``ranger_hvd.tensorflow.DistributedGradientTape``, which batches a
    step into one allgather and one allreduce); ``hook-D`` is always Horovod's own optimizer or tape
    with ``compression=RangerCompressor`` (PyTorch: one allgather per bucket, one token allreduce per
    tensor); ``pertensor-D`` (PyTorch) is Horovod's optimizer with ``RangerCompressor(bucket_mb=0)``,
    one allgather and one token per tensor, the exchange before buckets; ``global-D`` is Horovod's
    optimizer with
    ``RangerCompressor(exchange="global_topk")``; ``ddp`` is PyTorch's DistributedDataParallel
    over Gloo with its own allreduce, ``ddp-D`` the same with ``ranger_hook`` and ``ddpglobal-D``
    with ``ranger_hook`` and ``exchange="global_topk"`` (PyTorch only);
    ``hier-D`` and ``hierglobal-D`` are ``ranger-D`` and ``global-D`` with
    ``RangerCompressor(hierarchical=True)`` (a dense sum on each host, the sparse exchange among
    the hosts' leaders; their process sets are registered when Horovod starts, :func:`init`)."""
    if mode in ("compute", "dense", "fp16", "floor", "ddp"):
        return mode, None
    for kind in ("ranger", "hook", "pertensor", "global", "ddp", "ddpglobal", "hier", "hierglobal"):
        if mode.startswith(kind + "-"):
            return kind, float(mode.split("-", 1)[1])
    raise ValueError(f"unknown mode {mode!r}")


def interleaved(steps_by_mode: dict, warmup: int, steps: int, barrier, on_warm=None,
                before_step=None) -> tuple:
    """({mode: seconds per timed step}, {mode: each timed step's start, s after the first},
    {mode: CPU seconds this process used in each timed step, all its threads}): ``warmup`` untimed
    steps of each mode, then ``steps`` rounds of one timed step per mode, the order rotated by one
    each round. ``before_step`` (untimed) runs before each step, before its barrier."""
    before_step = before_step or (lambda: None)
    for step in steps_by_mode.values():
        for _ in range(warmup):
            before_step()
            step()
    if on_warm is not None:
        on_warm()
    times = {mode: [] for mode in steps_by_mode}
    starts = {mode: [] for mode in steps_by_mode}
    cpus = {mode: [] for mode in steps_by_mode}
    order = list(steps_by_mode)
    origin = time.perf_counter()
    for _ in range(steps):
        for mode in order:
            before_step()
            barrier(mode)  # every rank starts each timed step together
            start, cpu = time.perf_counter(), time.process_time()
            steps_by_mode[mode]()
            times[mode].append(time.perf_counter() - start)
            cpus[mode].append(time.process_time() - cpu)
            starts[mode].append(start - origin)
        order = order[1:] + order[:1]
    return times, starts, cpus


class TokensOnly:
    """The least a ``compression=`` plug-in can hand Horovod's hook: one entry of each gradient (its
    first) goes to Horovod's allreduce, and a zero gradient comes back. No selection, no payload, so
    the step time it adds is the cost of the hook itself: one collective per parameter, each
    negotiated by Horovod's background thread. Every compressor that goes through the hook, ranger's
    included, pays at least this. (The parameters do not move; only time is measured.)

    The token is taken from the gradient, and TensorFlow's zero gradient is filled with 0 * (the
    reduced token), so that a traced graph cannot prune the backward pass or the allreduce as unused.
    """

    def __init__(self, first, zeros_like):
        self._first, self._zeros_like = first, zeros_like

    def compress(self, tensor):
        return self._first(tensor), (tensor.shape, tensor.dtype)

    def decompress(self, tensor, ctx):
        return self._zeros_like(tensor, *ctx)


# ----------------------------------------------------------------------------------------- PyTorch
def init_torch(args):
    """``horovod.torch`` started once; with hierarchical modes, the process sets of the hosts (their
    ranks consecutive, HOROVOD_LOCAL_SIZE to a host, as horovodrun fills them) registered at start,
    so no mode of the launch pays for dynamic process sets."""
    import horovod.torch as hvd

    if not hvd.is_initialized():
        if any(parse_mode(m)[0] in ("hier", "hierglobal") for m in args.modes):
            from ranger_hvd.torch.hierarchical import host_process_sets

            hvd.init(process_sets=host_process_sets(int(os.environ["HOROVOD_LOCAL_SIZE"])))
        else:
            hvd.init()
    return hvd


def run_torch(args) -> tuple[dict, object]:
    import torch
    import horovod.torch as hvd
    from ranger_hvd.torch import RangerCompressor

    torch.set_num_threads(1)
    init_torch(args)

    TimedCompressor = _timed(RangerCompressor)

    def barrier(tag):
        hvd.allreduce(torch.zeros(1), name=f"bench.barrier.{tag}")

    if any(parse_mode(m)[0] in ("ddp", "ddpglobal") for m in args.modes):
        _init_torch_distributed(hvd)
    gen = torch.Generator().manual_seed(1000 + hvd.rank())
    inputs = targets = None  # one fixed batch per rank, shared by every mode
    runners = {}
    for mode in ["compute", *args.modes]:
        kind, density = parse_mode(mode)
        torch.manual_seed(0)
        model, make_batch, loss_fn = models.torch_model(args.model)
        if inputs is None:
            inputs, targets = make_batch(gen)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        comp = None
        if kind != "compute":
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            # names of their own per mode: no two modes' collectives can ever be confused
            named = [(f"{mode}/{n}", p) for n, p in model.named_parameters()]
            if kind in ("ddp", "ddpglobal"):
                model, comp = _ddp(model, density, "global_topk" if kind == "ddpglobal" else "allgather")
            elif kind == "floor":
                zeros = {}   # one reusable zero gradient per shape, as ranger keeps its output buffers

                def zero_grad(token, shape, dtype, zeros=zeros):
                    if (shape, dtype) not in zeros:   # allocated once: a fresh one would page-fault
                        zeros[shape, dtype] = torch.zeros(shape, dtype=dtype)
                    return zeros[shape, dtype]

                floor = TokensOnly(lambda t: t.reshape(-1)[:1].clone(), zero_grad)
                opt = hvd.DistributedOptimizer(opt, named_parameters=named, compression=floor)
            else:
                opt, comp = torch_exchange_optimizer(kind, density, opt, named, TimedCompressor)

        def step(model=model, opt=opt, loss_fn=loss_fn):
            opt.zero_grad()
            loss_fn(model(inputs), targets).backward()
            opt.step()

        runners[mode] = (step, params, kind, comp)

    return measure(runners, args, barrier, lambda c: (c.stats(), c.compress_s, c.decompress_s),
                   lambda p: p.numel(), lambda p: p.element_size()), hvd


def torch_exchange_optimizer(kind: str, density, opt, named, TimedCompressor):
    """``opt`` wrapped for one exchange mode (see :func:`parse_mode`), and its timed compressor
    (None for dense and fp16): the one mapping from a mode to an optimizer, for whole steps and for
    exchange only."""
    import horovod.torch as hvd
    from ranger_hvd.torch import DistributedOptimizer

    if kind == "dense":
        return hvd.DistributedOptimizer(opt, named_parameters=named), None
    if kind == "fp16":
        return hvd.DistributedOptimizer(opt, named_parameters=named,
                                        compression=hvd.Compression.fp16), None
    if kind in ("ranger", "hier"):
        comp = TimedCompressor(density=density, **({"hierarchical": True} if kind == "hier" else {}))
        return DistributedOptimizer(opt, named_parameters=named, compression=comp), comp
    if kind == "hierglobal":
        comp = TimedCompressor(density=density, exchange="global_topk", hierarchical=True)
    elif kind in ("hook", "global", "pertensor"):
        exchange = "global_topk" if kind == "global" else "allgather"
        buckets = {"bucket_mb": 0} if kind == "pertensor" else {}
        comp = TimedCompressor(density=density, exchange=exchange, **buckets)
    else:
        raise ValueError(f"{kind}: not a PyTorch exchange mode (dense, fp16, ranger-D, hook-D, "
                         "pertensor-D, global-D, hier-D, hierglobal-D)")
    return hvd.DistributedOptimizer(opt, named_parameters=named, compression=comp), comp


def ring_allreduce_received(numel: int, itemsize: int, world: int) -> int:
    """Bytes one rank receives in a ring allreduce of ``numel`` entries: reduce-scatter and
    allgather, each N-1 chunks of 1/N of the tensor (what dense and fp16 are counted as receiving;
    Horovod's Gloo allreduce is a ring)."""
    return round(2 * (world - 1) * numel * itemsize / world)


def run_torch_exchange(args, model: str) -> tuple[dict, object]:
    """Exchange only: no model, no forward or backward. Every mode shares one set of parameters
    with the spec's shapes (never read: ``torch.empty``), each mode with its own Horovod optimizer
    and compressor. Each step fills every ``.grad`` with fresh synthetic gradients (a window at a
    random offset within 4M entries of N(0, 1) numbers drawn once per rank: cheaper than drawing
    tens of millions of normals per step on a shared core), outside the timed part; the timed part is the exchange as a
    user's backward drives it: Horovod's own per-parameter hook (``_make_hook``, what backward's
    gradient accumulators call) for every parameter in backward order (reverse parameter order),
    then ``optimizer.synchronize()``: compress, the collectives, decompress."""
    import torch
    import horovod.torch as hvd
    from ranger_hvd.torch import RangerCompressor

    torch.set_num_threads(1)
    init_torch(args)
    TimedCompressor = _timed(RangerCompressor)

    def barrier(tag):
        hvd.allreduce(torch.zeros(1), name=f"bench.barrier.{model}.{tag}")

    shapes = models.exchange_shapes(model)
    params = [torch.nn.Parameter(torch.empty(shape)) for _, shape in shapes]
    sizes = [p.numel() for p in params]
    total, largest = sum(sizes), max(sizes)
    gen = torch.Generator().manual_seed(2000 + hvd.rank())
    spread = 1 << 22                                      # windows start anywhere in 4M entries
    pool = torch.randn(largest + spread, generator=gen)   # fresh gradients are windows of it
    store = torch.empty(total)                            # every .grad lives here between fills
    slots, at = [], 0
    for p, n in zip(params, sizes):
        slots.append(store[at:at + n].view(p.shape))
        at += n
    offsets = torch.Generator().manual_seed(3000 + hvd.rank())

    def fill():
        for p, slot, n in zip(params, slots, sizes):
            start = int(torch.randint(0, spread, (1,), generator=offsets))
            slot.view(-1).copy_(pool[start:start + n])
            p.grad = slot.view(p.shape)   # a fresh view: decompress's set_ leaves the slot alone

    runners = {}
    for mode in args.modes:
        kind, density = parse_mode(mode)
        named = [(f"{model}/{mode}/{n}", p) for (n, _), p in zip(shapes, params)]
        opt = torch.optim.SGD(params, lr=LR)
        opt, comp = torch_exchange_optimizer(kind, density, opt, named, TimedCompressor)
        hooks = [opt._make_hook(p) for p in reversed(params)]

        def exchange(opt=opt, hooks=hooks):
            for hook in hooks:
                hook()
            opt.synchronize()

        runners[mode] = (exchange, params, kind, comp)

    return measure(runners, args, barrier, lambda c: (c.stats(), c.compress_s, c.decompress_s),
                   lambda p: p.numel(), lambda p: p.element_size(), before_step=fill,
                   world=hvd.size()), hvd


def _timed(base):
    class TimedCompressor(base):
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

    return TimedCompressor


def _init_torch_distributed(hvd) -> None:
    """torch.distributed (Gloo) over the ranks horovodrun started: rank 0 picks a free port on its
    address (each test host maps the hostname to its own) and broadcasts it."""
    import torch.distributed as dist

    address = None
    if hvd.rank() == 0:
        host = socket.gethostbyname(socket.gethostname())
        with socket.socket() as probe:
            probe.bind((host, 0))
            address = f"{host}:{probe.getsockname()[1]}"
    address = hvd.broadcast_object(address, root_rank=0, name="bench.ddp.address")
    dist.init_process_group("gloo", init_method=f"tcp://{address}", rank=hvd.rank(),
                            world_size=hvd.size())


def _ddp(model, density, exchange="allgather"):
    """The model under DistributedDataParallel, with ``ranger_hook`` at ``density`` and ``exchange``
    (or DDP's own allreduce for None); returns (wrapped model, hook state or None)."""
    from torch.nn.parallel import DistributedDataParallel
    from ranger_hvd.torch.ddp import RangerHookState, ranger_hook

    state = None
    named = list(model.named_parameters())
    model = DistributedDataParallel(model)
    if density is not None:
        state = RangerHookState(named, density=density, exchange=exchange)
        state.compress_s = state.decompress_s = 0.0   # not split for DDP: its hook runs both

        def timed(st, bucket):
            start = time.perf_counter()
            try:
                return ranger_hook(st, bucket)
            finally:
                st.compress_s += time.perf_counter() - start

        model.register_comm_hook(state, timed)
    return model, state


# -------------------------------------------------------------------------------------- TensorFlow
def run_tf(args) -> tuple[dict, object]:
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import horovod.tensorflow as hvd
    from ranger_hvd.tensorflow import DistributedGradientTape as RangerTape
    from ranger_hvd.tensorflow import RangerCompressor

    hvd.init()

    def barrier(tag):
        hvd.allreduce(tf.zeros(1), name=f"bench.barrier.{tag}")

    runners = {}
    for mode in ["compute", *args.modes]:
        kind, density = parse_mode(mode)
        tf.keras.utils.set_random_seed(0)
        model, (x, y) = models.tf_model(args.model)
        variables = model.trainable_variables
        opt = tf.keras.optimizers.SGD(LR)
        loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=False)
        comp = None
        if kind in ("global", "ddp", "ddpglobal", "pertensor"):
            raise ValueError(f"{mode} runs on PyTorch models only")
        if kind == "ranger":   # ranger_hvd's tape keys its state by variable
            comp = RangerCompressor(density=density, name=f"bench_{mode}")
        elif kind == "hook":   # Horovod's tape hands the compressor tensors in this order
            comp = RangerCompressor(density=density, variables=variables, name=f"bench_{mode}")
        floor = TokensOnly(lambda t: tf.reshape(t, [-1])[:1],
                           lambda token, shape, dtype: tf.fill(shape, tf.cast(token[0], dtype) * 0))
        wrap = {"compute": None,
                "dense": lambda t: hvd.DistributedGradientTape(t),
                "fp16": lambda t: hvd.DistributedGradientTape(t, compression=hvd.Compression.fp16),
                "floor": lambda t, floor=floor: hvd.DistributedGradientTape(t, compression=floor),
                "hook": lambda t, comp=comp: hvd.DistributedGradientTape(t, compression=comp),
                "ranger": lambda t, comp=comp: RangerTape(t, compression=comp)}[kind]
        if kind != "compute":
            hvd.broadcast_variables(model.variables, root_rank=0)

        def make_train(model, variables, opt, loss_fn, wrap):
            @tf.function
            def train(x, y):
                with tf.GradientTape() as tape:
                    loss = loss_fn(y, model(x, training=True))
                grads = (tape if wrap is None else wrap(tape)).gradient(loss, variables)
                opt.apply_gradients(zip(grads, variables))
                return loss
            return train

        train = make_train(model, variables, opt, loss_fn, wrap)

        def step(train=train, x=x, y=y):
            train(x, y).numpy()  # waits for the step to finish

        runners[mode] = (step, variables, kind, comp)

    # the TF compressor runs inside the traced step: its time is not separable
    return measure(runners, args, barrier, lambda c: (c.stats(), 0.0, 0.0),
                   lambda v: int(np.prod(v.shape)), lambda v: v.dtype.size), hvd


# ------------------------------------------------------------------------------------------ common
def measure(runners: dict, args, barrier, snapshot, numel, itemsize, before_step=None,
            world: int = 1) -> dict:
    """Each mode's figures: ``runners`` maps mode -> (step, parameters, kind, compressor or None);
    ``snapshot(compressor)`` is (stats, compress s, decompress s) when the warm-up is over;
    ``world`` is the number of ranks (for the bytes a ring allreduce receives)."""
    before = {}

    def on_warm():
        for mode, (_, _, _, comp) in runners.items():
            if comp is not None:
                before[mode] = snapshot(comp)

    times, starts, cpus = interleaved({m: r[0] for m, r in runners.items()}, args.warmup, args.steps,
                                      barrier, on_warm, before_step)
    return {mode: _figures(times[mode], starts[mode], params, kind, comp, before.get(mode), args.steps,
                           numel, itemsize, cpus[mode], world)
            for mode, (_, params, kind, comp) in runners.items()}


def _figures(times, starts, params, kind, comp, before, steps, numel, itemsize, cpus, world) -> dict:
    fig = {"times_s": times, "starts_s": starts, "cpu_s": cpus}
    print(f"[bench] {kind}{'' if comp is None else ' d=' + str(comp.options.density)}: median "
          f"{1e3 * sorted(times)[len(times) // 2]:.0f} ms over {len(times)} steps", flush=True)
    if kind == "compute":
        fig["bytes_per_step"] = 0
    elif kind in ("dense", "fp16") or (kind == "ddp" and comp is None):
        fig["bytes_per_step"] = sum(numel(p) * (2 if kind == "fp16" else itemsize(p)) for p in params)
        fig["bytes_received_per_step"] = sum(ring_allreduce_received(
            numel(p), 2 if kind == "fp16" else itemsize(p), world) for p in params)
        fig["bytes_received_counted"] = "ring allreduce, 2(N-1)/N x numel x itemsize"
    elif kind == "floor":
        fig["bytes_per_step"] = sum(itemsize(p) for p in params)   # one entry of each gradient
    else:
        now, (then, c0, d0) = comp.stats(), before
        per = {key: (now[key] - then[key]) / steps for key in
               ("bytes_sent", "bytes_dense", "tensors_sparse", "tensors_dense", "elements_selected")
               if key in now}
        fig["bytes_per_step"] = per["bytes_sent"]
        if "bytes_received" in now:
            fig["bytes_received_per_step"] = (now["bytes_received"] - then["bytes_received"]) / steps
            fig["bytes_received_counted"] = "the compressor's stats()['bytes_received']"
        if "bytes_received_local" in now:   # hierarchical: the host's dense sum and its share of pairs
            fig["bytes_received_local_per_step"] = (now["bytes_received_local"]
                                                    - then.get("bytes_received_local", 0)) / steps
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


def pin_to_core(rank: int) -> None:
    """Binds this process, and every thread it starts from now on (Horovod's, Gloo's, the
    framework's), to one core: the rank-th of the cores it may use, modulo their number.

    The test hosts share one machine; real hosts each have their own cores. Pinned, two ranks on two
    cores never take turns on one core or migrate between them, as two hosts would not.
    """
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {allowed[rank % len(allowed)]})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a model of netbench.models.SPECS (--exchange-only: "
                   "several, comma-separated, measured one after the other in this launch)")
    p.add_argument("--modes", type=lambda s: s.split(","), required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--exchange-only", action="store_true",
                   help="no model: synthetic gradients of the spec's shapes, time only the exchange")
    p.add_argument("--pin", action="store_true",
                   help="run on one core, rank r on the r-th allowed core (mod their number)")
    args = p.parse_args(argv)
    for mode in args.modes:
        parse_mode(mode)
    if args.pin:
        pin_to_core(int(os.environ["HOROVOD_RANK"]))
    names = args.model.split(",")
    unknown = [m for m in names if m not in models.SPECS] + names[1:] * (not args.exchange_only)
    if unknown:
        p.error(f"--model {args.model}: one of {sorted(models.SPECS)} (several only with --exchange-only)")
    spec = models.SPECS[names[0]]
    if args.exchange_only:
        figures = {}
        for name in names:   # one model at a time: its tensors are freed before the next
            print(f"[bench] {name}, exchange only", flush=True)
            figures[name], hvd = run_torch_exchange(args, name)
            gc.collect()
    else:
        figures, hvd = (run_torch if spec.framework == "torch" else run_tf)(args)
    gathered = hvd.allgather_object(figures, name="bench.figures")
    # each test host maps the machine's hostname to its own address: proof of where each rank ran
    addresses = hvd.allgather_object(socket.gethostbyname(socket.gethostname()), name="bench.addresses")
    cores = hvd.allgather_object(sorted(os.sched_getaffinity(0)), name="bench.cores")
    if hvd.rank() == 0:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "size": hvd.size(), "ranks": gathered,
                       "addresses": addresses, "cores": cores, "exchange_only": args.exchange_only,
                       # what horovodrun handed the ranks (unset: Horovod's default)
                       "cycle_time_env": os.environ.get("HOROVOD_CYCLE_TIME")}, f)


if __name__ == "__main__":
    main()
