"""Helpers shared by the worker scripts (each runs once per rank under horovodrun)."""

from __future__ import annotations

import hashlib
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))

import torch  # noqa: E402

torch.set_num_threads(1)


def digest(tensors) -> str:
    """A short fingerprint of tensors' exact bits, to compare ranks and runs."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


def prefixed(model, prefix: str):
    """named_parameters with a prefix, so that runs sharing a process never share collective names."""
    return [(f"{prefix}.{n}", p) for n, p in model.named_parameters()]
