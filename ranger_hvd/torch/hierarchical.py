"""Hierarchical hosts (``hierarchical=True``): a dense sum on each host, one sparse exchange among hosts.

Ranks on one host share memory or a fast local link; the network between hosts is the slow part.
With ``RangerCompressor(hierarchical=True)`` each compressed gradient takes three hops:

1. ``compress`` on every rank starts an allreduce (Sum) of the gradient over its host's process set
   (asynchronous, in place on the gradient as Horovod's own allreduce is) and hands Horovod the
   1-element token, as the flat exchange does;
2. the host's **leader** (its lowest rank: local rank 0 under horovodrun) takes each host sum as it
   arrives, runs the error-feedback step on it (``core.ErrorFeedback``, through
   ``RangerCompressor.compress_sparse``) and sends its pairs in the compressor's sparse exchange
   (``exchange="allgather"`` or ``"global_topk"``) over the process set of the leaders, so the
   sparse exchange has H members, the number of hosts, not N;
3. in ``decompress`` the leader hands every host's pairs (what the exchange brought it) to the
   other ranks of its host (an allgather over the host to which only the leader brings bytes:
   H*k pairs, not the dense result), and each rank scatter-adds them and divides by N (all ranks:
   Horovod's token gives 1 for ``Average`` and N for ``Sum``, as in the flat exchange) with the
   compressor's own ``scatter_pairs``, so every rank of every host gets the same bits.

**Residuals live on the leaders**: a leader's residual (and DGC momentum) holds what its host's
summed gradients have not yet sent; the other ranks of a host keep no residual and no momentum for
compressed tensors. ``clip_norm`` clips each host sum at clip_norm / sqrt(H). Tensors that travel
whole (small ones, 1-D ones) still go through Horovod's allreduce over all ranks.

**Process sets.** The compressor needs one Horovod process set per host with more than one rank and
one of the leaders. It finds the hosts itself (each rank's ``HOROVOD_HOSTNAME``, which horovodrun
sets, else its host name, checked against Horovod's local ranks) unless ``hosts=`` says which ranks
share a host, and uses process sets with those ranks that are already registered (static ones
given to ``hvd.init(process_sets=host_process_sets(...))``); the others it adds, which Horovod
allows only with dynamic process sets (``HOROVOD_DYNAMIC_PROCESS_SETS=1`` or
``hvd.init(process_sets="dynamic")``; the launcher sets the variable when
``compression.hierarchical`` is true), at the cost of an agreement of all ranks on the table of sets
at every cycle of Horovod's background loop. Refused with an error that says what to do: one rank
per host everywhere (nothing to sum), hosts that do not cover the ranks, an optimizer over a
process set other than all ranks, elastic horovodrun.

**Bytes.** ``stats()["bytes_sent"]`` and ``["bytes_received"]`` count the sparse exchange among
the leaders and Horovod's token, as for the flat exchange (a rank that is not a leader sends only
the token of each compressed tensor); within the host, the dense sum (the size of its result, as
the dense path counts an allreduce) and the leader's pairs are counted apart in
``bytes_sent_local`` and ``bytes_received_local``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ranger_hvd import core

HOSTNAME_ENV = "HOROVOD_HOSTNAME"        # horovodrun's name for a rank's host
DYNAMIC_ENV = "HOROVOD_DYNAMIC_PROCESS_SETS"


class HostLayoutError(core.OptionsError):
    """Hosts that cannot serve ``hierarchical=True``; the message names the culprit and the fix."""


ONE_RANK_PER_HOST = (
    "hierarchical=True needs several ranks on at least one host, but each of the {size} rank(s) is "
    "alone on its host: there is nothing to sum before the sparse exchange. Start 2 or more ranks "
    "per host (horovodrun -H host1:2,host2:2; cluster.hosts with 2+ slots each), or drop "
    "hierarchical.")


@dataclass(frozen=True)
class HostLayout:
    """Which ranks share a host: each host's ranks ascending, hosts in order of their lowest rank."""

    hosts: tuple[tuple[int, ...], ...]
    size: int

    @property
    def leaders(self) -> tuple[int, ...]:
        """Each host's lowest rank, the one that runs the sparse step for the host."""
        return tuple(host[0] for host in self.hosts)

    def host_of(self, rank: int) -> tuple[int, ...]:
        for host in self.hosts:
            if rank in host:
                return host
        raise KeyError(rank)


