"""Features of clips on a mesh: per-clip embeddings to `.npz`, and audio <-> visual retrieval.

`run_on_mesh` is the one loop: host batches (from `eval.clips`, any batch size divisible by the
devices) become global arrays over the mesh, a jitted function returns replicated outputs, and
the rows of padding clips are dropped, so every clip counts once whatever the device count.

Embeddings (`embedding_fn`) are the encoder's unmasked token streams after the joint blocks
(`CAVMAE.streams`), mean-pooled over tokens:
  audio  [N, D]  audio-only stream (`norm_a`): the original's audio features and retrieval side
  video  [N, D]  video-only stream (`norm_v`): the other retrieval side
  (a single-modality MAE's one stream runs the joint LayerNorms, `norm`, which it trained)
  joint  [N, D]  audio+video stream (`norm`): what multimodal fine-tuning pools
and with `patches`, the unpooled tokens `audio_patches` [N, La, D] (row-major over the 8 x T/16
frequency x time grid), `video_patches` [N, Lv, D] and `joint_patches` [N, La + Lv, D]. A
fine-tuned model's encoder gives the same streams (its head is not used).

Retrieval (`retrieval`) uses the task's own 'features' predict function (what the retrieval
evaluator uses) and ranks on the device (`eval.ranking`): the original's Python double loop
takes tens of minutes for a few thousand clips; ranking 2,000 clips of 768-wide features in
both directions takes 0.15 s here on two CPU cores (0.65 s with compilation), so a retrieval
run costs what reading the clips and the encoder's forward pass cost.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from cav_mae_jax import models
from cav_mae_jax import tasks
from cav_mae_jax.eval import clips as clips_lib
from cav_mae_jax.eval import common
from cav_mae_jax.eval import ranking
from cav_mae_jax.train import mesh as mesh_lib

STREAMS = ("audio", "video", "joint")
PATCHES_SUFFIX = "_patches"


class NoClipsError(ValueError):
  """No clip was left to compute features of (every one failed to load, or none was given)."""


def run_on_mesh(fn: Callable[[Any, Mapping[str, jax.Array]], Mapping[str, jax.Array]],
                params: Any, batches: Iterable[clips_lib.HostBatch], mesh: jax.sharding.Mesh,
                input_keys: Sequence[str] = ("audio", "image")
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(clip ids, outputs) of `fn(params, batch)` over every valid clip, padding dropped.

  `fn` returns a dict of arrays with the batch as leading axis; host batches carry `valid` and
  `video_id` besides `input_keys`.
  """
  jitted = jax.jit(fn, out_shardings=mesh_lib.replicated(mesh))
  local_ids, valid_rows, outputs = [], [], {}

  def collect(result: Mapping[str, jax.Array], valid: np.ndarray) -> None:
    for name, value in result.items():
      outputs.setdefault(name, []).append(np.asarray(value)[valid])

  pending = None
  for batch in batches:
    valid = common.global_valid(batch["valid"])
    result = jitted(params, mesh_lib.global_batch({k: batch[k] for k in input_keys}, mesh))
    if pending is not None:  # fetched one batch late: the next batch's transfer overlaps
      collect(*pending)
    pending = (result, valid)
    local_ids.append(batch["video_id"])
    valid_rows.append(valid)
  if pending is not None:
    collect(*pending)
  if not valid_rows or not np.concatenate(valid_rows).any():
    raise NoClipsError("no clips to compute features of (every clip was padding or failed)")
  ids = clips_lib.global_ids(local_ids)[np.concatenate(valid_rows)]
  return ids, {name: _concatenate_releasing(values) for name, values in outputs.items()}


