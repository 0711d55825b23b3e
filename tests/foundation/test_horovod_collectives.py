"""The foundation: real 2-rank horovodrun jobs on Gloo and on MPI, for PyTorch and for TensorFlow."""
from pathlib import Path

import pytest

from tests.hvdrun import run_workers

WORKERS = Path(__file__).parent / "workers"


@pytest.mark.horovod
@pytest.mark.parametrize("controller", ["gloo", "mpi"])
@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_collectives_across_two_ranks(tmp_path, framework, controller):
    reports = run_workers(WORKERS / f"collectives_{framework}.py", tmp_path / "out", np=2,
                          controller=controller)
    size = 2
    # sum over ranks r of arange(6) * (r + 1) = arange(6) * 3
    expected_sum = [float(3 * i) for i in range(6)]
    expected_gather = [[0, 0], [1, 1], [1, 1]]  # rank 0's one row, then rank 1's two rows
    for rank, rep in enumerate(reports):
        assert rep["size"] == size
        assert rep["sum"] == expected_sum, f"rank {rank}"
        assert rep["avg"] == [0.5, 0.5, 0.5], f"rank {rank}"
        assert rep["gather"] == expected_gather, f"rank {rank}"
        assert rep["mpi"] is (controller == "mpi")
        assert rep["gloo"] is (controller == "gloo")
        if framework == "tf":
            assert rep["traced"] == [3.0] * 4
