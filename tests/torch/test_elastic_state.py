"""Horovod's elastic ``TorchState`` commits and restores the Ranger compressor's state with the
optimizer (ranger_hvd's ``DistributedOptimizer`` puts it in ``state_dict()``), in one process."""

import pytest
import torch

from ranger_hvd.torch import DistributedOptimizer, RangerCompressor

hvd = pytest.importorskip("horovod.torch")


def _state_of(comp):
    return {name: (t["residual"].clone(), t["step"]) for name, t in comp.state_dict()["tensors"].items()}


@pytest.fixture
def horovod_alone():
    hvd.init()             # one process, size 1; shut down after so other tests see Horovod as they found it
    yield
    hvd.shutdown()


def test_torch_state_commits_and_restores_residuals_steps_and_bytes(horovod_alone):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    comp = RangerCompressor(density=0.05, min_elements=16)
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                               named_parameters=model.named_parameters(), compression=comp)
    grad = torch.randn(32, 64)
    comp.compress_sparse("weight", grad)
    state = hvd.elastic.TorchState(model=model, optimizer=opt, epoch=0)
    state.commit()
    weight = model.weight.detach().clone()
    committed, committed_stats = _state_of(comp), comp.stats()
    assert committed["weight"][1] == 1 and committed_stats["bytes_sent"] > 0

    comp.compress_sparse("weight", torch.randn(32, 64))     # uncommitted work, then a rollback
    with torch.no_grad():
        model.weight.add_(1.0)
    state.epoch = 5
    assert _state_of(comp)["weight"][1] == 2
    state.restore()
    restored = _state_of(comp)
    assert restored["weight"][1] == 1 and torch.equal(restored["weight"][0], committed["weight"][0])
    assert comp.stats()["bytes_sent"] == committed_stats["bytes_sent"] and state.epoch == 0
    assert torch.equal(model.weight, weight)

    # a joining worker takes rank 0's exchange counts but keeps its own (empty) residuals
    fresh = RangerCompressor(density=0.05, min_elements=16)
    fresh.set_step_counters(comp.step_counters())
    assert fresh.step_counters() == {"weight": 1}
    assert fresh.state_dict()["tensors"]["weight"]["residual"] is None
