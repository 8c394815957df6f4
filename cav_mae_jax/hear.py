"""HEAR-style audio embeddings of a CAV-MAE model, for benchmarking its audio branch.

The HEAR API (hearbenchmark.com): `load_model(path)`, `get_scene_embeddings(audio, model)` ->
[n, D] and `get_timestamp_embeddings(audio, model)` -> ([n, T, D], timestamps [n, T] in ms),
with `sample_rate` (16 kHz; also a module attribute) and the embedding sizes as model
attributes. `audio` is float in [-1, 1] (or int16 samples, scaled by 1 / 32768 as a 16-bit WAV
is) [n, samples] at 16 kHz (NumPy, JAX or torch on any device; torch in gives float32 torch out
on the input's device, else NumPy); NaN or infinite samples are refused.

"HEAR-style": the functions and attributes are HEAR's, but the model object is a plain Python
object holding JAX parameters, not a `torch.nn.Module` or `tf.Module`, so HEAR's own harness
(hear-eval-kit) and `hear-validator`, which check that type, refuse it; `cav_mae_jax.hear_torch`
is this API with `load_model` returning such a module, for them.

Only the audio branch runs: the audio-only stream after the joint block with `norm_a`, as the
original's audio feature script (`forward_feat`) takes it. A clip becomes a Kaldi fbank exactly
as the input pipeline computes one (mean removed, 128 bins, 10 ms frames), normalized with the
run's normalization when the model is a training workdir (`config.data.fbank_mean` /
`fbank_std`, or with `fbank_stats='index'` its training split's statistics) or a params
checkpoint that records it (`fbank_normalization.json`, from tools/average.py or the eval
export), else AudioSet's -5.081 / 4.4849 (every released recipe uses those).

Lengths. The model sees `audio_length` frames (1024 = 10.24 s) at a time. Shorter audio is
padded with zero log-mel frames before normalization, as the original pads. Longer audio is cut
into consecutive windows of `audio_length` frames (no overlap; the last one padded), each
encoded on its own.
- Timestamp embeddings: the tokens of one time column of the patch grid (16 frames, 160 ms),
  averaged over its frequency rows. A column's timestamp is the centre of the span its frames
  cover: 160 * t + 87.5 ms (frame f covers [10 f, 10 f + 25) ms). One embedding per column
  whose timestamp lies within the audio (at most ceil(frames / 16)): a last, partly padded
  column whose centre would fall past the end (it holds under 87.5 ms of audio) is left out, as
  HEAR requires timestamps within the audio (its validator refuses one past the end). Audio
  shorter than 87.5 ms still gets its one column, at the middle of the audio; audio shorter
  than one 25-ms fbank frame (400 samples) is zero-padded to one frame, as HEAR takes audio
  of any length.
- Scene embeddings: the mean of all tokens of a window (padding columns included, as the
  original pools a padded clip); for several windows, their mean weighted by the real frames in
  each. For audio up to the model's length this is exactly the original's pooled feature.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import numpy as np

from cav_mae_jax import models
from cav_mae_jax.data import fbank
from cav_mae_jax.eval import clips
from cav_mae_jax.eval import features
from cav_mae_jax.train import mesh as mesh_lib

sample_rate = 16000  # pylint: disable=invalid-name  (HEAR API attribute)
WINDOWS_PER_DEVICE = 8


@dataclasses.dataclass
class HearModel:
  """A loaded model: parameters on a mesh of every device, and what the API reports."""

  model_config: models.ModelConfig
  params: Any
  mesh: jax.sharding.Mesh
  finetune: bool
  fbank_mean: float
  fbank_std: float
  batch_size: int
  sample_rate: int = sample_rate
  # The embedding function, made once: each call of the API then runs the program compiled for
  # the first (a new function object was traced and compiled again at every call).
  embed: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

  @property
  def scene_embedding_size(self) -> int:
    return self.model_config.embed_dim

  @property
  def timestamp_embedding_size(self) -> int:
    return self.model_config.embed_dim


def load_model(model_file_path: str = "", *, step: int = 0, batch_size: int = 0,
               dtype: str = "") -> HearModel:
  """A params checkpoint (tools/convert.py, with model_config.json) or a training workdir.

  `step`: the workdir's checkpoint (0: the latest). `batch_size`: windows per device batch
  (default 8 per device). `dtype`: the compute dtype ('float32', 'bfloat16'; '' = the model
  config's, bfloat16 for the base recipes).
  """
  from cav_mae_jax.convert import init_source  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  path = os.fspath(model_file_path)
  if not path:  # HEAR's signature has a default; there are no built-in weights to load
    raise ValueError("load_model: give the path of a params checkpoint or training workdir "
                     "(there are no built-in weights)")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no params checkpoint or training workdir")
  stored = init_source.read_model_config(path)
  if dtype:
    stored["dtype"] = dtype
  model_config = models.ModelConfig.from_config(stored)
  if not model_config.uses_audio:
    raise ValueError(f"{path}: model has no audio branch (modalities="
                     f"{model_config.modalities!r})")
  mean, std = fbank_normalization(path)
  host_params = init_source.read_params(path, step)
  mesh = mesh_lib.make_mesh(common.mesh_config())
  params = mesh_lib.host_to_global(host_params, mesh_lib.tree_shardings(mesh, host_params))
  batch_size = features.check_batch_size(batch_size or WINDOWS_PER_DEVICE * mesh.devices.size,
                                         mesh)
  return HearModel(model_config, params, mesh, "mlp_head_1" in host_params, mean, std,
                   batch_size)


def fbank_normalization(path: str) -> tuple[float, float]:
  """(mean, std) of fbank normalization: the run's (a workdir's, or what a params checkpoint
  records), else AudioSet's.

  A run with `config.data.fbank_stats='index'` normalized with its training split's own
  statistics (its fbank_mean / fbank_std were unused): a workdir's are read from that split, a
  params checkpoint's from its record; where they cannot be had it is an error (not AudioSet's
  numbers in their place).
  """
  from cav_mae_jax.convert import init_source  # pylint: disable=g-import-not-at-top
  record = init_source.normalization_record(path, require_statistics=True)
  if record is None:
    return fbank.AUDIOSET_MEAN, fbank.AUDIOSET_STD
  if record["fbank_stats"] == "index":
    return float(record["mean"]), float(record["std"])
  if record["fbank_mean"] is not None:
    return float(record["fbank_mean"]), float(record["fbank_std"])
  return fbank.AUDIOSET_MEAN, fbank.AUDIOSET_STD


def _as_numpy(audio: Any) -> np.ndarray:
  """`audio` as a NumPy array; a torch tensor may be on any device or require grad. bfloat16
  (which NumPy holds as no floating type, and torch does not convert) as float32, exactly."""
  if _is_torch(audio):
    audio = audio.detach().cpu()
    if str(audio.dtype) == "torch.bfloat16":
      audio = audio.float()
    return audio.numpy()
  audio = np.asarray(audio)
  return audio.astype(np.float32) if audio.dtype.name == "bfloat16" else audio


def _is_torch(audio: Any) -> bool:
  return type(audio).__module__.split(".")[0] == "torch"


def _windows(audio: Any, model: HearModel) -> tuple[np.ndarray, int]:
  """Normalized fbank windows [n * W, audio_length, F] of audio [n, samples], and frames."""
  audio = _as_numpy(audio)
  if audio.dtype != np.int16 and not np.issubdtype(audio.dtype, np.floating):
    raise ValueError(f"audio must be floating point (in [-1, 1]) or int16, got {audio.dtype}")
  if audio.ndim != 2 or audio.shape[0] == 0:
    raise ValueError(f"audio must be [n, samples] with n >= 1, got shape {audio.shape}")
  finite = np.isfinite(audio).all(axis=1)
  if not finite.all():  # they would come back as NaN embeddings
    bad = np.flatnonzero(~finite)
    raise ValueError(f"audio has NaN or infinite samples in clip(s) {', '.join(map(str, bad[:10]))}"
                     f"{', ...' if bad.size > 10 else ''} of {audio.shape[0]}")
  if audio.shape[1] == 0:
    raise ValueError("audio has no samples")
  window, _, _ = fbank.frame_geometry(sample_rate)
  if audio.shape[1] < window:  # HEAR takes audio of any length: one fbank frame, zero-padded
    audio = np.pad(audio, ((0, 0), (0, window - audio.shape[1])))
  length = model.model_config.audio_length
  frames = fbank.num_frames(audio.shape[1], sample_rate)
  padded = math.ceil(frames / length) * length
  clip_windows = [
      fbank.normalize_fbank(
          fbank.pad_or_trim(fbank.clip_fbank(clip, sample_rate, model.model_config.num_mel_bins),
                            padded), model.fbank_mean, model.fbank_std)
      for clip in audio]
  return np.stack(clip_windows).reshape(-1, length, model.model_config.num_mel_bins), frames


def _encode(audio: Any, model: HearModel) -> tuple[np.ndarray, np.ndarray, int]:
  """(pooled [n, W, D], time columns [n, W * columns, D], frames) of every window."""
  windows, frames = _windows(audio, model)
  if model.embed is None:
    model.embed = features.embedding_fn(model.model_config, finetune=model.finetune,
                                        patches=True, streams=("audio",))
  # Batches of `batch_size` windows whatever their number: one program for every call, so a
  # clip's embedding does not depend on the clips beside it (a program compiled for another
  # batch size rounds otherwise in bfloat16: up to 2.2e-2 apart).
  batches = clips.array_batches({"audio": windows}, model.batch_size, cut_to_clips=False)
  _, out = features.run_on_mesh(model.embed, model.params, batches, model.mesh,
                                input_keys=("audio",))
  n = np.shape(audio)[0]
  rows, columns = model.model_config.audio_grid
  tokens = out["audio_patches"].reshape(n, -1, rows, columns, model.model_config.embed_dim)
  column_tokens = tokens.mean(axis=2).reshape(n, -1, model.model_config.embed_dim)
  return out["audio"].reshape(n, -1, model.model_config.embed_dim), column_tokens, frames


def _like(array: np.ndarray, audio: Any) -> Any:
  """`array` as a torch tensor on `audio`'s device when `audio` is one (HEAR passes torch)."""
  if _is_torch(audio):
    import torch  # pylint: disable=g-import-not-at-top
    return torch.from_numpy(np.ascontiguousarray(array)).to(audio.device)
  return array


