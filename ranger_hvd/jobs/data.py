"""Offline data for the reference jobs: digits, MNIST from idx files, and a synthetic task.

Every loader returns a :class:`Dataset` of numpy arrays (no framework import): images ``(N, H, W)``
float32 in [0, 1] and labels ``(N,)`` int64, already split into a training and a held-out part. The
backends reshape them for each model (CNN: channel axis; RNN: the H rows are the time steps and the W
columns the features; GAN: flattened and scaled to [-1, 1]).

Nothing here downloads: ``digits`` ships with scikit-learn, ``mnist`` reads the standard idx files
(optionally gzipped) from ``data.dir``, and ``synthetic`` is generated from a fixed seed.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ranger_hvd.config import DataSection

# The held-out split must not depend on train.seed, so runs that differ only in seed share the eval set.
SPLIT_SEED = 12345

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class DataError(ValueError):
    """A data set that cannot be loaded; the message names the data set, directory or file."""


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray  # (N, H, W) float32 in [0, 1]
    y_train: np.ndarray  # (N,) int64
    x_eval: np.ndarray
    y_eval: np.ndarray
    num_classes: int = 10

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.x_train.shape[1:3])


# --------------------------------------------------------------------------------------------------
# idx files


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Reads one idx file (``.gz`` or not): magic 0x0000TTDD, D big-endian uint32 dims, then the data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise DataError(f"cannot read idx file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic {raw[:4].hex() or 'empty'})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - header < count * dtype.itemsize:
        raise DataError(f"{path}: truncated idx data (dims {dims}, {len(raw) - header} bytes of data)")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header)
    return data.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def _find_idx(directory: Path, stem: str) -> Path:
    # Accept the canonical names, the '.gz' variants and the 't10k-images.idx3-ubyte' spelling.
    candidates = [stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"]
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    raise DataError(
        f"mnist: {stem}[.gz] not found in data.dir {directory} (expected the standard idx files "
        f"{', '.join(MNIST_FILES.values())}, optionally gzipped; nothing is downloaded)"
    )


def load_mnist(directory: str | Path | None) -> Dataset:
    if not directory:
        raise DataError("mnist needs data.dir: the directory holding the MNIST idx files")
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise DataError(f"mnist: data.dir {directory} does not exist or is not a directory")
    arrays = {key: read_idx(_find_idx(directory, stem)) for key, stem in MNIST_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"mnist in {directory}: {split} images {x.shape} and labels {y.shape} do not match")
    return Dataset(
        name="mnist",
        x_train=(arrays["train_images"].astype(np.float32) / 255.0),
        y_train=arrays["train_labels"].astype(np.int64),
        x_eval=(arrays["test_images"].astype(np.float32) / 255.0),
        y_eval=arrays["test_labels"].astype(np.int64),
    )


# --------------------------------------------------------------------------------------------------
# digits and synthetic


def _split(name: str, x: np.ndarray, y: np.ndarray, eval_fraction: float) -> Dataset:
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction must be in (0, 1), got {eval_fraction}")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_eval = max(1, int(round(len(x) * eval_fraction)))
    ev, tr = order[:n_eval], order[n_eval:]
    return Dataset(name=name, x_train=x[tr], y_train=y[tr], x_eval=x[ev], y_eval=y[ev])


def _digits_csv() -> Path | None:
    """scikit-learn's bundled ``digits.csv.gz``, located without importing scikit-learn (~2 s per rank)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The data of ``sklearn.datasets.load_digits()``: images (1797, 8, 8) in 0..16 and int labels."""
    path = _digits_csv()
    if path is not None:
        raw = np.loadtxt(path, delimiter=",", dtype=np.float64)   # 64 pixels then the label, per row
        if raw.ndim == 2 and raw.shape[1] == 65:
            return raw[:, :-1].reshape(-1, 8, 8), raw[:, -1].astype(np.int64)
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:
        raise DataError("digits needs scikit-learn (it ships the data set offline): pip install scikit-learn") from None
    bunch = _load()
    return bunch.images, bunch.target.astype(np.int64)


def load_digits(eval_fraction: float = 0.2) -> Dataset:
    images, target = load_digits_arrays()
    x = (images.astype(np.float32) / 16.0)  # (1797, 8, 8), values 0..16
    return _split("digits", x, target.astype(np.int64), eval_fraction)


def make_synthetic(n_samples: int = 2048, eval_fraction: float = 0.2, size: int = 8,
                   num_classes: int = 10, noise: float = 0.35) -> Dataset:
    """Ten fixed random 8x8 templates; each sample is its class template plus Gaussian noise.

    Deterministic (fixed seeds), learnable by all three models in a few steps, and fast.
    """
    if n_samples < 2:
        raise DataError(f"data.synthetic_samples must be at least 2, got {n_samples}")
    rng = np.random.default_rng(2024)
    templates = rng.random((num_classes, size, size)).astype(np.float32)
    y = np.arange(n_samples, dtype=np.int64) % num_classes
    rng.shuffle(y)
    x = templates[y] + noise * rng.standard_normal((n_samples, size, size)).astype(np.float32)
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    return _split("synthetic", x, y, eval_fraction)


def load_dataset(data: DataSection) -> Dataset:
    """The data set of a config's validated ``data:`` section."""
    if data.dataset == "digits":
        return load_digits(data.eval_fraction)
    if data.dataset == "mnist":
        return load_mnist(data.dir)
    return make_synthetic(data.samples, data.eval_fraction)


# --------------------------------------------------------------------------------------------------
# sharding and batching


def shard_indices(n: int, rank: int, size: int, equalize: bool = True) -> np.ndarray:
    """Rank ``rank``'s indices ``rank::size`` of n samples.

    With ``equalize`` every shard is cut to ``n // size`` samples, so all ranks run the same number of
    steps (a rank with one more batch would wait forever in its extra allreduce); at most one sample
    per rank is dropped.
    """
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} out of range for size {size}")
    idx = np.arange(rank, n, size)
    if equalize:
        idx = idx[: n // size]
    return idx


def steps_per_epoch(n_train: int, size: int, batch_size: int) -> int:
    per_rank = n_train // size
    steps = per_rank // batch_size
    if steps < 1:
        raise DataError(
            f"train.batch_size {batch_size} is larger than each rank's shard ({per_rank} samples from "
            f"{n_train} over {size} ranks); lower the batch size"
        )
    return steps


def epoch_batches(n_local: int, batch_size: int, seed: int, epoch: int, rank: int):
    """Index batches (drop-last) of a rank's shard, reshuffled each epoch from (seed, epoch, rank)."""
    order = np.random.default_rng([seed, epoch, rank]).permutation(n_local)
    for start in range(0, n_local - batch_size + 1, batch_size):
        yield order[start:start + batch_size]
