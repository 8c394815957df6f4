"""Evaluation without training: any configured evaluator on any checkpoint.

The parameters come from a training workdir (checkpoint `step`, 0 = the latest) or from a
params checkpoint written by tools/convert.py; they must fit the config's task exactly (a
mismatch names the parameters, and says why where it can: a pretraining model for a
classifier's task or the reverse, or the fields of the checkpoint's stored model config that
give other shapes than the config's). Results go to the workdir's metric writers when there is
one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from cav_mae_jax import eval as eval_lib
from cav_mae_jax import models
from cav_mae_jax import tasks
from cav_mae_jax.train import checkpoint as checkpoint_lib
from cav_mae_jax.train import mesh as mesh_lib
from cav_mae_jax.train import metrics as metrics_lib
from cav_mae_jax.train import run_config
from cav_mae_jax.train import validation


def load_params(task: tasks.Task, mesh: jax.sharding.Mesh, *, workdir: str | None = None,
                step: int = 0, params_path: str | None = None) -> tuple[Any, int]:
  """(params placed over the mesh, step) from a workdir or a params checkpoint."""
  from cav_mae_jax.convert import io  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.convert import state_dict as sd  # pylint: disable=g-import-not-at-top
  if params_path and step:  # for callers other than the tools (cli.define_model_flags refuses it)
    raise ValueError(f"--step={step}: picks one of the checkpoints of --workdir; --params names "
                     "a single one")
  check_checkpoint_kind(workdir=workdir, params_path=params_path)
  if workdir:
    host_params, step = checkpoint_lib.read_workdir_params(workdir, step)
    source = f"{workdir} step {step}"
  else:
    host_params, step, source = io.load_params(params_path), 0, params_path
  from cav_mae_jax.convert import init_source  # pylint: disable=g-import-not-at-top
  init_source.check_architecture("workdir" if workdir else "params", workdir or params_path,
                                task.model_config, finetune=task.finetune)
  abstract = task.param_shapes()
  try:
    params, report = sd.match_to_target(host_params, abstract)
  except sd.ParamsMismatchError as e:
    why = _why_shapes_differ(workdir or params_path, task, host_params)
    raise sd.ParamsMismatchError(f"{source}: {why + '; ' if why else ''}{e}") from None
  if report.unexpected:
    raise sd.ParamsMismatchError(f"{source}: parameters the {task.name} model does not have: "
                                 f"{', '.join(report.unexpected[:10])}")
  shardings = mesh_lib.tree_shardings(mesh, abstract)
  return mesh_lib.host_to_global(params, shardings), step


def check_checkpoint_kind(*, workdir: str | None = None, params_path: str | None = None) -> None:
  """Raises FileNotFoundError naming --workdir or --params when the path is not of that kind:
  the other kind is named with the flag that reads it, anything else (a records directory)
  is said to be neither; orbax's own words name only a file it missed."""
  from cav_mae_jax.convert import init_source  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.convert import io  # pylint: disable=g-import-not-at-top
  workdir, params_path = ([p if p and "://" not in p else None for p in (workdir, params_path)])
  if workdir and not checkpoint_lib.is_workdir(workdir):
    if io.holds_params(workdir):
      raise FileNotFoundError(f"--workdir: {workdir} is a params checkpoint, not a training "
                              f"workdir; give it as --params={workdir}")
    raise FileNotFoundError(f"--workdir: {workdir}: not a training workdir (no "
                            f"{checkpoint_lib.CHECKPOINT_DIR}/ inside)")
  if params_path and not io.holds_params(params_path):
    if checkpoint_lib.is_workdir(params_path):
      raise FileNotFoundError(f"--params: {params_path} is a training workdir, not a params "
                              f"checkpoint; give it as --workdir={params_path}")
    try:
      init_source.check_params_source(params_path)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"--params: {e}") from None


def _why_shapes_differ(path: str, task: tasks.Task, host_params: Any) -> str:
  """Why a checkpoint does not fit `task`, from what it holds and the model config stored with
  it: a pretraining model where a classifier is expected (or the reverse), or the stored
  config's fields that alone give other parameter shapes; '' when none is found."""
  from cav_mae_jax.convert import init_source  # pylint: disable=g-import-not-at-top
  has_head = any(name.startswith("mlp_head") for name in host_params)
  finetune = task.finetune
  if has_head != finetune:
    return (f"the checkpoint is a {'fine-tuned' if has_head else 'pretraining'} model, the "
            f"config's task is {task.name!r}")
  try:
    stored = init_source.read_model_config(path)
  except (OSError, ValueError):
    return ""
  ours = dataclasses.asdict(task.model_config)
  baseline = models.param_shapes(task.model_config, finetune=finetune)
  culprits = []
  for field, value in sorted(stored.items()):
    if field not in ours or ours[field] == value:
      continue
    try:
      shapes = models.param_shapes(dataclasses.replace(task.model_config, **{field: value}),
                                   finetune=finetune)
    except (ValueError, TypeError):
      shapes = None  # not valid alone: it goes with another difference
    if shapes != baseline:
      culprits.append(f"{field}={value!r} where the config has {ours[field]!r}")
  return f"the checkpoint's model config has {', '.join(culprits)}" if culprits else ""


