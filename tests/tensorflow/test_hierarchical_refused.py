"""``hierarchical=True`` runs on PyTorch only so far: TensorFlow's options refuse it by name."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorflow")

from ranger_hvd import core  # noqa: E402
from ranger_hvd.tensorflow.slots import tf_options  # noqa: E402


def test_tensorflow_refuses_hierarchical():
    assert tf_options(exchange="global_topk").exchange == "global_topk"
    with pytest.raises(core.OptionsError, match="hierarchical=True runs on PyTorch only so far"):
        tf_options(hierarchical=True)
    with pytest.raises(core.OptionsError, match="hierarchical=True runs on PyTorch only so far"):
        from ranger_hvd.tensorflow import RangerCompressor

        RangerCompressor(hierarchical=True)
