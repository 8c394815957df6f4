"""HEAR API: embeddings equal the audio-only stream of the model on the clip's fbank windows.

A tiny model with a 64-frame audio window (0.64 s), so 1.5 s of audio spans three windows.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from cav_mae_jax import hear
from cav_mae_jax import models
from cav_mae_jax.convert import io
from cav_mae_jax.data import fbank

WINDOW = 64


pytestmark = pytest.mark.usefixtures("fast_compilation")  # conftest.py


@pytest.fixture(scope="module", name="checkpoint")
def fixture_checkpoint(tmp_path_factory):
  config = models.ModelConfig.from_config(models.model_config(
      "tiny", embed_dim=32, num_heads=2, encoder_depth=2, modality_specific_depth=1,
      audio_length=WINDOW, image_size=32))
  params = jax.tree.map(np.asarray, jax.jit(lambda k: models.init_params(config, k))(
      jax.random.key(0)))
  path = str(tmp_path_factory.mktemp("hear") / "params")
  io.save_params(path, params, model_config=dataclasses.asdict(config))
  return path, config, params


@pytest.fixture(scope="module", name="model")
def fixture_model(checkpoint):
  return hear.load_model(checkpoint[0])


def _audio(num_clips, samples, seed=0):
  return np.random.default_rng(seed).uniform(-0.5, 0.5, (num_clips, samples)).astype(np.float32)


def _direct_tokens(clip, config, params):
  """Audio-stream tokens [W, rows, columns, D] of a clip's padded, normalized fbank windows."""
  features = fbank.clip_fbank(clip)
  padded = -(-features.shape[0] // WINDOW) * WINDOW
  windows = fbank.normalize_fbank(fbank.pad_or_trim(features, padded)).reshape(-1, WINDOW, 128)
  tokens = models.CAVMAE(config).apply({"params": params}, windows, None, method="streams")
  return np.asarray(tokens["audio"]).reshape(len(windows), *config.audio_grid, -1)


def test_model_attributes(checkpoint, model):
  assert hear.sample_rate == model.sample_rate == 16000
  assert model.scene_embedding_size == model.timestamp_embedding_size == 32
  assert (model.fbank_mean, model.fbank_std) == (fbank.AUDIOSET_MEAN, fbank.AUDIOSET_STD)
  assert model.model_config.dtype == "float32"  # the stored config's
  assert hear.load_model(checkpoint[0], dtype="bfloat16").model_config.dtype == "bfloat16"
  with pytest.raises(ValueError, match="dtype"):
    hear.load_model(checkpoint[0], dtype="float8")


def test_short_audio_is_one_padded_window(checkpoint, model):
  _, config, params = checkpoint
  audio = _audio(3, 8000)  # 0.5 s: 48 frames, padded to 64
  scene = hear.get_scene_embeddings(audio, model)
  embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
  assert scene.shape == (3, 32) and embeddings.shape == (3, 3, 32)
  np.testing.assert_allclose(timestamps, np.tile([87.5, 247.5, 407.5], (3, 1)))
  for i, clip in enumerate(audio):
    tokens = _direct_tokens(clip, config, params)
    np.testing.assert_allclose(scene[i], tokens.mean(axis=(0, 1, 2)), atol=2e-5)
    np.testing.assert_allclose(embeddings[i], tokens[0].mean(axis=0)[:3], atol=2e-5)


def test_long_audio_spans_windows(checkpoint, model):
  _, config, params = checkpoint
  audio = _audio(2, 24000, seed=1)  # 1.5 s: 148 frames = windows of 64, 64 and 20 real frames
  scene = hear.get_scene_embeddings(audio, model)
  embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
  # ceil(148 / 16) = 10 columns of 160 ms; the 10th holds 60 ms of audio, its centre (1527.5 ms)
  # would be past the end (1500 ms), so it is left out.
  assert embeddings.shape == (2, 9, 32)
  np.testing.assert_allclose(timestamps[0], 160 * np.arange(9) + 87.5)
  for i, clip in enumerate(audio):
    tokens = _direct_tokens(clip, config, params)
    columns = np.concatenate(list(tokens.mean(axis=1)))  # [3 windows * 4 columns, D]
    np.testing.assert_allclose(embeddings[i], columns[:9], atol=2e-5)
    weights = np.array([64, 64, 20]) / 148
    expected = np.einsum("w,wd->d", weights, tokens.mean(axis=(1, 2)))
    np.testing.assert_allclose(scene[i], expected, atol=2e-5)


@pytest.mark.parametrize("seconds", [1.07, 1.98, 4.0, 0.1, 0.03, 0.02])
def test_timestamps_lie_within_the_audio(model, seconds):
  # hear-validator's lengths (1.07, 1.98, 4.0 s) and short clips. 1.98 s is 196 frames: its
  # 13th column (4 real frames) was given the timestamp 2007.5 ms, past the audio's end, which
  # the validator refuses ("Your timestamps end at ..., but the audio is 1980.0 ms"). A clip
  # under 87.5 ms had its one column at 87.5 ms, past its end too; one under one fbank frame
  # (0.02 s: 320 of 400 samples) was refused, and HEAR takes audio of any length.
  samples = int(seconds * 16000)
  embeddings, timestamps = hear.get_timestamp_embeddings(_audio(2, samples), model)
  duration = 1000 * samples / 16000
  count = max(1, int((duration - 87.5) // 160) + 1)
  expected = 160 * np.arange(count) + 87.5 if duration >= 87.5 else np.array([duration / 2])
  np.testing.assert_array_equal(timestamps, np.tile(expected, (2, 1)).astype(np.float32))
  assert embeddings.shape == (2, count, 32) and np.isfinite(embeddings).all()
  assert timestamps.max() <= duration
  assert timestamps.max() > duration - 2 * 160  # the validator's "no embeddings at the end"


def test_torch_in_torch_out(model):
  torch = pytest.importorskip("torch")
  audio = _audio(1, 8000)
  scene = hear.get_scene_embeddings(torch.from_numpy(audio), model)
  assert isinstance(scene, torch.Tensor)
  np.testing.assert_allclose(scene.numpy(), hear.get_scene_embeddings(audio, model))
  # A tensor that requires grad (e.g. from a differentiable front end) was refused by NumPy
  # ("Can't call numpy() on Tensor that requires grad").
  tracked = torch.from_numpy(audio).requires_grad_(True)
  embeddings, timestamps = hear.get_timestamp_embeddings(tracked, model)
  assert isinstance(embeddings, torch.Tensor) and isinstance(timestamps, torch.Tensor)
  assert embeddings.device == timestamps.device == tracked.device
  np.testing.assert_allclose(embeddings.numpy(),
                             hear.get_timestamp_embeddings(audio, model)[0])
  # bfloat16 (a half-precision front end): torch's .numpy() refused it ("Got unsupported
  # ScalarType BFloat16"), and a JAX bfloat16 array was refused as not floating point. Its
  # values, exactly as float32.
  rounded = torch.from_numpy(audio).to(torch.bfloat16)
  expected = hear.get_scene_embeddings(rounded.float().numpy(), model)
  np.testing.assert_array_equal(hear.get_scene_embeddings(rounded, model).numpy(), expected)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  np.testing.assert_array_equal(hear.get_scene_embeddings(jnp.asarray(audio, jnp.bfloat16),
                                                          model), expected)


def test_int16_audio_is_scaled_as_the_records_are(model):
  # int16 samples were taken as floats 32768 times too loud (np.asarray(audio, np.float32));
  # they are scaled by 1 / 32768 as records' waveforms and torchaudio's WAV loading are.
  samples = np.round(_audio(2, 8000) * 32767).astype(np.int16)
  np.testing.assert_allclose(hear.get_scene_embeddings(samples, model),
                             hear.get_scene_embeddings(samples / np.float32(32768), model),
                             rtol=1e-5, atol=1e-6)


def test_bad_audio_and_paths(model, tmp_path):
  with pytest.raises(ValueError, match="audio has no samples"):
    hear.get_scene_embeddings(np.zeros((1, 0), np.float32), model)
  with pytest.raises(ValueError, match=r"\[n, samples\]"):
    hear.get_scene_embeddings(np.zeros(16000, np.float32), model)
  with pytest.raises(ValueError, match="floating point .* or int16, got int32"):
    hear.get_scene_embeddings(np.zeros((1, 16000), np.int32), model)
  audio = _audio(3, 8000)
  audio[1, 100] = np.nan
  with pytest.raises(ValueError, match=r"NaN or infinite samples in clip\(s\) 1 of 3"):
    hear.get_timestamp_embeddings(audio, model)  # were NaN embeddings
  with pytest.raises(FileNotFoundError, match="no params checkpoint"):
    hear.load_model(str(tmp_path / "nothing"))


def test_workdir_normalization_is_the_runs(tmp_path):
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  os.makedirs(tmp_path / "checkpoints")
  recorded = json.loads(pretrain.get_config("tiny").to_json())  # as a run records it
  for mean, std, expected in ((-4.0, 3.0, (-4.0, 3.0)),
                              (None, None, (fbank.AUDIOSET_MEAN, fbank.AUDIOSET_STD))):
    recorded["data"].update(fbank_mean=mean, fbank_std=std)
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    assert hear.fbank_normalization(str(tmp_path)) == expected


def test_workdir_normalization_with_index_statistics_is_the_training_splits(tmp_path):
  # A run with fbank_stats='index' normalized by its training split's statistics; its
  # fbank_mean / fbank_std (AudioSet's by default) were unused and must not be taken.
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.data import dataset  # pylint: disable=g-import-not-at-top
  from test_input import write_records  # pylint: disable=g-import-not-at-top
  train_dir = write_records(str(tmp_path / "train"), [[0], [1], [2]], num_shards=1)
  config = pretrain.get_config("tiny")
  config.data.train_dir = train_dir
  config.data.fbank_stats = "index"
  workdir = tmp_path / "run"
  os.makedirs(workdir / "checkpoints")
  (workdir / "config.json").write_text(config.to_json())
  expected = dataset.fbank_normalization(config)
  assert abs(expected.mean - fbank.AUDIOSET_MEAN) > 1.0
  assert hear.fbank_normalization(str(workdir)) == (expected.mean, expected.std)
  config.data.train_dir = str(tmp_path / "gone")  # training split no longer there
  (workdir / "config.json").write_text(config.to_json())
  with pytest.raises(ValueError, match="fbank_stats='index'"):
    hear.fbank_normalization(str(workdir))


def test_params_checkpoint_normalization_is_what_it_records(tmp_path, checkpoint):
  # A params checkpoint of a run (tools/average.py, the eval export) records how the run
  # normalized; one that records nothing (converted from PyTorch) is read with AudioSet's.
  path, config, params = checkpoint
  assert hear.fbank_normalization(path) == (fbank.AUDIOSET_MEAN, fbank.AUDIOSET_STD)
  records = {"fixed": {"fbank_stats": "fixed", "fbank_mean": -4.0, "fbank_std": 3.0},
             "index": {"fbank_stats": "index", "fbank_mean": -5.081, "fbank_std": 4.4849,
                       "mean": -2.5, "std": 1.5},
             "index_unread": {"fbank_stats": "index", "fbank_mean": -5.081, "fbank_std": 4.4849}}
  for name, record in records.items():
    io.save_params(str(tmp_path / name), params, model_config=dataclasses.asdict(config),
                   fbank_normalization=record)
  assert hear.fbank_normalization(str(tmp_path / "fixed")) == (-4.0, 3.0)
  assert hear.load_model(str(tmp_path / "fixed")).fbank_mean == -4.0
  assert hear.fbank_normalization(str(tmp_path / "index")) == (-2.5, 1.5)
  with pytest.raises(ValueError, match="fbank_stats='index'.*does not record"):
    hear.fbank_normalization(str(tmp_path / "index_unread"))
  (tmp_path / "fixed" / io.NORMALIZATION_FILE).write_text('{"fbank_mean": 1}')
  with pytest.raises(ValueError, match="not a record of an fbank normalization"):
    hear.fbank_normalization(str(tmp_path / "fixed"))


def test_a_clips_embedding_does_not_depend_on_the_clips_beside_it(checkpoint):
  # One program for every call: a batch compiled for the number of windows rounded otherwise in
  # bfloat16 (the base model's scene embeddings up to 5.9e-3 apart, a batch of 3 or one alone).
  model = hear.load_model(checkpoint[0], dtype="bfloat16")
  audio = _audio(3, 24000, seed=5)
  together = hear.get_timestamp_embeddings(audio, model)[0]
  for i in range(3):
    np.testing.assert_array_equal(hear.get_timestamp_embeddings(audio[i:i + 1], model)[0][0],
                                  together[i])
  np.testing.assert_array_equal(hear.get_scene_embeddings(audio[1:], model),
                                hear.get_scene_embeddings(audio, model)[1:])


def test_calls_run_the_program_compiled_for_the_first(checkpoint):
  model = hear.load_model(checkpoint[0])
  traced = []
  embed = model.embed or hear.features.embedding_fn(model.model_config, patches=True,
                                                    streams=("audio",))

  def counting(params, batch):
    traced.append(1)
    return embed(params, batch)
  model.embed = counting
  for samples in (8000, 24000, 4000):  # other lengths, other window counts
    hear.get_scene_embeddings(_audio(2, samples), model)
    hear.get_timestamp_embeddings(_audio(1, samples), model)
  assert len(traced) == 1


def test_load_model_without_a_path_says_what_it_needs():
  # HEAR's signature is load_model(model_file_path=""); hear-validator without -m calls it so.
  with pytest.raises(ValueError, match="give the path of a params checkpoint or training workdir"):
    hear.load_model()


def test_the_torch_module_passes_hear_validators_checks(checkpoint):
  """cav_mae_jax.hear_torch for HEAR's tools (hear-validator, hear-eval-kit), which take only a
  torch.nn.Module: the checks hear-validator makes, and the same numbers as cav_mae_jax.hear."""
  torch = pytest.importorskip("torch")
  from cav_mae_jax import hear_torch  # pylint: disable=import-outside-toplevel
  module = hear_torch.load_model(checkpoint[0])  # the kit: load_model(path, **model_options)
  assert isinstance(module, torch.nn.Module) and module.to("cpu") is module
  assert hear_torch.sample_rate == module.sample_rate == 16000
  assert type(module.scene_embedding_size) is type(module.timestamp_embedding_size) is int
  model = hear.load_model(checkpoint[0])
  for length in (1.07, 1.98, 4.0):  # hear-validator's lengths, white noise in [-1, 1)
    audio = torch.rand((2, int(length * 16000)), generator=torch.Generator().manual_seed(0))
    audio = audio * 2 - 1
    with torch.no_grad():
      embeddings, timestamps = hear_torch.get_timestamp_embeddings(audio, module)
    assert embeddings.dtype == torch.float32 and embeddings.ndim == 3 and timestamps.ndim == 2
    assert embeddings.shape[:2] == timestamps.shape and embeddings.shape[0] == 2
    assert embeddings.shape[2] == module.timestamp_embedding_size
    steps = np.diff(timestamps.numpy())
    assert np.max(np.abs(steps - steps.mean())) <= 1  # regular
    assert 1000 * length - 2 * steps.mean() <= timestamps.max() <= 1000 * length
    np.testing.assert_array_equal(embeddings.numpy(),
                                  hear.get_timestamp_embeddings(audio.numpy(), model)[0])
  audio = torch.rand((4, int(2.74 * 16000))) * 2 - 1
  scene = hear_torch.get_scene_embeddings(audio, module)
  assert scene.dtype == torch.float32 and tuple(scene.shape) == (4, module.scene_embedding_size)
  np.testing.assert_array_equal(scene.numpy(), module(audio).numpy())