def check_ft_mode(model_config: models.ModelConfig, path: str) -> None:
  """Refuses to score a fine-tuned checkpoint through another `ft_mode` than it was trained in.

  Every mode has the same parameters, so nothing else would notice: an audio-only model read
  as multimodal runs its untrained joint-stream norms and scores silently worse. The checkpoint's
  stored model config (a workdir's config.json, a params checkpoint's model_config.json) says
  the mode; a checkpoint without one is not checked. Scoring in another mode on purpose (e.g. a
  multimodal model with the audio missing) is what `config.evals.<name>.mode` is for.
  """
  from cav_mae_jax.convert import init_source  # pylint: disable=g-import-not-at-top
  mode = init_source.stored_model_field(path, "ft_mode")
  if mode is not None and mode != model_config.ft_mode:
    raise ValueError(
        f"{path}: the model was fine-tuned with config.model.ft_mode={mode!r}, the config has "
        f"{model_config.ft_mode!r}; evaluate it with --config.model.ft_mode={mode} (e.g. "
        f"configs/finetune.py:<recipe>,mode={mode}), or set config.evals.<name>.mode to score "
        "it in another mode on purpose.")


def _normalization_of(data: Any) -> tuple[Any, ...]:
  """What fixes a run's fbank normalization: the fixed numbers, or 'index' (the training
  split's own statistics; which split is not compared, its directory may have moved)."""
  from cav_mae_jax.convert import init_source  # pylint: disable=g-import-not-at-top
  settings = init_source.normalization_settings(data)
  if settings["fbank_stats"] == "index":
    return ("index",)
  return ("fixed", settings["fbank_mean"], settings["fbank_std"])


def check_fbank_normalization(config: ml_collections.ConfigDict, path: str) -> None:
  """Refuses to feed a model fbanks normalized otherwise than its run's were.

  The evaluating config's `data` section decides the normalization; a run trained with
  fbank_stats='index' (or other fixed numbers) and scored with a recipe's defaults would see
  inputs shifted and scaled against its training, silently. `path` is a training workdir (its
  config.json) or a params checkpoint (what tools/average.py or the eval export recorded); one
  that says nothing (e.g. converted from PyTorch) is not checked.
  """
  from cav_mae_jax.convert import init_source  # pylint: disable=g-import-not-at-top
  recorded = init_source.read_fbank_normalization(path)
  if recorded is None:
    return
  run, ours = _normalization_of(recorded), _normalization_of(config.data)
  if run != ours:
    show = lambda n: ("fbank_stats='index'" if n[0] == "index" else
                      f"fbank_stats='fixed', fbank_mean={n[1]}, fbank_std={n[2]}")
    flags = ("--config.data.fbank_stats=index" if run[0] == "index" else
             f"--config.data.fbank_stats=fixed --config.data.fbank_mean={run[1]} "
             f"--config.data.fbank_std={run[2]}")
    raise ValueError(f"{path}: the run normalized fbanks with {show(run)}, the config with "
                     f"{show(ours)}; evaluate with the run's normalization: {flags}")


# Evaluator fields that say when and in what batches it runs, not what it measures.
_SCHEDULING_FIELDS = ("every_steps", "every_epochs", "at_start", "batch_size")


