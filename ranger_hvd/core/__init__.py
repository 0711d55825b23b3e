"""Backend-neutral heart of ranger_hvd: options, selection and error-feedback rules, schedule, bytes.

``reference`` holds the math as NumPy code, the specification that the PyTorch and TensorFlow
compressors are tested against.
"""

from .options import INDEX_ITEMSIZE, VALUE_ITEMSIZE, OptionsError, RangerOptions, make_options
from .rules import (
    CompressionStats,
    clip_threshold,
    dense_fp32_bytes,
    density_at,
    is_compressed,
    num_selected,
    numel_of,
    random_k_seed,
    sparse_bytes,
)

__all__ = [
    "INDEX_ITEMSIZE", "VALUE_ITEMSIZE", "OptionsError", "RangerOptions", "make_options",
    "CompressionStats", "clip_threshold", "dense_fp32_bytes", "density_at", "is_compressed",
    "num_selected", "numel_of", "random_k_seed", "sparse_bytes",
]
