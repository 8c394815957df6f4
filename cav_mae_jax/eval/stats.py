"""Classification statistics: per-class average precision and ROC AUC, mAP, d-prime, accuracy.

The original scores fine-tuned models with scikit-learn, one class at a time: per-class
`average_precision_score` and `roc_auc_score`, mAP = the mean AP over all classes, mean AUC,
d-prime of the mean AUC, and top-1 accuracy = argmax(output) == argmax(target). This module
computes the same numbers in NumPy, vectorized over classes (one sort per class, no per-class
Python loop), so the AudioSet eval set (20k clips x 527 classes) takes about a second, and
without scikit-learn or SciPy at run time.

Ties follow scikit-learn. Average precision treats tied scores as one threshold: every
positive in a tie group gets the precision at the bottom of that group (all tied clips
counted as retrieved). ROC AUC is the trapezoid over distinct thresholds, which equals the
Mann-Whitney statistic with ties counted one half.

Classes the eval set does not cover are where the original's numbers are version-dependent:
- A class without positives has no defined AP. scikit-learn >= 1.1 warns and returns 0.0
  (recall set to one at every threshold); older releases returned NaN, which made the whole
  mAP NaN. Here such a class scores 0.0 and counts in `mAP`, matching the original's
  "mean over all classes" with current scikit-learn; `mAP_classes_with_positives` leaves it
  out, and `classes_without_positives` says how many there were.
- ROC AUC needs both positives and negatives. The original caught the error that the
  scikit-learn of its day raised and stored -1, which then entered the mean AUC and dragged it
  down (current scikit-learn returns NaN instead, which makes the original's mean AUC NaN).
  Here such a class has AUC NaN and is
  left out of `mAUC` (and so of `d_prime`); `classes_without_negatives` counts the other
  undefined case. A class whose clips are all positive has AP 1.0.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

# Classes sorted together: bounds the temporary arrays to chunk x clips float64 values.
_CLASS_CHUNK = 64


def _check(output: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Validated float64 copies of scores and binary targets, both [clips, classes]."""
  output = np.asarray(output, np.float64)
  target = np.asarray(target)
  if output.ndim != 2 or output.shape != target.shape or 0 in output.shape:
    raise ValueError(f"output and target must both be [clips, classes], not empty; "
                     f"got {output.shape} and {target.shape}.")
  if not np.all(np.isfinite(output)):
    raise ValueError("output contains NaN or infinite scores.")
  if not np.all((target == 0) | (target == 1)):
    raise ValueError("target must be binary (0/1); pass hard labels, not smoothed ones.")
  return output, target.astype(np.float64)


def _per_class(output: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-class AP and AUC of validated float64 arrays (AP 0 / AUC NaN where undefined)."""
  num_clips = output.shape[0]
  position = np.arange(num_clips)
  ap, auc = [], []
  for first in range(0, output.shape[1], _CLASS_CHUNK):
    # [classes, clips] rows, contiguous along clips, sorted ascending; the order within a tie
    # group does not matter below.
    scores = np.ascontiguousarray(output[:, first:first + _CLASS_CHUNK].T)
    order = np.argsort(scores, axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    labels = np.take_along_axis(target[:, first:first + _CLASS_CHUNK].T, order, axis=1)
    # Each clip's tie group is the ascending positions [group_start, group_end].
    boundary = scores[:, 1:] != scores[:, :-1]
    edge = np.ones((scores.shape[0], 1), bool)
    group_start = np.maximum.accumulate(
        np.where(np.concatenate([edge, boundary], axis=1), position, 0), axis=1)
    group_end = np.minimum.accumulate(
        np.where(np.concatenate([boundary, edge], axis=1), position, num_clips - 1)[:, ::-1],
        axis=1)[:, ::-1]
    positives = labels.sum(axis=1)
    negatives = num_clips - positives
    with np.errstate(divide="ignore", invalid="ignore"):
      # AP: at the threshold of a clip's group, everything scoring >= it is retrieved.
      positives_below = np.cumsum(labels, axis=1) - labels
      retrieved_positives = positives[:, None] - np.take_along_axis(
          positives_below, group_start, axis=1)
      precision = retrieved_positives / (num_clips - group_start)
      ap.append(np.where(positives > 0, (labels * precision).sum(axis=1) / positives, 0.0))
      # AUC: Mann-Whitney U from 1-based mid-ranks of the positives.
      mid_rank = (group_start + group_end) / 2 + 1
      rank_sum = (labels * mid_rank).sum(axis=1)
      auc.append((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))
  ap, auc = np.concatenate(ap), np.concatenate(auc)
  auc[~np.isfinite(auc)] = np.nan
  return ap, auc


def average_precision(output: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Per-class average precision [classes] of scores and binary targets [clips, classes]."""
  return _per_class(*_check(output, target))[0]


def roc_auc(output: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Per-class ROC AUC [classes]; NaN for a class without positives or without negatives."""
  return _per_class(*_check(output, target))[1]


def d_prime(auc: float) -> float:
  """Sensitivity index sqrt(2) * Phi^-1(auc): +-inf at AUC 1 / 0, NaN for NaN."""
  if math.isnan(auc):
    return math.nan
  if auc <= 0.0 or auc >= 1.0:
    return math.copysign(math.inf, auc - 0.5)
  return NormalDist().inv_cdf(auc) * math.sqrt(2.0)


def top1_accuracy(output: np.ndarray, target: np.ndarray) -> float:
  """Fraction of clips whose highest-scoring class is the target's highest (first on ties)."""
  output, target = np.asarray(output), np.asarray(target)
  if output.ndim != 2 or output.shape != target.shape or 0 in output.shape:
    raise ValueError(f"output and target must both be [clips, classes], not empty; "
                     f"got {output.shape} and {target.shape}.")
  return float(np.mean(np.argmax(output, axis=1) == np.argmax(target, axis=1)))


def classification_stats(output: np.ndarray, target: np.ndarray) -> dict[str, float]:
  """mAP, mAUC, d-prime and top-1 accuracy of scores and binary targets [clips, classes].

  Keys: `mAP` (mean AP over all classes, a class without positives scoring 0.0),
  `mAP_classes_with_positives`, `mAUC` (mean over classes with both positives and negatives),
  `d_prime` (of `mAUC`), `accuracy`, `classes_without_positives`, `classes_without_negatives`.
  Everything but accuracy depends only on the scores' order within a class, and accuracy only
  on their order within a clip: logits and their sigmoid give the same statistics, their
  softmax the same accuracy but other mAP, AUC and d-prime.
  """
  output, target = _check(output, target)
  ap, auc = _per_class(output, target)
  positives = target.sum(axis=0)
  with_positives = positives > 0
  with_auc = ~np.isnan(auc)
  mean_auc = float(np.mean(auc[with_auc])) if with_auc.any() else math.nan
  return {
      "mAP": float(np.mean(ap)),
      "mAP_classes_with_positives":
          float(np.mean(ap[with_positives])) if with_positives.any() else math.nan,
      "mAUC": mean_auc,
      "d_prime": d_prime(mean_auc),
      "accuracy": top1_accuracy(output, target),
      "classes_without_positives": int(np.sum(~with_positives)),
      "classes_without_negatives": int(np.sum(positives == target.shape[0])),
  }
