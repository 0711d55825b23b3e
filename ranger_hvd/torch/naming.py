"""Which parameter a gradient handed to ``RangerCompressor.compress`` belongs to.

Collectives must carry the same name on every rank, and Horovod does not tell a compressor which
parameter it is handed. So ``compress`` looks up the call stack for the Horovod optimizer that
called it (the frame whose ``self`` holds this compressor) and the parameter whose ``.grad`` is the
tensor, and takes the optimizer's own name for it; code that calls ``compress`` otherwise must
give ``named_parameters``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

_SEARCH_DEPTH = 6  # frames between compress() and Horovod's optimizer (grouped: a comprehension)

ADASUM_REFUSED = (
    "RangerCompressor cannot serve op=hvd.Adasum: Adasum combines each rank's whole update vector "
    "through dot products, which a sparse (index, value) exchange cannot reproduce. Use "
    "op=hvd.Average or hvd.Sum with the compressor, or Adasum without it.")


def identify(compressor, tensor: torch.Tensor, params: dict[str, torch.Tensor],
             depth: int = 2) -> tuple[str, Any, Any]:
    """(name, process set, Horovod optimizer or None) of the parameter whose gradient ``tensor``
    is; ``depth`` is the number of frames between this call and Horovod's hook."""
    frame = sys._getframe(depth)
    param = None
    for _ in range(_SEARCH_DEPTH):
        if frame is None:
            break
        local = frame.f_locals
        p = local.get("p")
        if param is None and isinstance(p, torch.Tensor) and (
                p.grad is tensor or local.get("tensor") is tensor):
            param = p
        owner = local.get("self")
        if getattr(owner, "_compression", None) is compressor:
            if hasattr(owner, "_starting_models"):
                raise ValueError(ADASUM_REFUSED)
            if param is not None:
                names = getattr(owner, "_parameter_names", {})
                if param in names:
                    return names[param], getattr(owner, "process_set", None), owner
        frame = frame.f_back
    for name, p in params.items():
        if p.grad is tensor:
            return name, None, None
    raise ValueError(
        f"RangerCompressor.compress got a tensor of shape {tuple(tensor.shape)} that it cannot "
        "name: it is not a gradient handed over by horovod.torch.DistributedOptimizer, and no "
        "parameter in named_parameters has it as .grad. Collectives need the same name on every "
        "rank: pass named_parameters=model.named_parameters() to RangerCompressor.")
