"""Tests of audio <-> visual retrieval metrics on hand-made similarity matrices."""

import numpy as np
import pytest

from cav_mae_jax.eval import retrieval
import retrieval_reference


def test_identity_similarity_is_perfect():
  metrics = retrieval_reference.retrieval_metrics(np.eye(12))
  assert metrics == {"r@1": 100.0, "r@5": 100.0, "r@10": 100.0, "median_rank": 1.0}


def test_hand_made_ranks():
  # Query 0: correct item best (rank 0). Query 1: two items above it (rank 2).
  # Query 2: one item above it (rank 1).
  similarity = np.array([
      [0.9, 0.1, 0.2],
      [0.8, 0.3, 0.7],
      [0.1, 0.6, 0.5],
  ])
  np.testing.assert_array_equal(retrieval_reference.correct_item_positions(similarity), [0, 2, 1])
  metrics = retrieval_reference.retrieval_metrics(similarity, ks=(1, 2))
  assert metrics["r@1"] == pytest.approx(100 / 3)
  assert metrics["r@2"] == pytest.approx(200 / 3)
  assert metrics["median_rank"] == 2.0


def test_a_tie_counts_once_at_each_of_its_positions():
  # Constant similarities: each query's correct item stands at every position: chance level.
  metrics = retrieval_reference.retrieval_metrics(np.ones((20, 20)))
  assert metrics == {"r@1": 5.0, "r@5": 25.0, "r@10": 50.0, "median_rank": 10.5}
  # Query 0 ties with one other item (positions 0 and 1), queries 1 and 2 stand alone at 0.
  similarity = np.array([[0.5, 0.5, 0.1], [0.2, 0.9, 0.3], [0.0, 0.1, 0.7]])
  np.testing.assert_array_equal(retrieval_reference.correct_item_positions(similarity),
                                [0, 1, 0, 0])
  assert retrieval_reference.retrieval_metrics(similarity, ks=(1,))["r@1"] == 75.0


def test_recall_at_k_of_shifted_permutation():
  # Correct item always ranks 6th (rank index 5): R@1 = R@5 = 0, R@10 = 100.
  n = 30
  similarity = np.zeros((n, n))
  for i in range(n):
    for r, j in enumerate([(i + s) % n for s in range(1, 6)]):
      similarity[i, j] = 10 - r
    similarity[i, i] = 1
  metrics = retrieval_reference.retrieval_metrics(similarity)
  assert (metrics["r@1"], metrics["r@5"], metrics["r@10"]) == (0.0, 0.0, 100.0)
  assert metrics["median_rank"] == 6.0


def test_directions_use_transpose():
  audio = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  video = np.array([[1.0, 0.1], [0.0, 1.0], [1.0, 0.0]])
  metrics = retrieval_reference.audio_visual_retrieval(audio, video)
  sim = retrieval_reference.cosine_similarity(audio, video)
  np.testing.assert_allclose(np.diag(sim)[1], 1.0)
  a2v = retrieval_reference.retrieval_metrics(sim)
  v2a = retrieval_reference.retrieval_metrics(sim.T)
  assert metrics["a2v/r@1"] == a2v["r@1"] and metrics["v2a/r@1"] == v2a["r@1"]
  assert a2v["r@1"] != v2a["r@1"]  # the example is asymmetric on purpose


def test_evaluator_drops_padding_and_yields_pairs():
  import jax  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.eval import common  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from configs import common as config_common  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  features = rng.normal(size=(10, 4)).astype(np.float32)
  image = np.zeros((6, 1), np.float32)
  batches = [
      {"audio": features[:6], "image": image, "valid": np.ones(6, bool)},
      {"audio": np.concatenate([features[6:], np.full((2, 4), 99.0, np.float32)]),
       "image": image, "valid": np.array([True] * 4 + [False] * 2)},
  ]
  entry = config_common.evaluator("retrieval", every_steps=1, batch_size=6, max_clips=100)
  mesh = mesh_lib.make_mesh(config_common.mesh_config(), jax.devices()[:1])
  predict_fns = {"features": lambda params, batch: (batch["audio"] * params, batch["audio"])}
  evaluator = retrieval.RetrievalEvaluator("retrieval", entry, predict_fns, mesh,
                                           lambda split, directory, batch_size: iter(batches))
  assert isinstance(evaluator, common.Evaluator)
  metrics = dict(evaluator.run(2.0))
  assert metrics["retrieval/num_clips"] == 10
  assert metrics["retrieval/a2v/r@1"] == 100.0 and metrics["retrieval/v2a/median_rank"] == 1.0


def test_rejects_non_square():
  with pytest.raises(ValueError, match="square"):
    retrieval_reference.correct_item_positions(np.zeros((3, 4)))


def test_each_process_gives_its_share_of_the_first_clips():
  # Shards of 4, 4 and 3 clips; process p reads shards p, p + 2, ...: of the first 5 clips in
  # shard order process 0 holds 4 (shard 0), process 1 one (shard 1's first).
  from types import SimpleNamespace  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.data import dataset  # pylint: disable=import-outside-toplevel
  split = SimpleNamespace(index=SimpleNamespace(
      shards=[SimpleNamespace(num_examples=n) for n in (4, 4, 3)]))
  assert dataset.first_clips_per_process(split, 2, 5) == [4, 1]
  assert dataset.first_clips_per_process(split, 2, 10) == [6, 4]
  assert dataset.first_clips_per_process(split, 2, 100) == [7, 4]
  assert dataset.first_clips_per_process(split, 1, 5) == [5]
  assert dataset.first_clips_per_process(split, 3, 9) == [4, 4, 1]
  # A global batch of two processes' parts of 4 rows: each gives its first valid rows until
  # its share is given.
  taken = [0, 0]
  keep = retrieval.take_rows(np.array([1, 1, 1, 1, 1, 1, 0, 0], bool), [3, 1], taken)
  assert keep.tolist() == [1, 1, 1, 0, 1, 0, 0, 0] and taken == [3, 1]
  keep = retrieval.take_rows(np.ones(8, bool), [3, 1], taken)
  assert not keep.any() and taken == [3, 1]