def normalize_hosts(hosts) -> tuple[tuple[int, ...], ...]:
    """``hosts=`` as given (lists of ranks, or Horovod ``ProcessSet`` objects) as tuples of ranks; checks
    the form only (:func:`check_layout` checks them against the job)."""
    if isinstance(hosts, (str, bytes)) or not hasattr(hosts, "__iter__"):
        raise HostLayoutError(f"hosts must be a list of hosts, each a list of ranks or a Horovod "
                              f"ProcessSet, e.g. hosts=[[0, 1], [2, 3]]; got {hosts!r}")
    out = []
    for i, host in enumerate(hosts):
        ranks = getattr(host, "ranks", host)
        if ranks is None:
            raise HostLayoutError(f"hosts[{i}] is a ProcessSet without a list of ranks (made from an "
                                  "MPI communicator): give its ranks as a list")
        if isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__iter__"):
            raise HostLayoutError(f"hosts[{i}] must be a list of ranks or a Horovod ProcessSet, got "
                                  f"{host!r}")
        ranks = list(ranks)
        if not ranks:
            raise HostLayoutError(f"hosts[{i}] is empty: every host has at least one rank")
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, int) or r < 0:
                raise HostLayoutError(f"hosts[{i}] holds {r!r}: ranks are integers >= 0")
        out.append(tuple(sorted(ranks)))
    if not out:
        raise HostLayoutError("hosts is empty: give every rank's host, e.g. hosts=[[0, 1], [2, 3]]")
    return tuple(out)


def check_layout(hosts: Sequence[Sequence[int]], size: int) -> HostLayout:
    """The hosts of a job of ``size`` ranks: every rank in exactly one host, and at least one host
    with two or more ranks (else hierarchical would do nothing)."""
    where: dict[int, int] = {}
    for i, host in enumerate(hosts):
        for r in host:
            if r >= size:
                raise HostLayoutError(f"hosts[{i}] holds rank {r}, but the job has {size} ranks "
                                      f"(0..{size - 1})")
            if r in where:
                twice = (f"twice in hosts[{i}]" if where[r] == i
                         else f"in hosts[{where[r]}] and in hosts[{i}]")
                raise HostLayoutError(f"rank {r} is {twice}: each rank belongs to exactly one host")
            where[r] = i
    missing = sorted(set(range(size)) - set(where))
    if missing:
        raise HostLayoutError(f"the hosts do not cover rank(s) {missing}: each of the {size} ranks "
                              "must be in exactly one host")
    if all(len(host) == 1 for host in hosts):
        raise HostLayoutError(ONE_RANK_PER_HOST.format(size=size))
    ordered = sorted((tuple(sorted(host)) for host in hosts), key=lambda host: host[0])
    return HostLayout(tuple(ordered), size)


def layout_from_places(places: Sequence[tuple[str, int, int]]) -> HostLayout:
    """The hosts from what each rank reports, ``places[rank] = (host name, local rank, local
    size)``: ranks that name the same host share it, and Horovod's local ranks must agree."""
    groups: dict[str, list[int]] = {}
    for rank, (host, _, _) in enumerate(places):
        groups.setdefault(host, []).append(rank)
    for host, ranks in groups.items():
        local_ranks = sorted(places[r][1] for r in ranks)
        sizes = sorted({places[r][2] for r in ranks})
        if local_ranks != list(range(len(ranks))) or sizes != [len(ranks)]:
            raise HostLayoutError(
                f"ranks {ranks} name host {host!r}, but Horovod gives them local ranks {local_ranks} "
                f"and local sizes {sizes}, not one rank each of 0..{len(ranks) - 1}: say which ranks "
                "share a host with RangerCompressor(..., hosts=[[0, 1], [2, 3]])")
    return check_layout(list(groups.values()), len(places))


