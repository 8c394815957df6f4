"""Device retrieval ranks against a brute-force loop and the float64 NumPy implementation."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cav_mae_jax.eval import ranking
import retrieval_reference


def brute_force_ranks(queries, items):
  """For each query, count the items whose cosine similarity is > the correct item's."""
  queries = [q / np.linalg.norm(q) for q in np.asarray(queries, np.float64)]
  items = [x / np.linalg.norm(x) for x in np.asarray(items, np.float64)]
  ranks = []
  for i, query in enumerate(queries):
    correct = float(np.dot(query, items[i]))
    ranks.append(sum(1 for item in items if float(np.dot(query, item)) > correct))
  return np.array(ranks)


def near_tie_bounds(queries, items, margin):
  """Lowest and highest count of items ahead a computation with error below `margin` can give,
  per query."""
  similarity = retrieval_reference.cosine_similarity(queries, items)
  correct = np.diag(similarity)[:, None]
  others = ~np.eye(len(similarity), dtype=bool)
  lowest = np.sum((similarity > correct + margin) & others, axis=1)
  highest = np.sum((similarity >= correct - margin) & others, axis=1)
  return lowest, highest


def paired_features(seed, num, dim, noise):
  rng = np.random.default_rng(seed)
  audio = rng.normal(size=(num, dim)).astype(np.float32)
  video = (audio + noise * rng.normal(size=(num, dim))).astype(np.float32)
  return audio, video


@pytest.mark.parametrize("seed", range(2))
def test_float64_ranks_equal_brute_force_both_directions(seed):
  audio, video = paired_features(seed, 120, 16, noise=2.0)
  with jax.enable_x64(True):
    a2v, a2v_tied = ranking.correct_item_positions(audio, video, chunk_size=32,
                                                   dtype=jnp.float64)
    v2a, v2a_tied = ranking.correct_item_positions(video, audio, chunk_size=32,
                                                   dtype=jnp.float64)
  np.testing.assert_array_equal(a2v, brute_force_ranks(audio, video))
  np.testing.assert_array_equal(v2a, brute_force_ranks(video, audio))
  assert (a2v_tied == 1).all() and (v2a_tied == 1).all()  # random features: no ties
  assert a2v.min() == 0 and a2v.max() > 10  # a spread of ranks, not a degenerate case


@pytest.mark.parametrize("seed", range(2))
def test_float32_ranks_equal_brute_force_up_to_near_ties(seed):
  audio, video = paired_features(seed, 120, 16, noise=2.0)
  for queries, items in ((audio, video), (video, audio)):
    ranks, _ = ranking.correct_item_positions(queries, items, chunk_size=50)
    lowest, highest = near_tie_bounds(queries, items, margin=1e-5)
    assert np.all((lowest <= ranks) & (ranks <= highest))
    exact = lowest == highest  # no other item within 1e-5 of the correct one
    assert exact.mean() > 0.9
    np.testing.assert_array_equal(ranks[exact], brute_force_ranks(queries, items)[exact])


def test_ties_are_scored_as_the_original_scores_them():
  # Items 0 and 2 are the same vector: queries 0 and 2 each tie with one other item.
  basis = np.eye(3, dtype=np.float32)
  items = basis[[0, 1, 0, 2]]
  ahead, tied = ranking.correct_item_positions(items, items)
  np.testing.assert_array_equal(ahead, [0, 0, 0, 0])
  np.testing.assert_array_equal(tied, [2, 1, 2, 1])
  reference = retrieval_reference.retrieval_metrics(
      retrieval_reference.cosine_similarity(items, items), ks=(1, 2))
  assert ranking.recall_and_median_rank(ahead, tied, ks=(1, 2)) == reference
  assert reference["r@1"] == pytest.approx(100 * 4 / 6)  # 4 of the 6 entries at position 0


@pytest.mark.parametrize("seed", range(3))
def test_duplicate_features_give_the_reference_metrics(seed):
  # Clips drawn from a few distinct features: many exact ties, of every size.
  rng = np.random.default_rng(seed)
  pool = rng.normal(size=(5, 16)).astype(np.float32)
  audio, video = pool[rng.integers(0, 5, 41)], pool[rng.integers(0, 5, 41)]
  assert ranking.audio_visual_retrieval(audio, video, chunk_size=16) == (
      retrieval_reference.audio_visual_retrieval(audio, video))


def test_constant_features_give_chance_level_recall():
  metrics = ranking.audio_visual_retrieval(np.ones((20, 4)), np.full((20, 4), 3.0))
  for direction in ("a2v", "v2a"):
    assert (metrics[f"{direction}/r@1"], metrics[f"{direction}/r@10"]) == (5.0, 50.0)
    assert metrics[f"{direction}/median_rank"] == 10.5


def test_chunking_and_jax_inputs_do_not_change_ranks():
  audio, video = paired_features(5, 37, 8, noise=1.0)
  whole = ranking.correct_item_positions(audio, video, chunk_size=37)
  for chunk_size in (1, 8, 36, 100):
    np.testing.assert_array_equal(
        ranking.correct_item_positions(audio, video, chunk_size=chunk_size), whole)
  np.testing.assert_array_equal(ranking.correct_item_positions(
      jnp.asarray(audio), jnp.asarray(video), chunk_size=8), whole)


def test_equals_numpy_implementation():
  audio, video = paired_features(11, 500, 32, noise=3.0)
  reference = retrieval_reference.audio_visual_retrieval(audio, video)
  with jax.enable_x64(True):
    assert ranking.audio_visual_retrieval(audio, video, chunk_size=128,
                                          dtype=jnp.float64) == reference
  metrics = ranking.audio_visual_retrieval(audio, video, chunk_size=128)
  assert list(metrics) == list(reference)  # same keys, same order
  for name, value in metrics.items():  # float32: at most one query may move across a cut-off
    assert value == pytest.approx(reference[name], abs=100 / 500 + 1e-9), name
  assert 5 < reference["a2v/r@1"] < 95  # neither trivial nor hopeless


def test_two_thousand_clips_take_seconds():
  audio, video = paired_features(0, 2000, 256, noise=8.0)
  start = time.perf_counter()
  metrics = ranking.audio_visual_retrieval(audio, video)
  elapsed = time.perf_counter() - start  # includes compilation
  assert elapsed < 10.0, f"2000 x 256 retrieval took {elapsed:.1f} s"
  assert 1.0 < metrics["a2v/r@1"] < 99.0


def test_rejects_bad_input():
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    ranking.correct_item_positions(np.zeros((3, 2)), np.zeros((4, 2)))
  with pytest.raises(ValueError, match="NaN"):
    ranking.correct_item_positions(np.full((3, 2), np.nan), np.ones((3, 2)))
  if not jax.config.jax_enable_x64:
    with pytest.raises(ValueError, match="jax_enable_x64"):
      ranking.correct_item_positions(np.ones((3, 2)), np.ones((3, 2)), dtype=jnp.float64)
