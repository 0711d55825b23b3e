"""Backend-neutral heart of ranger_hvd: options, the error-feedback engine, rules, schedule, bytes.

``engine`` holds the one error-feedback step every entry point runs; ``reference`` holds the same math
as NumPy code, the specification that the PyTorch and TensorFlow backends are tested against.
"""

from .engine import ErrorFeedback, TensorOps
from .options import (INDEX_ITEMSIZE, MOMENTUM_MODES, VALUE_ITEMSIZE, OptionsError, RangerOptions,
                      compressor_momentum, make_options)
from .rules import (
    COUNTERS,
    SAMPLE_TRIES,
    SAMPLING_MIN_NUMEL,
    TOKEN_BYTES,
    CompressionStats,
    clip_threshold,
    dense_counts,
    dense_fp32_bytes,
    density_at,
    is_compressed,
    k_schedule,
    num_selected,
    numel_of,
    random_k_seed,
    sample_rank,
    sample_stride,
    scale_each_value,
    sparse_bytes,
    sparse_counts,
    stats_dict,
    uses_sampling,
)

__all__ = [
    "ErrorFeedback", "TensorOps",
    "INDEX_ITEMSIZE", "MOMENTUM_MODES", "VALUE_ITEMSIZE", "OptionsError", "RangerOptions",
    "compressor_momentum", "make_options",
    "COUNTERS", "SAMPLE_TRIES", "SAMPLING_MIN_NUMEL", "TOKEN_BYTES", "CompressionStats",
    "clip_threshold", "dense_counts", "dense_fp32_bytes", "density_at", "is_compressed", "k_schedule",
    "num_selected", "numel_of", "random_k_seed", "sample_rank", "sample_stride", "scale_each_value",
    "sparse_bytes", "sparse_counts", "stats_dict", "uses_sampling",
]
