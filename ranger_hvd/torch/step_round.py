"""The tensors of one optimizer step, so that a void step can be undone for all of them."""

from __future__ import annotations

import torch

from ranger_hvd import core

from .state import TensorState, all_finite


class StepRound:
    """The tensors of one optimizer step, so that a void step can be undone for all of them.

    Every rank receives the same exchanged values, so every rank finds the same NaN/Inf and marks
    the same step void; then each tensor of the step takes back what it sent
    (``ErrorFeedback.undo``), those exchanged earlier in the step at once and later ones as their
    exchange completes (a second undo does nothing).
    """

    def __init__(self, engine: core.ErrorFeedback):
        self.engine = engine
        self.states: dict[str, TensorState] = {}
        self.void = False

    def __contains__(self, name: str) -> bool:
        return name in self.states

    def reset(self) -> None:
        self.states, self.void = {}, False

    def add(self, name: str, state: TensorState) -> None:
        self.states[name] = state

    def check(self, names: list[str], received: list[torch.Tensor]) -> None:
        """After the exchange of ``names``: if what arrived holds NaN/Inf, the step is void."""
        if not self.void:
            if all(all_finite(r) for r in received):
                return
            self.void = True
            for st in self.states.values():
                self.engine.undo(st)
        for name in names:
            if name in self.states:
                self.engine.undo(self.states[name])
