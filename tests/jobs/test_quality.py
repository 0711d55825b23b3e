"""The GAN sample score (ranger_hvd.jobs.quality): the Fréchet formula, the digits scorer, the PNG grid."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from ranger_hvd.jobs.data import load_digits
from ranger_hvd.jobs.quality import (DigitsScorer, GanSampleQuality, frechet_distance, frechet_distance_of,
                                     gaussian_stats, latent_noise, save_sample_grid)


def _rotation(theta):
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


def test_frechet_closed_form_for_commuting_covariances():
    """Diagonal covariances: FD = |mu_a - mu_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2, also after a common
    rotation of both (the covariances still commute)."""
    mu_a, mu_b = np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.0, 0.5])
    var_a, var_b = np.array([4.0, 1.0, 0.25]), np.array([1.0, 9.0, 0.25])
    expected = 1.0 + 9.0 + 0.0 + (2 - 1) ** 2 + (1 - 3) ** 2 + 0.0
    got = frechet_distance(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == pytest.approx(expected, rel=1e-12), (got, expected)
    r = _rotation(0.7)
    got2 = frechet_distance(r @ mu_a[:2], r @ np.diag(var_a[:2]) @ r.T, r @ mu_b[:2], r @ np.diag(var_b[:2]) @ r.T)
    assert got2 == pytest.approx(1.0 + 9.0 + 1.0 + 4.0, rel=1e-12), got2


def test_frechet_matches_the_matrix_square_root_formula():
    """Non-commuting full covariances: the eigenvalue form equals Tr(A + B - 2 sqrtm(A B)) computed with
    scipy's general matrix square root, and the 1-D case is (mu diff)^2 + (sigma_a - sigma_b)^2."""
    rng = np.random.default_rng(3)
    for d in (2, 5, 16):
        ma, mb = rng.standard_normal((2, d, d))
        cov_a, cov_b = ma @ ma.T + 0.1 * np.eye(d), mb @ mb.T + 0.1 * np.eye(d)
        mu_a, mu_b = rng.standard_normal((2, d))
        direct = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real))
        got = frechet_distance(mu_a, cov_a, mu_b, cov_b)
        assert got == pytest.approx(direct, rel=1e-8), (d, got, direct)
        # symmetric in its arguments
        assert frechet_distance(mu_b, cov_b, mu_a, cov_a) == pytest.approx(got, rel=1e-8)
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_frechet_from_samples_approaches_the_known_value():
    """Samples of two known 2-D Gaussians: the score of their estimated statistics is near the exact one."""
    rng = np.random.default_rng(0)
    cov_a = _rotation(0.3) @ np.diag([2.0, 0.5]) @ _rotation(0.3).T
    cov_b = np.diag([1.0, 1.0])
    mu_a, mu_b = np.array([0.5, 0.0]), np.array([0.0, 0.0])
    exact = frechet_distance(mu_a, cov_a, mu_b, cov_b)
    xa = rng.multivariate_normal(mu_a, cov_a, size=200_000)
    xb = rng.multivariate_normal(mu_b, cov_b, size=200_000)
    got = frechet_distance_of(xa, xb)
    assert abs(got - exact) < 0.01, (got, exact)


def test_identical_sets_score_zero_and_singular_covariances_are_fine():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 8))
    x[:, 3] = 0.0                              # a dead feature: singular covariance
    assert frechet_distance_of(x, x) == pytest.approx(0.0, abs=1e-9)
    mu, cov = gaussian_stats(x)
    assert cov.shape == (8, 8) and np.linalg.matrix_rank(cov) == 7
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(mu, cov, mu[:4], cov[:4, :4])
    with pytest.raises(ValueError, match="feature matrix"):
        gaussian_stats(x[:1])


@pytest.fixture(scope="module")
def digits_scorer():
    d = load_digits()
    return d, DigitsScorer(d.x_train, d.y_train, d.x_eval, d.y_eval, seed=0)


def test_digits_scorer_orders_real_noisy_and_random_images(digits_scorer):
    """Real held-out digits score near 0; more pixel noise scores monotonically higher; uniform noise
    and an untrained-like random generator score far higher than real digits."""
    d, scorer = digits_scorer
    assert scorer.heldout_accuracy > 0.95, scorer.heldout_accuracy    # the features come from a good classifier
    assert scorer.score(d.x_train) == pytest.approx(0.0, abs=1e-9)   # the reference set itself
    rng = np.random.default_rng(5)
    noise = rng.standard_normal(d.x_eval.shape)
    levels = [0.0, 0.1, 0.2, 0.4, 0.8]
    scores = [scorer.score(np.clip(d.x_eval + s * noise, 0, 1)) for s in levels]
    assert scores[0] == scorer.reference
    assert all(b > a for a, b in zip(scores, scores[1:])), dict(zip(levels, scores))
    uniform = scorer.score(rng.random(d.x_eval.shape))
    assert scorer.reference < 1.0 and uniform > 20 * scorer.reference, (scorer.reference, uniform)
    # one digit repeated (a collapsed generator) is far from the data too
    assert scorer.score(np.repeat(d.x_eval[:1], len(d.x_eval), axis=0)) > 20 * scorer.reference
    assert np.isnan(scorer.score(np.full(d.x_eval.shape, np.nan)))
    with pytest.raises(ValueError, match="64"):
        scorer.score(np.zeros((10, 28, 28)))


def test_digits_scorer_is_reproducible(digits_scorer):
    """The same data and seed give bit-identical scores (a fresh classifier each time)."""
    d, scorer = digits_scorer
    again = DigitsScorer(d.x_train, d.y_train, d.x_eval, d.y_eval, seed=0)
    probe = np.clip(d.x_eval + 0.2 * np.random.default_rng(9).standard_normal(d.x_eval.shape), 0, 1)
    assert again.reference == scorer.reference, (again.reference, scorer.reference)
    assert again.score(probe) == scorer.score(probe)


def test_gan_sample_quality_scores_a_generator_and_writes_the_grid(tmp_path, digits_scorer):
    """A 'generator' that returns real held-out digits (in [-1, 1]) scores the reference; one returning
    noise scores as untrained; samples.png is a PNG of the first 100 images."""
    d, _ = digits_scorer
    q = GanSampleQuality(d, seed=0, z_dim=32, run_dir=tmp_path)
    assert q.z.shape == (len(d.x_eval), 32) and np.array_equal(q.z, latent_noise(len(d.x_eval), 32))
    real = d.x_eval.reshape(len(d.x_eval), -1) * 2 - 1
    noise = np.tanh(q.z @ np.random.default_rng(0).standard_normal((32, 64)))
    untrained = q.measure_untrained(lambda z: noise)
    out = q.evaluate(lambda z: real, tag="7")
    refs = q.references()
    assert set(out) == {"eval_fd"} and set(refs) == {"eval_fd_real", "eval_fd_untrained"}
    assert out["eval_fd"] == pytest.approx(refs["eval_fd_real"], rel=1e-9), (out, refs)
    assert refs["eval_fd_untrained"] == untrained > 20 * refs["eval_fd_real"], refs
    png = (tmp_path / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000, len(png)
    assert not [p.name for p in tmp_path.iterdir() if p.name != "samples.png"]    # no temporary left


def test_sample_grid_layout(tmp_path):
    """23 images in 10 columns: 3 rows; the picture is written even without a title."""
    import matplotlib.image as mpimg

    path = save_sample_grid(tmp_path / "g.png", np.random.default_rng(0).random((23, 8, 8)))
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert w > h > 0, img.shape       # 10 columns wide, 3 rows high