def get_scene_embeddings(audio: Any, model: HearModel) -> Any:
  """[n, D] float32: one embedding per clip of `audio` [n, samples] at 16 kHz."""
  pooled, _, frames = _encode(audio, model)
  length = model.model_config.audio_length
  real = np.clip(frames - length * np.arange(pooled.shape[1]), 0, length).astype(np.float64)
  return _like(np.einsum("nwd,w->nd", pooled, real / real.sum()).astype(np.float32), audio)


def get_timestamp_embeddings(audio: Any, model: HearModel) -> tuple[Any, Any]:
  """([n, T, D] float32 embeddings, [n, T] float32 centre times in ms), one per 160 ms column."""
  _, column_tokens, frames = _encode(audio, model)
  patch = model.model_config.patch_size
  centres = ((patch * np.arange(math.ceil(frames / patch)) + (patch - 1) / 2)
             * fbank.FRAME_SHIFT_MS + fbank.FRAME_LENGTH_MS / 2)
  duration_ms = 1000.0 * np.shape(audio)[1] / sample_rate
  count = max(1, int(np.count_nonzero(centres <= duration_ms)))  # centres ascend
  # Audio shorter than the first column's centre: its one column holds all of it, centred at
  # the middle of the audio (HEAR's timestamps lie within the audio).
  centres = centres[:count] if centres[0] <= duration_ms else np.array([duration_ms / 2])
  timestamps = np.broadcast_to(centres, (column_tokens.shape[0], count)).astype(np.float32)
  return _like(column_tokens[:, :count], audio), _like(timestamps, audio)
