"""How good a GAN's digits are: a Fréchet distance in the feature space of a small digits classifier.

Backend-neutral (NumPy, SciPy-free linear algebra, scikit-learn for the classifier): the backends only
hand over generated images as NumPy arrays in [0, 1].

The score follows FID (Heusel et al. 2017) with a feature extractor that fits the data: an MLP with
one hidden ReLU layer, trained once per run, with a fixed seed, on the real training digits. Both the
real training digits and a sample set are summarised by the mean and covariance of their hidden-layer
activations, and the score is the Fréchet (2-Wasserstein) distance between the two Gaussians::

    FD = |mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)

Lower is better. Two numbers make it readable: ``reference`` is the score of the real held-out digits
(what a perfect generator would reach with the same number of samples: near 0, but not 0, since a
covariance estimated from a few hundred samples is noisy), and an untrained generator scores one to two
orders of magnitude higher.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

__all__ = ["gaussian_stats", "frechet_distance", "frechet_distance_of", "DigitsScorer", "latent_noise",
           "save_sample_grid"]

# Seed of the latent vectors that score a generator: every evaluation and both backends see the same z.
SCORE_NOISE_SEED = 2024


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``features`` (n, d), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need a (n >= 2, d) feature matrix, got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues from rounding
    are clipped to 0)."""
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu_a, cov_a, mu_b, cov_b) -> float:
    """Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b).

    ``Tr((C_a C_b)^1/2)`` is computed as the sum of the square roots of the eigenvalues of the symmetric
    PSD matrix ``C_a^1/2 C_b C_a^1/2`` (same eigenvalues as ``C_a C_b``): real and stable even when a
    covariance is singular (dead ReLU units have zero variance), where a general ``sqrtm`` is not.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (mu_a.size, mu_a.size):
        raise ValueError(f"shapes do not match: mu {mu_a.shape} vs {mu_b.shape}, cov {cov_a.shape} vs {cov_b.shape}")
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    value = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(value, 0.0)    # rounding can leave -1e-15 for identical inputs


def frechet_distance_of(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def latent_noise(n: int, z_dim: int, seed: int = SCORE_NOISE_SEED) -> np.ndarray:
    """The fixed standard-normal latent vectors (n, z_dim) float32 a generator is scored on."""
    return np.random.default_rng(seed).standard_normal((n, z_dim)).astype(np.float32)


def _flat(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, dtype=np.float64)
    return x.reshape(len(x), -1)


class DigitsScorer:
    """Scores sets of images against the real training images in a trained classifier's feature space.

    ``x_train``/``y_train``: the real training images (n, H, W) or (n, H*W) in [0, 1] and their labels;
    the classifier is trained on them and their features are the score's reference distribution.
    ``x_heldout``: real images the classifier never saw; their score is ``reference``. ``seed`` fixes the
    classifier's initialisation and batch order, so the same data and seed give the same score.
    """

    def __init__(self, x_train, y_train, x_heldout, y_heldout=None, *, seed: int = 0, hidden: int = 64,
                 max_iter: int = 300):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        xt = _flat(x_train)
        self.n_pixels = xt.shape[1]
        self.classifier = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=max_iter,
                                        random_state=seed)
        with warnings.catch_warnings():
            # a fixed number of epochs is the point (reproducible); not having "converged" is harmless
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.classifier.fit(xt, np.asarray(y_train))
        self.train_stats = gaussian_stats(self.features(xt))
        xh = _flat(x_heldout)
        self.n_heldout = len(xh)
        self.heldout_accuracy = (float(self.classifier.score(xh, np.asarray(y_heldout)))
                                 if y_heldout is not None else None)
        self.reference = self.score(xh)

    def features(self, images) -> np.ndarray:
        """Hidden-layer activations (n, hidden) of the trained classifier."""
        x = _flat(images)
        if x.shape[1] != self.n_pixels:
            raise ValueError(f"images have {x.shape[1]} pixels, the scorer was trained on {self.n_pixels}")
        return np.maximum(x @ self.classifier.coefs_[0] + self.classifier.intercepts_[0], 0.0)

    def score(self, images) -> float:
        """Fréchet distance of ``images`` (in [0, 1]) to the real training images; lower is better."""
        x = _flat(images)
        if not np.all(np.isfinite(x)):
            return float("nan")
        return frechet_distance(*gaussian_stats(self.features(x)), *self.train_stats)


def save_sample_grid(path: str | Path, images: np.ndarray, *, columns: int = 10, title: str | None = None) -> Path:
    """A grid of images (n, H, W) in [0, 1] as a PNG (dark digits on white, like the data set's pictures).

    Written to a temporary file and renamed, so a reader never sees half a picture.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    x = np.clip(np.asarray(images, dtype=np.float64), 0.0, 1.0)
    n, h, w = x.shape
    rows = -(-n // columns)
    grid = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1))    # one white pixel between digits
    for i in range(n):
        r, c = divmod(i, columns)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = 1.0 - x[i]
    fig, ax = plt.subplots(figsize=(columns * 0.5, rows * 0.5 + (0.4 if title else 0.0)), dpi=100)
    ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


