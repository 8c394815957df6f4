"""Embeddings and retrieval of clips on a mesh (eval/features.py).

Records are the input tests' tiny records (7 clips in 3 shards, ids clip0..clip6); the model is a
tiny float32 CAV-MAE; 8 fake CPU devices (conftest) against one.
"""

import json
import os
import weakref

import jax
import ml_collections
import numpy as np
import pytest

from cav_mae_jax import models
from cav_mae_jax import tasks
from cav_mae_jax.eval import clips
from cav_mae_jax.eval import features
from cav_mae_jax.eval import ranking
from cav_mae_jax.train import mesh as mesh_lib
from configs import pretrain
import features_multihost_worker
import multihost_worker
from test_input import write_records

NUM_CLIPS = 7
RECORD_ORDER = ["clip0", "clip3", "clip6", "clip1", "clip4", "clip2", "clip5"]  # shard by shard


pytestmark = pytest.mark.usefixtures("fast_compilation")  # conftest.py


def tiny_config(eval_dir: str = "") -> ml_collections.ConfigDict:
  """A tiny float32 model on 1024-frame records and 32-pixel images."""
  config = pretrain.get_config("tiny")
  m = config.model
  m.embed_dim, m.num_heads, m.encoder_depth, m.modality_specific_depth = 32, 2, 2, 1
  m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads = 16, 1, 2
  m.image_size = 32
  config.data.eval_dir = eval_dir
  config.data.batch_size = 8
  return config


@pytest.fixture(scope="module", name="records_dir")
def fixture_records_dir(tmp_path_factory):
  return write_records(str(tmp_path_factory.mktemp("records")),
                       [[i % 4] for i in range(NUM_CLIPS)], num_shards=3)


@pytest.fixture(scope="module", name="params")
def fixture_params():
  return jax.jit(lambda rng: models.init_params(tiny_config().model, rng))(jax.random.key(0))


def _direct_embeddings(params, config, batches):
  """Embeddings of the valid clips by one un-jitted model call, no mesh, no padding."""
  rows = {k: np.concatenate([b[k][b["valid"]] for b in batches]) for k in ("audio", "image")}
  tokens = models.CAVMAE(models.ModelConfig.from_config(config.model)).apply(
      {"params": params}, rows["audio"], rows["image"], method="streams")
  return {k: np.asarray(v.mean(axis=1)) for k, v in tokens.items()}, tokens


@pytest.mark.parametrize("num_devices", [1, 8])
def test_embeddings_over_the_mesh_drop_padding(records_dir, params, num_devices):
  config = tiny_config(records_dir)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:num_devices])
  batches = list(clips.record_batches(config, 8))
  loaded = features.Loaded(tasks.get_task(config), mesh, params, 0)
  ids, out = features.extract_embeddings(loaded, batches, patches=True)
  assert list(ids) == RECORD_ORDER
  expected, tokens = _direct_embeddings(params, config, batches)
  assert sorted(out) == ["audio", "audio_patches", "joint", "joint_patches", "video",
                         "video_patches"]
  for name in ("audio", "video", "joint"):
    assert out[name].shape == (NUM_CLIPS, 32)
    np.testing.assert_allclose(out[name], expected[name], atol=2e-5, err_msg=name)
    np.testing.assert_allclose(out[name + "_patches"], tokens[name], atol=2e-5, err_msg=name)
  assert out["audio_patches"].shape == (NUM_CLIPS, 512, 32)
  assert out["joint_patches"].shape == (NUM_CLIPS, 512 + 4, 32)


def test_retrieval_ranks_the_tasks_features(records_dir, params):
  config = tiny_config(records_dir)
  mesh = mesh_lib.make_mesh(config.mesh)
  loaded = features.Loaded(tasks.get_task(config), mesh, params, 0)
  batches = list(clips.record_batches(config, 8, video_ids=RECORD_ORDER[:5]))
  result = features.retrieval(loaded, batches)
  assert sorted(result.ids) == sorted(RECORD_ORDER[:5])
  expected, _ = _direct_embeddings(params, config, batches)
  assert result.metrics == pytest.approx(
      ranking.audio_visual_retrieval(expected["audio"], expected["video"]))
  assert set(result.metrics) == {f"{d}/{m}" for d in ("a2v", "v2a")
                                 for m in ("r@1", "r@5", "r@10", "median_rank")}


def test_batch_size_must_fit_the_devices():
  mesh = mesh_lib.make_mesh(tiny_config().mesh)
  assert features.check_batch_size(16, mesh) == 16
  with pytest.raises(ValueError, match="batch_size=12"):
    features.check_batch_size(12, mesh)


def test_npz_holds_ids_and_arrays(tmp_path):
  path = str(tmp_path / "out" / "features.npz")
  features.write_npz(path, np.array(["a", "bb"], object), {"audio": np.ones((2, 3), np.float32)})
  with np.load(path) as data:
    assert list(data["ids"]) == ["a", "bb"] and data["audio"].shape == (2, 3)
  with pytest.raises(FileExistsError, match="features.npz: output already exists"):
    features.write_npz(path, np.array(["c"], object), {"audio": np.ones((1, 3), np.float32)})
  features.write_npz(path, np.array(["c"], object), {"audio": np.ones((1, 3), np.float32)},
                     overwrite=True)
  with np.load(path) as data:
    assert list(data["ids"]) == ["c"]