def my_place() -> tuple[str, int, int]:
    """(host name, local rank, local size) of this rank, for :func:`layout_from_places`."""
    import horovod.torch as hvd

    host = os.environ.get(HOSTNAME_ENV) or socket.gethostname()
    return host, hvd.local_rank(), hvd.local_size()


def needed_sets(layout: HostLayout) -> list[tuple[int, ...]]:
    """The process sets hierarchical uses, in the order every rank registers them: each host of two
    or more ranks, then the leaders."""
    return [host for host in layout.hosts if len(host) > 1] + [layout.leaders]


def host_process_sets(hosts, size: int | None = None) -> list:
    """The process sets ``hierarchical=True`` uses, to register when Horovod starts:
    ``hvd.init(process_sets=host_process_sets(2))``; the compressor then finds them and needs no
    dynamic process sets, which cost every cycle of Horovod's background loop an agreement of all
    ranks on the table of process sets (an allgather of two integers over all ranks).

    ``hosts``: lists of ranks, or an int R: R consecutive ranks to a host, the order in which
    horovodrun fills hosts of R slots. ``size``: the number of ranks (default: ``HOROVOD_SIZE``,
    which horovodrun sets before Horovod starts).
    """
    from horovod.common.process_sets import ProcessSet

    if size is None:
        try:
            size = int(os.environ["HOROVOD_SIZE"])
        except (KeyError, ValueError):
            raise HostLayoutError("host_process_sets needs size=... (the number of ranks) where "
                                  "horovodrun has not set HOROVOD_SIZE") from None
    if isinstance(hosts, int) and not isinstance(hosts, bool):
        if hosts < 1 or size % hosts:
            raise HostLayoutError(f"{size} ranks do not make hosts of {hosts} ranks each; give the "
                                  "hosts as lists of ranks, e.g. [[0, 1, 2], [3]]")
        hosts = [list(range(start, start + hosts)) for start in range(0, size, hosts)]
    layout = check_layout(normalize_hosts(hosts), size)
    return [ProcessSet(list(ranks)) for ranks in needed_sets(layout)]


def process_sets_for(layout: HostLayout) -> dict[tuple[int, ...], Any]:
    """Horovod process sets with exactly these ranks: registered ones (static, or added earlier) are
    reused, missing ones added (dynamic process sets only). Every rank calls this alike."""
    import horovod.torch as hvd
    from horovod.common import process_sets as registry

    needed = needed_sets(layout)
    table = {tuple(ranks): pid for pid, ranks in registry._basics._get_process_set_ids_and_ranks().items()}
    found = {}
    for ranks in needed:
        pid = table.get(ranks)
        if pid == 0:
            found[ranks] = hvd.global_process_set
        elif pid is not None:
            ps = registry._temp_process_set_object(pid)
            ps.ranks = list(ranks)
            found[ranks] = ps
    for ranks in needed:
        if ranks in found:
            continue
        try:
            found[ranks] = hvd.add_process_set(list(ranks))
        except ValueError as exc:
            if DYNAMIC_ENV not in str(exc):
                raise
            listed = ", ".join(f"hvd.ProcessSet({list(r)})" for r in needed)
            raise HostLayoutError(
                f"hierarchical=True needs a Horovod process set for each host of 2+ ranks and one of "
                f"the hosts' leaders: {[list(r) for r in needed]}. Either let the compressor add "
                f"them: start Horovod with dynamic process sets ({DYNAMIC_ENV}=1 in every rank's "
                "environment, or hvd.init(process_sets='dynamic'); ranger-hvd's launcher sets the "
                "variable when compression.hierarchical is true), or register them at start-up: "
                f"hvd.init(process_sets=[{listed}]).") from None
    return found