def _concatenate_releasing(chunks: list[np.ndarray]) -> np.ndarray:
  """`np.concatenate(chunks)` that lets go of each chunk once it is copied (it empties the list):
  the memory it needs is the result and one chunk, not the result twice (the tokens of 20k
  clips with `patches` are 87 GB for the base model)."""
  dtype = functools.reduce(np.promote_types, (chunk.dtype for chunk in chunks))
  result = np.empty((sum(len(chunk) for chunk in chunks),) + chunks[0].shape[1:], dtype)
  start = 0
  chunks.reverse()
  while chunks:
    chunk = chunks.pop()
    result[start:start + len(chunk)] = chunk
    start += len(chunk)
  return result


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, what: str = "batch_size") -> int:
  """`batch_size` if the devices and processes divide it; raises ValueError naming it as `what`
  (the flag or config field it came from)."""
  devices, processes = mesh.devices.size, jax.process_count()
  if batch_size <= 0 or batch_size % devices or batch_size % processes:
    raise ValueError(f"{what}={batch_size}: must be positive and divisible by the number "
                     f"of devices ({devices}) and processes ({processes}).")
  return batch_size


def embedding_fn(model_config: models.ModelConfig, *, finetune: bool = False,
                 patches: bool = False, streams: Sequence[str] = STREAMS
                 ) -> Callable[[Any, Mapping[str, jax.Array]], dict[str, jax.Array]]:
  """(params, batch) -> pooled embeddings (and tokens with `patches`) of the streams asked for.

  Only the inputs the streams need are read: `streams=('audio',)` runs the audio branch alone.
  """
  model = models.CAVMAEFT(model_config) if finetune else models.CAVMAE(model_config)
  unknown = sorted(set(streams) - set(STREAMS))
  if unknown:
    raise ValueError(f"unknown streams {unknown}; choose from {STREAMS}")
  need_audio = model_config.uses_audio and bool({"audio", "joint"} & set(streams))
  need_image = model_config.uses_video and bool({"video", "joint"} & set(streams))

  def embed(params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    tokens = model.apply({"params": params}, batch["audio"] if need_audio else None,
                         batch["image"] if need_image else None, joint="joint" in streams,
                         method="streams")
    out = {}
    for name in streams:
      if name in tokens:
        out[name] = tokens[name].mean(axis=1)
        if patches:
          out[name + PATCHES_SUFFIX] = tokens[name]
    return out

  return embed


def check_output(path: str, *, overwrite: bool = False,
                 inputs: Sequence[tuple[str, str | None]] = ()) -> None:
  """Raises FileExistsError if `path` exists (unless overwrite), OutputPathError if it is a
  directory or one of `inputs` ((flag, path)) or inside or around one; creates its parent
  folders (`io.check_output_path`, for a single output file)."""
  from cav_mae_jax.convert import io  # pylint: disable=g-import-not-at-top
  io.check_output_path(path, overwrite=overwrite, kind="file", inputs=inputs)


def write_npz(path: str, ids: np.ndarray, arrays: Mapping[str, np.ndarray], *,
              overwrite: bool = False) -> None:
  """Writes `ids` (unicode [N]) and the arrays [N, ...] to `path` (all or nothing; an existing
  `path` only with overwrite)."""
  from cav_mae_jax.convert import io  # pylint: disable=g-import-not-at-top
  with io.atomic_output(path, overwrite=overwrite) as staged:
    with open(staged, "wb") as f:
      np.savez(f, ids=np.asarray(ids, dtype=str), **arrays)


@dataclasses.dataclass
class Loaded:
  """A task, its mesh and its parameters placed over the mesh."""

  task: tasks.Task
  mesh: jax.sharding.Mesh
  params: Any
  step: int


def load(config: ml_collections.ConfigDict, *, workdir: str | None = None, step: int = 0,
         params_path: str | None = None, records_dir: str | None = None,
         also: dict[str, Any] | None = None) -> Loaded:
  """The config's task with parameters from a training workdir or a params checkpoint.

  A multi-process run's processes must agree on the config, `step`, `also` (a tool's own
  settings, e.g. {'--batch_size': 8}) and, where the tool reads records (`records_dir`, as
  `records_directory` takes it), what they hold: `run_config.check_same_on_every_process`."""
  from cav_mae_jax.train import evaluate  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import run_config  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import validation  # pylint: disable=g-import-not-at-top
  if not (workdir or params_path):
    raise ValueError("give a training workdir or a params checkpoint")
  validation.validate_config(config, jax.device_count(), jax.process_count(), check_data=False,
                             training=False)
  same = {"--step": step, **(also or {})}
  if records_dir is not None and jax.process_count() > 1:
    from cav_mae_jax.data import records as records_lib  # pylint: disable=g-import-not-at-top
    same["--records"] = run_config.shards_line(
        records_lib.open_records_dir(records_directory(config, records_dir)).shard_list())
  run_config.check_same_on_every_process(config, same)
  task = tasks.get_task(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  params, step = evaluate.load_params(task, mesh, workdir=workdir, step=step,
                                      params_path=params_path)
  evaluate.check_fbank_normalization(config, workdir or params_path)
  return Loaded(task, mesh, params, step)


def records_directory(config: ml_collections.ConfigDict, records: str = "") -> str:
  """`records`, else config.data.eval_dir, checked to be a complete records directory."""
  from cav_mae_jax.data import records as records_lib  # pylint: disable=g-import-not-at-top
  directory = records or config.data.eval_dir
  if not directory:
    raise ValueError("no records to read: give a records directory or set config.data.eval_dir")
  records_lib.open_records_dir(directory)
  return directory


def clip_batches(config: ml_collections.ConfigDict, batch_size: int, *, records_dir: str = "",
                 subset: Sequence[str] | None = None, videos: str = "",
                 on_error: Callable[[clips_lib.VideoClip, Exception], None] | None = None
                 ) -> Iterable[clips_lib.HostBatch]:
  """Batches of video files (`videos`: see `clips.list_videos`) or of records (default eval_dir)."""
  if videos:
    if subset is not None:
      raise ValueError("a subset list selects records; list the video files instead")
    return clips_lib.video_batches(clips_lib.list_videos(videos), config, batch_size,
                                   on_error=on_error or _raise)
  return clips_lib.record_batches(config, batch_size, video_ids=subset,
                                  directory=records_directory(config, records_dir))


def _raise(clip: clips_lib.VideoClip, error: Exception) -> None:
  raise error


def extract_embeddings(loaded: Loaded, batches: Iterable[clips_lib.HostBatch], *,
                       patches: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(ids, {'audio', 'video', 'joint'[, '<stream>_patches']}) of every valid clip."""
  fn = embedding_fn(loaded.task.model_config, finetune=loaded.task.finetune, patches=patches)
  return run_on_mesh(fn, loaded.params, batches, loaded.mesh)


@dataclasses.dataclass
class RetrievalResult:
  """Retrieval metrics of a set of clips and the seconds each part took."""

  ids: np.ndarray
  metrics: dict[str, float]
  feature_seconds: float
  ranking_seconds: float


def retrieval(loaded: Loaded, batches: Iterable[clips_lib.HostBatch]) -> RetrievalResult:
  """Audio <-> visual recall@1/5/10 and median rank of the clips, from the task's 'features'."""
  if "features" not in loaded.task.predict_fns:
    modalities = loaded.task.model_config.modalities
    if modalities != "audiovisual":
      from cav_mae_jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
      raise ValueError(eval_lib.single_modality(modalities))
    raise ValueError(f"task {loaded.task.name!r} has no 'features' function for retrieval")
  features = loaded.task.predict_fns["features"]
  start = time.perf_counter()
  ids, out = run_on_mesh(lambda p, b: dict(zip(("audio", "video"), features(p, b))),
                         loaded.params, batches, loaded.mesh)
  middle = time.perf_counter()
  if len(ids) < 2:
    raise ValueError(f"retrieval needs at least 2 clips, got {len(ids)}")
  metrics = ranking.audio_visual_retrieval(out["audio"], out["video"])
  return RetrievalResult(ids, metrics, middle - start, time.perf_counter() - middle)