class GanSampleQuality:
    """What a reference GAN job reports about its samples (rank 0 only; every rank holds the same G).

    Built once per run: trains the scorer on the data set's training split (at most ``max_train``
    images, a fixed subset, so MNIST stays quick) and fixes the latent vectors, as many as the held-out
    images, so generated and held-out sets are scored with the same sample size. ``generate(z)`` is the
    backend's generator: float32 latents (n, z_dim) in, images (n, H*W) in [-1, 1] out, as NumPy.
    """

    def __init__(self, data, *, seed: int, z_dim: int, run_dir=None, max_train: int = 5000,
                 max_heldout: int = 2000, grid_size: int = 100):
        pick = np.random.default_rng(seed)
        tr = np.sort(pick.permutation(len(data.x_train))[:max_train])
        ev = np.sort(pick.permutation(len(data.x_eval))[:max_heldout])
        self.image_shape = tuple(data.x_train.shape[1:3])
        self.scorer = DigitsScorer(data.x_train[tr], data.y_train[tr], data.x_eval[ev], data.y_eval[ev], seed=seed)
        self.z = latent_noise(len(ev), z_dim)
        self.sample_path = Path(run_dir) / "samples.png" if run_dir is not None else None
        self.grid_size = grid_size
        self.untrained: float | None = None

    def images(self, generate) -> np.ndarray:
        """The generator's images for the fixed latents, mapped from [-1, 1] to [0, 1], shape (n, H, W)."""
        out = np.asarray(generate(self.z), dtype=np.float64)
        return ((out + 1.0) / 2.0).reshape(len(self.z), *self.image_shape)

    def measure_untrained(self, generate) -> float:
        """Scores the generator before any training step: the score training must improve on."""
        self.untrained = self.scorer.score(self.images(generate))
        return self.untrained

    def evaluate(self, generate, tag: str = "") -> dict:
        """``eval_fd`` of this generator; rewrites ``RUN_DIR/samples.png`` with its first images."""
        images = self.images(generate)
        fd = self.scorer.score(images)
        if self.sample_path is not None:
            title = (f"step {tag}: FD {fd:.3g} (real held-out {self.scorer.reference:.3g}"
                     + (f", untrained {self.untrained:.3g})" if self.untrained is not None else ")"))
            save_sample_grid(self.sample_path, images[: self.grid_size], title=title)
        return {"eval_fd": fd}

    def references(self) -> dict:
        """What ``eval_fd`` is read against, for the end line: ``eval_fd_real`` (real held-out digits, the
        floor) and ``eval_fd_untrained`` (this run's generator before training)."""
        return {"eval_fd_real": self.scorer.reference, "eval_fd_untrained": self.untrained}