@dataclass
class HierContext:
    """What ``decompress`` needs of a tensor that took the hierarchical path; stays on this rank."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    kind: str = "hier"


@dataclass
class _LocalSum:
    """A host sum in flight: its handle, the buffer it lands in, and what the leader needs then."""

    handle: Any
    buffer: torch.Tensor
    ctx: HierContext
    owner: Any


class HierarchicalHosts:
    """The hierarchical path of one ``RangerCompressor``: host sums, the leaders' sparse step and
    exchange (the compressor's own), and the sharing of the exchanged pairs within each host."""

    def __init__(self, compressor, hosts=None):
        self.comp = compressor
        self.given = None if hosts is None else normalize_hosts(hosts)
        self.layout: HostLayout | None = None
        self.local = None      # this host's process set (None when the rank is alone on its host)
        self.cross = None      # the leaders' process set (None on ranks that are not leaders)
        self.leader = -1       # global rank of this host's leader
        self.is_leader = False
        self.local_size = 1
        self.total = 1         # N: every rank
        self._sums: dict[str, _LocalSum] = {}          # the leader's host sums in flight
        self._waiting: dict[str, tuple[Any, HierContext]] = {}   # others: sums not yet synchronized
        self._shares: dict[str, Any] = {}              # others: the leader's pairs in flight
        self._sending: list = []                       # the leader's pairs in flight
        self._unread = 0                               # tensors of this step not yet decompressed
        self.sent_local = 0
        self.received_local = 0

    # ------------------------------------------------------------------ set-up
    def setup(self, process_set=None) -> None:
        """Finds the hosts and their process sets (once; every rank at its first compressed tensor)."""
        import horovod.torch as hvd

        if process_set is not None and process_set.process_set_id not in (None, 0):
            raise HostLayoutError(
                f"hierarchical=True averages over every rank, but the optimizer exchanges over the "
                f"process set of ranks {process_set.ranks}: give DistributedOptimizer the global "
                "process set (the default), or drop hierarchical")
        if self.layout is not None:
            return
        if os.environ.get("HOROVOD_ELASTIC") == "1":
            raise HostLayoutError("hierarchical=True does not run under elastic horovodrun yet: the "
                                  "hosts and their process sets change at every reset; drop "
                                  "hierarchical or elastic")
        size, rank = hvd.size(), hvd.rank()
        if self.given is not None:
            layout = check_layout(self.given, size)
        else:
            layout = layout_from_places(hvd.allgather_object(my_place(),
                                                             name="ranger.hier.places"))
        sets = process_sets_for(layout)
        host = layout.host_of(rank)
        self.layout, self.total, self.leader = layout, size, host[0]
        self.is_leader = rank == host[0]
        self.local_size = len(host)
        self.local = sets.get(host) if len(host) > 1 else None
        self.cross = sets[layout.leaders] if self.is_leader else None

    def reset(self) -> None:
        """A new step: whatever an unfinished step left in flight is dropped."""
        self._sums, self._waiting, self._shares, self._sending = {}, {}, {}, []
        self._unread = 0

    # ------------------------------------------------------------------ Horovod's hook
    def compress(self, name: str, tensor: torch.Tensor, process_set, owner):
        """Starts the host sum of one compressed gradient; returns (Horovod's token, context)."""
        import horovod.torch as hvd

        self.setup(process_set)
        ctx = HierContext(name, tensor.shape, tensor.dtype, tensor.device)
        self._unread += 1
        flat = tensor.detach().reshape(-1)
        if self.local is None:   # alone on its host: the gradient is the host sum
            self._start(name, flat, ctx, owner)
        else:
            # Horovod 0.28.1 has no bfloat16 collectives: such sums travel as fp32
            buffer = flat.float() if flat.dtype == torch.bfloat16 else flat
            handle = hvd.allreduce_async_(buffer, op=hvd.Sum, name=f"ranger.hier.sum.{name}",
                                          process_set=self.local)
            size = buffer.numel() * buffer.element_size()
            self.sent_local += size
            self.received_local += size
            if self.is_leader:
                self._sums[name] = _LocalSum(handle, buffer, ctx, owner)
                self._take_arrived()
            else:
                self._waiting[name] = (handle, ctx)
        if not self.is_leader:   # what this rank hands to collectives beyond its host: the token
            self.comp._stats.add(core.sparse_counts(flat.numel(), 0, self.comp.options.value_dtype,
                                                    with_token=True))
        return torch.ones(1, dtype=torch.float32, device=tensor.device), ctx

    def decompress(self, token: torch.Tensor, ctx: HierContext) -> torch.Tensor:
        """The average over every rank of one tensor (``token``: Horovod's allreduce of the 1)."""
        import horovod.torch as hvd

        self._unread -= 1
        if not self.is_leader:
            return self._receive(token, ctx)
        # Every host sum must be in before any result is waited for: a bucket still open is sent
        # with what it has, and the leaders must send the same buckets.
        for name in list(self._sums):
            self._take(name)
        indices, values, _ = self.comp.exchange_pairs(ctx.name)
        if self.local is not None:
            # the pairs, not the dense result: the other ranks scatter them as the leader does
            payload = torch.cat([indices.to(torch.int32).reshape(-1).view(torch.uint8),
                                 values.contiguous().reshape(-1).view(torch.uint8)])
            self._sending.append(hvd.allgather_async(payload, name=f"ranger.hier.share.{ctx.name}",
                                                     process_set=self.local))
            self.sent_local += payload.numel()
        if self._unread <= 0:   # the step's last result: no handle is left behind
            for handle in self._sending:
                hvd.synchronize(handle)
            self._sending = []
        return self.comp.scatter_pairs(token, ctx.name, ctx.shape, ctx.dtype, indices, values,
                                       self.total)

    # ------------------------------------------------------------------ the leader
    def _take_arrived(self) -> None:
        """Runs the sparse step of the host sums that have arrived, oldest first, without waiting
        (Horovod completes them in about the order they were started)."""
        import horovod.torch as hvd

        while self._sums and hvd.poll(next(iter(self._sums.values())).handle):
            self._take(next(iter(self._sums)))

    def _take(self, name: str) -> None:
        import horovod.torch as hvd

        pending = self._sums.pop(name)
        hvd.synchronize(pending.handle)
        host_sum = pending.buffer.to(pending.ctx.dtype)   # the same tensor unless it travelled as fp32
        self._start(name, host_sum, pending.ctx, pending.owner)

    def _start(self, name: str, host_sum: torch.Tensor, ctx: HierContext, owner) -> None:
        """The error-feedback step on the host sum, then the sparse exchange among the leaders."""
        values, indices = self.comp.compress_sparse(name, host_sum, self.cross)
        self.comp.start_exchange(name, host_sum.numel(), indices, values, self.cross, owner)

    # ------------------------------------------------------------------ the other ranks of a host
    def _receive(self, token: torch.Tensor, ctx: HierContext) -> torch.Tensor:
        """The leader's pairs, scattered here as the leader scatters them (the same bits). The
        first result wanted in a step joins the sharing of every tensor of the step (an allgather
        over the host to which only the leader brings bytes), so the leader never waits on a rank
        that has not joined."""
        import horovod.torch as hvd

        if ctx.name not in self._shares:
            nothing = torch.empty(0, dtype=torch.uint8)
            for name in self._waiting:
                self._shares[name] = hvd.allgather_async(nothing, name=f"ranger.hier.share.{name}",
                                                         process_set=self.local)
            for handle, _ in self._waiting.values():
                hvd.synchronize(handle)   # this rank's part of the host sum is done
            self._waiting = {}
        payload = hvd.synchronize(self._shares.pop(ctx.name))
        self.received_local += payload.numel()
        dtype = ctx.dtype if self.comp.options.exchange == "global_topk" else self.comp.value_dtype
        k = payload.numel() // (4 + dtype.itemsize)
        indices = payload[: 4 * k].view(torch.int32)
        values = payload[4 * k:].clone().view(dtype)   # a copy starts aligned for any dtype
        return self.comp.scatter_pairs(token, ctx.name, ctx.shape, ctx.dtype, indices, values,
                                       self.total)

    def stats(self) -> dict:
        return {"bytes_sent_local": self.sent_local, "bytes_received_local": self.received_local}