def record_names(config: ml_collections.ConfigDict, recorded: ml_collections.ConfigDict | None,
                 names: list[str]) -> dict[str, str]:
  """{evaluator: the name its results get in the workdir's records}:
  `metrics.EVALUATE_TOOL_PREFIX` + name (apart from the run's own series, which an evaluation
  under an evaluator's name would otherwise continue as if the run had measured it),
  with '@' and the settings that differ from the run's recorded config (`recorded`) when any
  do (its entry's fields, and the data fields that choose its clips and frame), e.g.
  `evaluate/val@mode=missingaudioonly`: evaluations with other settings (another mode, frame
  handling or set of clips) get series of their own, told apart by their names."""
  changed = run_config.changed_fields(recorded, config) if recorded is not None else {}
  recorded_evals = (recorded.get("evals") or {}) if recorded is not None else {}
  result = {}
  for name in names:
    split = config.evals[name].split
    data_fields = (f"{split}_dir", "tfds_name", "tfds_data_dir", f"tfds_{split}_split",
                   "eval_frame")
    if recorded is not None and name not in recorded_evals:
      settings = ["added"]  # an evaluator the run did not have
    else:
      settings = [f"{key.rsplit('.', 1)[1]}={_short(new)}" for key, (old, new) in changed.items()
                  if ((key.startswith(f"evals.{name}.")
                       and key.rsplit(".", 1)[1] not in _SCHEDULING_FIELDS)
                      or key in {f"data.{field}" for field in data_fields})
                  and not _same_path(old, new)]
    result[name] = (metrics_lib.EVALUATE_TOOL_PREFIX + name
                    + (f"@{','.join(settings)}" if settings else ""))
  return result


def _evaluated_clips(config: ml_collections.ConfigDict,
                    names: list[str] | None) -> dict[str, str]:
  """{"config.evals.<name>'s clips": `run_config.shards_line`} of the evaluators that run: the
  processes of a run read shares of the same shards (paths may differ: a host's own copy)."""
  from cav_mae_jax.data import dataset  # pylint: disable=g-import-not-at-top
  data_config = dataset.DataConfig.from_config(config)
  return {f"config.evals.{name}'s clips": run_config.shards_line(
              dataset.open_evaluator_split(data_config, name, entry).index.shard_list())
          for name, entry in config.evals.items() if names is None or name in names}


def _same_path(old: Any, new: Any) -> bool:
  """Whether two setting values name one folder ('/x/eval' and '/x/eval/')."""
  return (isinstance(old, str) and isinstance(new, str) and "/" in old + new
          and os.path.normpath(old) == os.path.normpath(new))


def _short(value: Any) -> str:
  """A setting's value in a series name: a path by its last component."""
  if isinstance(value, str) and "/" in value.rstrip("/"):
    return value.rstrip("/").rsplit("/", 1)[1]
  return str(value)


def evaluate(
    config: ml_collections.ConfigDict, *, workdir: str | None = None, step: int = 0,
    params_path: str | None = None, names: list[str] | None = None,
    batch_source: eval_lib.common.BatchSource | None = None) -> tuple[int, dict[str, float]]:
  """Runs the evaluators of `config.evals` (or `names`); returns (step, metrics).

  With a `workdir`, the metrics are also appended to its metrics.jsonl at the checkpoint's step,
  named `evaluate/` + name (e.g. `evaluate/val/mAP`), with the settings that differ from the
  run's after an '@' (`record_names`: e.g. `evaluate/val@mode=missingaudioonly/mAP`).
  """
  validation.validate_config(config, jax.device_count(), jax.process_count(),
                             check_data=batch_source is None, training=False)
  task = tasks.get_task(config)
  eval_lib.validate_evals(config, task.predict_fns, jax.device_count(), jax.process_count())
  same = {"--step": step, "--evals": names}
  if batch_source is None and jax.process_count() > 1:
    same.update(_evaluated_clips(config, names))
  run_config.check_same_on_every_process(config, same)
  unknown = sorted(set(names or ()) - set(config.evals.keys()))
  if unknown:
    raise ValueError(f"--evals: {unknown} not in config.evals (have {sorted(config.evals)})")
  if not (workdir or params_path):
    raise ValueError("give a training workdir or a params checkpoint to evaluate")
  mesh = mesh_lib.make_mesh(config.mesh)
  params, step = load_params(task, mesh, workdir=workdir, step=step, params_path=params_path)
  if task.finetune:
    check_ft_mode(task.model_config, workdir or params_path)
  check_fbank_normalization(config, workdir or params_path)
  results: dict[str, float] = {}
  for evaluator in eval_lib.build_evaluators(config, task.predict_fns, mesh, batch_source, names):
    results.update(evaluator.run(params))
  if workdir:
    named = {tuple(name.split("/", 1)): value for name, value in results.items()}
    recorded_as = record_names(config, run_config.read_run_config(workdir),
                               sorted({evaluator for evaluator, _ in named}))
    with metrics_lib.appending(workdir, jax.process_index() == 0,
                               config.tensorboard) as writer:
      writer.write_scalars(step, {f"{recorded_as[evaluator]}/{metric}": value
                                  for (evaluator, metric), value in named.items()})
  return step, results
