"""Classification statistics against scikit-learn, the original's per-class implementation."""

import math
import time
import warnings

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn import metrics

from cav_mae_jax.eval import stats


def sklearn_per_class(output, target):
  """The original's loop: per-class AP and AUC from scikit-learn (NaN where AUC is undefined)."""
  ap, auc = [], []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for k in range(target.shape[1]):
      ap.append(metrics.average_precision_score(target[:, k], output[:, k]))
      try:
        auc.append(metrics.roc_auc_score(target[:, k], output[:, k]))
      except ValueError:  # older scikit-learn raises where newer returns NaN
        auc.append(math.nan)
  return np.array(ap), np.array(auc)


def assert_matches_sklearn(output, target):
  ap_ref, auc_ref = sklearn_per_class(output, target)
  np.testing.assert_allclose(stats.average_precision(output, target), ap_ref, rtol=0, atol=1e-6)
  np.testing.assert_allclose(stats.roc_auc(output, target), auc_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_random_inputs_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  output = rng.normal(size=(400, 30)).astype(np.float32)
  target = (rng.uniform(size=output.shape) < rng.uniform(0.02, 0.5, size=30)).astype(np.int64)
  target[0] = 1  # every class has a positive
  assert_matches_sklearn(output, target)


@pytest.mark.parametrize("decimals", [1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_tie_heavy_inputs_match_sklearn(decimals, seed):
  rng = np.random.default_rng(100 + seed)
  output = np.round(rng.uniform(size=(300, 40)), decimals)
  # Few positives, correlated with the score so that ties fall between positives and negatives.
  target = (rng.uniform(size=output.shape) < 0.02 + 0.08 * output).astype(np.float32)
  target[rng.integers(0, 300, size=40), np.arange(40)] = 1
  assert len(np.unique(output[:, 0])) <= 101  # really tie-heavy
  assert_matches_sklearn(output, target)


def test_tied_group_mixing_positives_and_negatives_by_hand():
  # Scores 0.9 (pos), 0.5 (pos, neg, neg tied), 0.1 (pos). One threshold per distinct score:
  # precision 1/1, then 2/4, then 3/5; AP = (1*1 + 1*2/4 + 1*3/5) / 3.
  output = np.array([[0.9], [0.5], [0.5], [0.5], [0.1]])
  target = np.array([[1], [1], [0], [0], [1]])
  assert stats.average_precision(output, target)[0] == pytest.approx((1 + 0.5 + 0.6) / 3, abs=1e-12)
  # Negatives at 0.5 each beat/tie: pos 0.9 beats 2, pos 0.5 ties 2 (1.0), pos 0.1 beats 0.
  assert stats.roc_auc(output, target)[0] == pytest.approx((2 + 1 + 0) / 6, abs=1e-12)
  assert_matches_sklearn(output, target)


def test_classes_without_positives_and_without_negatives():
  rng = np.random.default_rng(7)
  output = rng.normal(size=(200, 6))
  target = (rng.uniform(size=output.shape) < 0.1).astype(np.float64)
  target[:, 1] = 0  # no positives
  target[:, 4] = 0  # no positives
  target[:, 5] = 1  # no negatives
  ap_ref, auc_ref = sklearn_per_class(output, target)
  assert ap_ref[1] == 0.0 and ap_ref[5] == 1.0  # the installed scikit-learn's values
  assert_matches_sklearn(output, target)
  result = stats.classification_stats(output, target)
  assert result["mAP"] == pytest.approx(np.mean(ap_ref), abs=1e-12)  # the original's mAP
  assert result["mAP_classes_with_positives"] == pytest.approx(
      np.mean(ap_ref[[0, 2, 3, 5]]), abs=1e-12)
  assert result["classes_without_positives"] == 2
  assert result["classes_without_negatives"] == 1
  # Undefined AUCs are left out of the mean, not counted as -1 as in the original.
  assert result["mAUC"] == pytest.approx(np.mean(auc_ref[[0, 2, 3]]), abs=1e-12)
  assert result["d_prime"] == pytest.approx(
      scipy_stats.norm.ppf(result["mAUC"]) * math.sqrt(2), abs=1e-9)


def test_single_class_and_single_clip_edge_cases():
  output = np.array([[0.3], [0.7], [0.1]])
  assert_matches_sklearn(output, np.array([[0], [1], [0]]))
  assert stats.average_precision(output, np.array([[0], [1], [0]]))[0] == 1.0
  # One clip: AP is 1 if positive, 0 if not; AUC is undefined either way.
  assert stats.average_precision(np.array([[0.5]]), np.array([[1]]))[0] == 1.0
  assert stats.average_precision(np.array([[0.5]]), np.array([[0]]))[0] == 0.0
  assert np.isnan(stats.roc_auc(np.array([[0.5]]), np.array([[1]]))[0])
  assert_matches_sklearn(np.array([[0.5, 0.2]]), np.array([[1, 0]]))
  # All scores tied: AP is the prevalence, AUC one half.
  target = np.array([[1], [0], [0], [1], [0]])
  assert stats.average_precision(np.zeros((5, 1)), target)[0] == pytest.approx(0.4, abs=1e-12)
  assert stats.roc_auc(np.zeros((5, 1)), target)[0] == pytest.approx(0.5, abs=1e-12)
  assert_matches_sklearn(np.zeros((5, 1)), target)
  result = stats.classification_stats(np.array([[0.5]]), np.array([[1]]))
  assert math.isnan(result["mAUC"]) and math.isnan(result["d_prime"])
  assert result["mAP"] == 1.0 and result["accuracy"] == 1.0


def test_d_prime_matches_scipy():
  for auc in (0.01, 0.3, 0.5, 0.75, 0.93, 0.999):
    assert stats.d_prime(auc) == pytest.approx(scipy_stats.norm.ppf(auc) * math.sqrt(2), abs=1e-9)
  assert stats.d_prime(1.0) == math.inf and stats.d_prime(0.0) == -math.inf
  assert math.isnan(stats.d_prime(math.nan))


def test_top1_accuracy_matches_sklearn_including_ties():
  rng = np.random.default_rng(3)
  output = np.round(rng.uniform(size=(500, 8)), 1)  # many ties: argmax takes the first
  target = np.eye(8)[rng.integers(0, 8, size=500)]
  expected = metrics.accuracy_score(np.argmax(target, 1), np.argmax(output, 1))
  assert stats.top1_accuracy(output, target) == expected
  assert stats.classification_stats(output, target)["accuracy"] == expected
  assert stats.top1_accuracy(np.array([[1.0, 1.0]]), np.array([[0, 1]])) == 0.0


def test_rejects_bad_input():
  with pytest.raises(ValueError, match="binary"):
    stats.average_precision(np.zeros((3, 2)), np.full((3, 2), 0.9))
  with pytest.raises(ValueError, match=r"\[clips, classes\]"):
    stats.roc_auc(np.zeros((3, 2)), np.zeros((3, 3)))
  with pytest.raises(ValueError, match=r"\[clips, classes\]"):
    stats.classification_stats(np.zeros((0, 2)), np.zeros((0, 2)))
  with pytest.raises(ValueError, match="not empty"):
    stats.top1_accuracy(np.zeros((3, 0)), np.zeros((3, 0)))
  with pytest.raises(ValueError, match="NaN"):
    stats.classification_stats(np.array([[np.nan]]), np.array([[1]]))


def test_audioset_eval_size_is_fast():
  rng = np.random.default_rng(0)
  output = rng.normal(size=(20000, 527)).astype(np.float32)
  target = rng.uniform(size=output.shape) < 0.01
  start = time.perf_counter()
  result = stats.classification_stats(output, target)
  elapsed = time.perf_counter() - start
  assert elapsed < 10.0, f"20000 x 527 took {elapsed:.1f} s"
  # Random scores: AP near the prevalence, AUC near one half.
  assert result["mAP"] == pytest.approx(0.01, abs=0.003)
  assert result["mAUC"] == pytest.approx(0.5, abs=0.01)