def test_the_batches_outputs_are_joined_letting_go_of_each_batch():
  # run_on_mesh held every batch's outputs and their concatenation at once: twice the output,
  # 174 GB of host memory for the tokens of 20k clips with --patches. Each batch's rows are let
  # go once copied now; the joined array is np.concatenate's.
  chunks = [np.arange(6, dtype=np.float32).reshape(3, 2), np.zeros((0, 2), np.float32),
            np.full((2, 2), 0.1, np.float64)]
  expected = np.concatenate(chunks)
  batches = [weakref.ref(chunk) for chunk in chunks]
  joined = features._concatenate_releasing(chunks)  # pylint: disable=protected-access
  assert joined.dtype == expected.dtype and joined.shape == expected.shape
  np.testing.assert_array_equal(joined, expected)
  assert not chunks and all(batch() is None for batch in batches)


def test_two_processes_count_every_clip_once(records_dir):
  """2 processes x 4 devices: ids of all processes' rows, in global order, padding dropped."""
  worker = os.path.join(multihost_worker.ROOT, "tests", "features_multihost_worker.py")
  port = multihost_worker.free_port()
  results = multihost_worker.run_processes(
      worker, [[i, 2, port, records_dir] for i in range(2)], multihost_worker.process_env(4),
      timeout=300)
  outputs = []
  for result in results:
    assert result.returncode == 0, result.stderr[-3000:]
    outputs.append(json.loads(result.stdout.strip().splitlines()[-1]))
  assert outputs[0] == outputs[1]
  result = outputs[0]
  assert result["array_ids"] == [str(i) for i in range(13)]
  np.testing.assert_array_equal(result["array_x"], np.arange(26).reshape(13, 2) * 2.0)
  # Asked for a mesh that interleaves the processes' devices: the same ids and rows.
  assert result["interleaved_requested"] == [0, 1] * 4
  assert result["interleaved_ids"] == result["array_ids"]
  assert result["interleaved_x"] == result["array_x"]
  # Process 0 reads shards 0 and 2 (clips 0, 3, 6, 2, 5), process 1 shard 1 (clips 1, 4).
  assert sorted(result["record_ids"]) == ["clip0", "clip1", "clip2", "clip4", "clip6"]
  clip_numbers = np.array([int(x[4:]) for x in result["record_ids"]])
  np.testing.assert_allclose(result["record_mean"], (clip_numbers + 5.081) / 4.4849, rtol=1e-5)
  assert result["gathered"] == [["p0"], ["p1", "p1"]]
  # The retrieval evaluator's first 4 clips are those of shard order, 0, 3, 6 (shard 0) and 1
  # (shard 1), as one process takes them; it took the global batch's first valid rows: 0, 3, 6,
  # 2 (process 0's rows, shards 0 and 2, come first).
  assert _clip_numbers(result["retrieval_audio"]) == [0, 1, 3, 6]
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  one_process, _ = features_multihost_worker.retrieval_evaluator(mesh, records_dir).features(0.0)
  assert _clip_numbers(one_process.reshape(-1)) == [0, 1, 3, 6]


def _clip_numbers(mean_fbanks):
  """The clips (numbered by their constant fbank value) of normalized mean fbank values."""
  return sorted(int(round(x * 4.4849 - 5.081)) for x in mean_fbanks)


def test_finetuned_encoder_gives_the_same_embeddings(params):
  config = tiny_config()
  model_config = models.ModelConfig.from_config(config.model)
  finetuned = jax.jit(lambda k: models.init_params(model_config, k, finetune=True))(
      jax.random.key(1))
  pretrained = {**params, **{k: v for k, v in finetuned.items() if k in params}}
  rng = np.random.default_rng(0)
  batch = {"audio": rng.standard_normal((2, 1024, 128)).astype(np.float32),
           "image": rng.standard_normal((2, 32, 32, 3)).astype(np.float32)}
  ours = features.embedding_fn(model_config, finetune=True)(finetuned, batch)
  reference = features.embedding_fn(model_config)(pretrained, batch)
  assert sorted(ours) == ["audio", "joint", "video"]
  for name in ours:
    np.testing.assert_allclose(ours[name], reference[name], atol=1e-5, err_msg=name)
  audio_only = features.embedding_fn(model_config, streams=("audio",))(pretrained, batch)
  assert sorted(audio_only) == ["audio"]
  np.testing.assert_allclose(audio_only["audio"], reference["audio"], atol=1e-5)


def test_a_batch_larger_than_the_clips_is_cut_to_them(records_dir):
  # A batch of 10**9 padded that many zero clips: hours of work, or no memory left, for the
  # same outputs. Every source holds one batch of the clips, rounded to the devices, instead.
  from cav_mae_jax.eval import common  # pylint: disable=import-outside-toplevel
  devices = jax.local_device_count()
  huge = devices * 10**8
  fits = -(-NUM_CLIPS // devices) * devices
  assert clips.useful_host_batch(huge, NUM_CLIPS) == fits
  assert clips.useful_host_batch(devices, NUM_CLIPS) == devices
  batches = list(clips.record_batches(tiny_config(records_dir), huge))
  assert [len(b["valid"]) for b in batches] == [fits] and sum(batches[0]["valid"]) == NUM_CLIPS
  pipeline = common.records_batch_source(tiny_config(records_dir))("eval", "", huge)
  assert pipeline.host_batch == fits and pipeline.num_batches == 1
  arrays = {"audio": np.zeros((NUM_CLIPS, 2), np.float32)}
  assert [len(b["valid"]) for b in clips.array_batches(arrays, huge)] == [fits]
