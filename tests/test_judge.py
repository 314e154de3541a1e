"""The digit judge (dydit_jax.judge): it learns the digits, its cache round-trips and is retrained
when stale, and its Frechet distance is the FID formula and orders real vs noise correctly."""
import json

import numpy as np
import pytest

from dydit_jax.errors import UserError
from dydit_jax.evaluation import metrics
from dydit_jax.judge import DigitJudge, JudgeSettings, frechet_from_stats, gaussian_stats, split

# A short training (the default is 1200 steps): enough to tell digits apart, fast enough for CI.
SHORT = JudgeSettings(steps=150)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
  directory = tmp_path_factory.mktemp("judge")
  return directory, DigitJudge.load_or_train(directory, SHORT)


def test_split_is_balanced_and_disjoint():
  train, held = split()
  assert len(held) == 500 and len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == 5000
  labels = DigitJudge.real_digits()[1]
  assert np.array_equal(np.bincount(labels), np.full(10, 50))


def test_learns_digits_and_scores_noise_low(cached):
  _, judge = cached
  assert judge.held_out_accuracy >= 0.85, judge.held_out_accuracy
  x, y = DigitJudge.real_digits()
  assert judge.accuracy(x, y) == judge.held_out_accuracy
  noise = np.random.default_rng(0).uniform(-1, 1, (100, 32, 32, 1)).astype(np.float32)
  assert judge.accuracy(noise, np.arange(100) % 10) < 0.3
  real_train = DigitJudge.real_digits(100, held_out=False)[0]
  assert judge.frechet_distance(real_train, x) < 0.5 * judge.frechet_distance(noise, x)
  # score: the demo's and the sweep's reading of samples, the same numbers as the separate metrics.
  noise_labels = np.arange(100) % 10
  score = judge.score(noise, noise_labels, judge.stats(x))
  assert score.class_accuracy == judge.accuracy(noise, noise_labels)
  assert score.frechet_distance == pytest.approx(judge.frechet_distance(noise, x), rel=1e-9)
  assert score.features.shape == (100, 64) and score.correct.sum() == round(100 * score.class_accuracy)


def test_cache_round_trips_and_stale_cache_is_retrained(cached):
  directory, judge = cached
  loaded = DigitJudge.load_or_train(directory, SHORT)
  x = DigitJudge.real_digits(40)[0]
  np.testing.assert_array_equal(loaded.features(x), judge.features(x))
  assert loaded.held_out_accuracy == judge.held_out_accuracy
  meta = json.loads((directory / "judge.json").read_text())
  meta["settings"]["steps"] = 1          # as if another recipe had made the cache
  (directory / "judge.json").write_text(json.dumps(meta))
  retrained = DigitJudge.load_or_train(directory, JudgeSettings(steps=2))
  assert json.loads((directory / "judge.json").read_text())["settings"]["steps"] == 2
  assert retrained.held_out_accuracy < judge.held_out_accuracy   # 2 steps: really retrained


def test_frechet_matches_the_fid_evaluator():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(200, 6)), rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
  sa, sb = gaussian_stats(a), gaussian_stats(b)
  np.testing.assert_allclose(frechet_from_stats(sa, sb), metrics.frechet_distance(sa, sb), rtol=1e-6)
  assert abs(frechet_from_stats(sa, sa)) < 1e-8
  # Fewer samples than features (a singular covariance, as with the demo's grids): still finite, >= 0.
  few = gaussian_stats(rng.normal(size=(5, 6)))
  assert 0 <= frechet_from_stats(few, sb) < np.inf


def test_bad_input_is_a_user_error(cached):
  _, judge = cached
  with pytest.raises(UserError, match="shape"):
    judge.accuracy(np.zeros((2, 28, 28, 1)), [0, 1])
  with pytest.raises(UserError, match="one label per image"):
    judge.accuracy(np.zeros((2, 32, 32, 1)), [0])
  with pytest.raises(UserError, match="at least 2"):
    gaussian_stats(np.zeros((1, 4)))
