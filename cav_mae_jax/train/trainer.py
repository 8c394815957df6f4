"""The training loop of every task, read top to bottom: setup, data, task and optimizer, init or
restore, the update function, evaluators, loop.

The same code runs on one CPU, on 8 fake CPU devices and on many hosts: every process runs this
function; batches are host-local numpy dicts assembled into global arrays over the mesh. What is
trained comes from the task (`cav_mae_jax.tasks`), what is measured from the evaluators
(`cav_mae_jax.eval`); this file knows neither a model nor a loss.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np

from cav_mae_jax import dir_lock
from cav_mae_jax import eval as eval_lib
from cav_mae_jax import signals_held
from cav_mae_jax import tasks
from cav_mae_jax.train import checkpoint as checkpoint_lib
from cav_mae_jax.train import device_augment
from cav_mae_jax.train import flops as flops_lib
from cav_mae_jax.train import mesh as mesh_lib
from cav_mae_jax.train import metrics as metrics_lib
from cav_mae_jax.train import optim
from cav_mae_jax.train import peers
from cav_mae_jax.train import run_config
from cav_mae_jax.train import step as step_lib
from cav_mae_jax.train import validation

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class Preempted(Exception):
  """The run stopped early at a preemption notice (SIGTERM) after saving `step`
  (`train_and_evaluate(..., raise_on_preemption=True)`)."""

  def __init__(self, step: int, summary: dict[str, float]):
    super().__init__(f"preempted: step {step} is saved")
    self.step, self.summary = step, summary


class TrainInput(Protocol):
  """Host-local batches plus a JSON-serializable position (the tf.data pipeline's interface)."""

  def __next__(self) -> dict[str, np.ndarray]: ...
  def get_state(self) -> dict[str, Any]: ...
  def set_state(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass
class Inputs:
  """What the loop consumes: train batches, evaluation passes (None: the records) and the epoch
  size."""
  train: TrainInput
  eval_batches: eval_lib.common.BatchSource | None
  train_examples: int
  # The training records' shards, [file, clips] each (the input order follows them); a run
  # resumes only with the same (None: inputs not read from records, not checked).
  train_shards: list[list[Any]] | None = None


def records_inputs(config: ml_collections.ConfigDict) -> Inputs:
  """The tf.data pipeline over the training split, records or TFDS (imports TensorFlow)."""
  from cav_mae_jax.data import input as input_lib  # pylint: disable=g-import-not-at-top
  train_index = input_lib.open_split(config, "train").index
  return Inputs(train=input_lib.InputPipeline(config, "train", seed=config.seed),
                eval_batches=None, train_examples=train_index.num_examples,
                train_shards=train_index.shard_list())


def resolve_total_steps(config: ml_collections.ConfigDict, train_examples: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps) from the records' example count and the config duration."""
  steps_per_epoch = train_examples // config.data.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"config.data.batch_size={config.data.batch_size} exceeds the "
                     f"{train_examples} training examples.")
  if config.total_steps is not None:
    return steps_per_epoch, int(config.total_steps)
  return steps_per_epoch, int(math.ceil(config.total_epochs * steps_per_epoch))


def averaging_beyond_run(config: ml_collections.ConfigDict, steps_per_epoch: int,
                         total_steps: int) -> str:
  """Why tools/average.py would find no checkpoint of some epochs it averages by default (the
  run keeps epoch-end checkpoints but ends before them: a shortened recipe, say); '' when the
  run reaches them or keeps none."""
  section = config.get("finetune")
  if section is None or not config.checkpoint.every_epoch:
    return ""
  epochs = total_steps // steps_per_epoch
  if section.average_last_epoch <= epochs:
    return ""
  return (f"config.finetune.average_last_epoch={section.average_last_epoch}: this run ends "
          f"after {epochs} whole epoch(s), so tools/average.py will not find the checkpoints "
          f"of epochs {max(section.average_first_epoch, epochs + 1)}-"
          f"{section.average_last_epoch} that it averages by default (give --first_epoch / "
          "--last_epoch then, or set the fields).")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       inputs: Inputs | None = None, *,
                       raise_on_preemption: bool = False) -> dict[str, float]:
  """Trains `config.task` (resuming from the latest checkpoint in workdir); returns the last
  metrics.

  A preemption notice (SIGTERM) saves a checkpoint and stops the run early: it returns the last
  logged metrics as a finished run does, or, with `raise_on_preemption`, raises `Preempted` (so
  that a job script can tell a run cut short from a finished one). Where the run has several
  processes, one's failure ends the others at once (`train.peers`).
  """
  peers.start()
  try:
    return _train_and_evaluate(config, workdir, inputs, raise_on_preemption)
  except Exception as error:  # pylint: disable=broad-except
    if not isinstance(error, Preempted):  # every process stopped at the notice, none failed
      peers.report(error)
    raise


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, inputs: Inputs | None,
                        raise_on_preemption: bool) -> dict[str, float]:
  # ---------------------------------------------------------------- setup
  _check_local_workdir(workdir)
  validation.validate_config(config, jax.device_count(), jax.process_count(),
                             check_data=inputs is None)
  task = tasks.get_task(config)
  eval_lib.validate_evals(config, task.predict_fns, jax.device_count(), jax.process_count())
  run_config.check_same_on_every_process(config)
  is_main = jax.process_index() == 0
  _check_workdir_holds_no_data(config, workdir)
  made = dir_lock.make_output_dir(workdir, "workdir")
  if not is_main:
    return _train(config, workdir, inputs, task, is_main, raise_on_preemption)
  with dir_lock.DirLock(workdir) as lock:  # one run per workdir (the main process's)
    note = dir_lock.describe_previous(lock.previous_holder)
    if note:
      print(note)
    try:
      return _train(config, workdir, inputs, task, is_main, raise_on_preemption)
    except BaseException:
      if made:  # failed before writing anything: leave no empty workdir behind
        lock.remove_unused_directory()
      raise


def _check_same_plan(workdir: str, steps_per_epoch: int, train_examples: int,
                     train_shards: list[list[Any]] | None) -> None:
  """A resumed run keeps its plan (plan.json; a workdir from before it is not checked).

  Its epochs: its epoch-end checkpoints, epoch-based schedule and evaluations, and input
  position are at multiples of the steps per epoch it planned. (A changed batch size is refused
  by `run_config.check_resume`; another set of training clips re-planned the epochs without a
  word, and tools/average.py then misread the checkpoints.) And its training shards: its input
  position counts batches in their order (records rebuilt with other shards hold the same clips
  in another order, and the epoch under way would see clips twice and others not at all)."""
  plan = run_config.read_plan(workdir)
  if plan and plan["steps_per_epoch"] != steps_per_epoch:
    raise ValueError(
        f"workdir {workdir}: the run has {plan['steps_per_epoch']} steps per epoch, this config "
        f"{steps_per_epoch} ({train_examples} training clips): its epoch-end checkpoints, "
        "schedule and input position follow its epochs, so it resumes with its own training "
        "clips (or a new workdir starts from its parameters: --config.init.source=workdir "
        "--config.init.path=<workdir>)")
  planned = plan.get("train_shards")
  if planned is None or train_shards is None or planned == train_shards:
    return
  raise ValueError(
      f"workdir {workdir}: the run read {run_config.shards_line(planned)}, config.data's "
      f"training records are {run_config.shards_line(train_shards)}: its input position "
      "counts batches in its own shards' order, so it resumes with its own training records "
      "(or a new workdir starts from its parameters: --config.init.source=workdir "
      "--config.init.path=<workdir>)")


def _check_local_workdir(workdir: str) -> None:
  """A workdir is a directory of the local file system (one every host sees). A URL (gs://...)
  made a local folder `gs:` beside the command's current directory for the lock, config and
  logs, while orbax wrote the checkpoints to the bucket: two halves of one run."""
  scheme, sep, _ = workdir.partition("://")
  if sep:
    raise ValueError(
        f"workdir {workdir}: must be a local path (a shared file system every host sees, or the "
        f"bucket mounted, e.g. with gcsfuse); the run's lock, config and logs are written with "
        f"local file calls. Records may stay on {scheme}://")


def _check_workdir_holds_no_data(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir is the run's own: not a records directory (the run's checkpoints, metrics and
  config would be written among its shards), named by a data field or not."""
  data = [(f"config.data.{split}_dir", config.data.get(f"{split}_dir", ""))
          for split in ("train", "eval")]
  data += [(f"config.evals.{name}.dir", entry.get("dir", ""))
           for name, entry in (config.get("evals") or {}).items()]
  for field, directory in data:
    if directory and os.path.realpath(directory) == os.path.realpath(workdir):
      raise ValueError(f"workdir {workdir}: is the records directory {field}; a run writes its "
                       "checkpoints, metrics and config in a directory of its own")
  # records.INDEX_FILE, spelled out: the trainer imports no TensorFlow (records does).
  if os.path.isfile(os.path.join(workdir, "index.json")):
    raise ValueError(f"workdir {workdir}: is a records directory (it holds index.json); a run "
                     "writes its checkpoints, metrics and config in a directory of its own")


def _train(config: ml_collections.ConfigDict, workdir: str, inputs: Inputs | None,
           task: tasks.Task, is_main: bool, raise_on_preemption: bool) -> dict[str, float]:
  """train_and_evaluate after the config checks, with the workdir made (and locked)."""
  mesh = mesh_lib.make_mesh(config.mesh)
  logger.info("Mesh %s over %d devices, %d processes.", dict(mesh.shape), jax.device_count(),
              jax.process_count())

  rng = jax.random.PRNGKey(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  # ---------------------------------------------------------------- starting weights
  # Read and mapped before the input pipeline is built (which imports TensorFlow and opens the
  # records), so that a source that does not fit the model fails fast, naming what differs.
  host_init_params = None
  if config.init.source and checkpoint_lib.latest_saved_step(workdir) is None:
    host_init_params = _read_init_params(config, task, init_rng, workdir, is_main)

  # ---------------------------------------------------------------- data
  inputs = inputs or records_inputs(config)
  if inputs.train_shards is not None:  # each reads its share of them: the same on every process
    run_config.check_same_on_every_process(
        config, {"config.data's training records": run_config.shards_line(inputs.train_shards)})
  steps_per_epoch, total_steps = resolve_total_steps(config, inputs.train_examples)
  optim.check_schedule(config, steps_per_epoch, total_steps)
  logger.info("%d steps (%d per epoch of %d examples).", total_steps, steps_per_epoch,
              inputs.train_examples)
  averaging = averaging_beyond_run(config, steps_per_epoch, total_steps)
  if averaging and is_main:
    logger.warning("%s", averaging)

  # ---------------------------------------------------------------- workdir: resume or start
  checkpointer = checkpoint_lib.Checkpointer(checkpoint_lib.workdir_checkpoints(workdir),
                                             config.checkpoint, steps_per_epoch)
  start_step = checkpointer.latest_step() or 0
  if start_step:
    changes = run_config.check_resume(run_config.read_run_config(workdir), config,
                                      step_lib.abstract_state_of)
    _check_same_plan(workdir, steps_per_epoch, inputs.train_examples, inputs.train_shards)
    if changes and is_main:
      print(f"resuming step {start_step} with changed fields: {run_config.describe(changes)}")
  # The evaluations due at the checkpointed step run again if the interrupted run did not log
  # them (it saves a step's checkpoint, then evaluates): a finished run's final ones included.
  evaluation_missing = bool(start_step) and bool(config.evals) and not (
      mesh_lib.process_zero_value(is_main and metrics_lib.evaluation_logged(workdir, start_step)))
  if start_step > total_steps or (start_step == total_steps and not evaluation_missing):
    checkpointer.close()
    if is_main:
      print(f"{workdir}: finished: step {start_step} of {total_steps} is checkpointed; "
            "nothing to do (raise config.total_steps or total_epochs to continue).")
    return metrics_lib.last_scalars(workdir)
  taken, removed = checkpointer.settle_epoch_params()
  if removed and is_main:
    print(f"{checkpoint_lib.EPOCH_PARAMS_DIR}/: removed the params of step(s) "
          f"{', '.join(map(str, removed))}, after the resume point (step {start_step}): this "
          "run trains them again")
  if taken and is_main:
    print(f"{checkpoint_lib.EPOCH_PARAMS_DIR}/: the params of epoch-end step(s) "
          f"{', '.join(map(str, taken))}, taken from their full states (checkpoints/ keeps the "
          f"newest {config.checkpoint.keep} from this run's next save on)")

  # ---------------------------------------------------------------- task and optimizer
  schedule, tx = optim.for_task(config, task, steps_per_epoch, total_steps)

  # ---------------------------------------------------------------- init or restore
  train_rng = jax.device_put(train_rng, mesh_lib.replicated(mesh))
  abstract_state = step_lib.abstract_train_state(task, tx, mesh)
  shardings = step_lib.shardings_of(abstract_state)
  if start_step:  # restored straight into its shardings; nothing is initialized
    restored, input_state = checkpointer.restore(
        start_step, {"state": abstract_state, "rng": _abstract_like(train_rng)})
    state, train_rng = restored["state"], restored["rng"]
    inputs.train.set_state(input_state)
    if is_main:
      print(f"resumed from step {start_step} in {workdir}")
  else:
    params = None
    if config.init.source:
      if host_init_params is None:  # a checkpoint seen at first was gone when resuming
        host_init_params = _read_init_params(config, task, init_rng, workdir, is_main)
      params = mesh_lib.host_to_global(host_init_params, shardings.params)
      del host_init_params
    elif task.finetune and is_main:  # as the original's run_cavmae_ft.py, which warns too
      print(f"note: {task.name} starts from random weights (config.init.source is ''); the "
            "paper's start is a pretrained model: --config.init.source=workdir|params|cavmae "
            "--config.init.path=...")
    state, _ = step_lib.create_train_state(task, tx, mesh, init_rng, params)
  # The run's record, once its state is there: a resume refused at its restore (a damaged
  # checkpoint, another process count) leaves the workdir as it was.
  if is_main:
    run_config.write_run_config(workdir, config, steps_per_epoch=steps_per_epoch,
                                train_shards=inputs.train_shards)
    # Records an interrupted run logged after its last checkpoint are logged again from there.
    metrics_lib.rewind(workdir, start_step)
  writer = metrics_lib.make_writer(workdir, is_main, config.tensorboard)
  if not start_step:
    writer.write_hparams(config.to_dict())

  # ---------------------------------------------------------------- update function
  train_step = step_lib.make_train_step(
      task, tx, schedule, mesh, shardings,
      device_augment=device_augment.make_device_augment(config.data))

  # ---------------------------------------------------------------- evaluators
  evaluators = eval_lib.build_evaluators(config, task.predict_fns, mesh, inputs.eval_batches)

  def evaluate(step: int, params: Any) -> dict[str, float]:
    results = {}
    for evaluator in evaluators:
      if evaluator.due(step, total_steps, steps_per_epoch):
        results.update(evaluator.run(params))
    if results:
      writer.write_scalars(step, results)
      writer.flush()
    return results

  # ---------------------------------------------------------------- loop
  preemption = checkpoint_lib.PreemptionWatcher(checkpointer)
  progress = metrics_lib.ProgressBar(total_steps, start_step, enabled=is_main)
  pending: list[tuple[int, dict[str, jax.Array]]] = []  # dispatched, not yet checked on host
  logged: list[dict[str, float]] = []
  summary: dict[str, float] = {}
  preempted = False
  if start_step == 0:  # the initialization's baseline
    evaluate(0, state.params)
  elif evaluation_missing and any(e.due(start_step, total_steps, steps_per_epoch)
                                  for e in evaluators):
    if is_main:
      print(f"evaluating step {start_step}: the interrupted run saved it but did not log its "
            "evaluation")
    evaluate(start_step, state.params)
  last_log_time, last_log_step = time.monotonic(), start_step
  timed_from = start_step  # the step the time since last_log_time counts from
  window = metrics_lib.read_log_window(workdir, start_step) if start_step and is_main else None
  if window is not None:  # the steps after the last row, logged by the next row as without a stop
    last_log_step, logged[:] = window

  def check(upto_step: int) -> None:
    """Fetches metrics of steps <= upto_step; stops the run on a non-finite loss."""
    while pending and pending[0][0] <= upto_step:
      step, device_metrics = pending.pop(0)
      host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      if not math.isfinite(host["loss"]):
        checkpointer.wait()
        last = checkpointer.latest_step()
        raise NonFiniteLossError(
            f"Non-finite loss {host['loss']} at step {step}; stopping. " + (
                f"The last good checkpoint is step {last} in {checkpointer.manager.directory}."
                if last is not None else "No checkpoint was saved before it."))
      logged.append(host)

  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = mesh_lib.global_batch(next(inputs.train), mesh)
      state, device_metrics = train_step(state, batch, train_rng)
      pending.append((step, device_metrics))
      check(step - 1)  # one step behind, so dispatch runs ahead of the host

      final = step == total_steps
      preempted = preemption.preempted(step)
      if final:
        preemption.last_step_taken()
      # A stop for preemption logs no row off the cadence: its steps' metrics are saved with
      # its checkpoint, and the resumed run's next row covers them as an uninterrupted run's.
      if step % config.log_every_steps == 0 or final:
        check(step)
        now = time.monotonic()
        summary = _mean(logged)
        summary["lr"] = logged[-1]["lr"]  # the rate of the logged step, not a window mean
        logged.clear()
        seconds_per_step = (now - last_log_time) / (step - timed_from)
        summary["step_time_s"] = seconds_per_step
        summary["samples_per_s"] = config.data.batch_size / seconds_per_step
        summary["epoch"] = step / steps_per_epoch
        mfu = flops_lib.mfu(summary["samples_per_s"], task.step_flops,
                            jax.devices()[0].device_kind, jax.device_count())
        if mfu is not None:
          summary["mfu"] = mfu
        writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
        writer.flush()
        progress.update(step, {k: summary[k] for k in ("loss", "lr") if k in summary})
        last_log_time, last_log_step, timed_from = now, step, step
        checkpointer.check_for_errors()  # a failed save (a disk full) stops the run here
      if checkpointer.should_save(step) or final or preempted:
        check(step)
        writer.flush()  # the metrics of every step up to this checkpoint are on disk first
        if is_main:
          metrics_lib.save_log_window(workdir, step, last_log_step, logged)
        checkpointer.save(step, {"state": state, "rng": train_rng}, inputs.train.get_state(),
                          params=state.params)
      eval_metrics = evaluate(step, state.params)
      if eval_metrics:
        summary.update(eval_metrics)
        # Eval time is not train step time: the next row times the steps after this one.
        last_log_time, timed_from = time.monotonic(), step
      if preempted and not final:
        logger.warning("Preempted: saved step %d; stopping.", step)
        break
  finally:
    progress.close()
    preemption.restore_handler()
    with signals_held.held("the checkpoint being written"):  # a save under way is finished
      checkpointer.close()
    writer.flush()
    writer.close()
  if preempted and raise_on_preemption and step != total_steps:  # the last step: a finished run
    raise Preempted(step, summary)
  if start_step == total_steps:  # a finished run's missing final evaluation, now logged
    return metrics_lib.last_scalars(workdir)
  return summary


def _read_init_params(config: ml_collections.ConfigDict, task: tasks.Task, init_rng: jax.Array,
                      workdir: str, is_main: bool) -> Any:
  """`config.init`'s parameters mapped onto the task's model, on the host (NumPy); the report
  goes to the workdir."""
  from cav_mae_jax.convert import init_source  # pylint: disable=g-import-not-at-top
  init_params = jax.tree.map(np.asarray, jax.jit(task.init_params)(init_rng))
  params, report = init_source.load_init_params(config.init, task.model_config,
                                                finetune=task.finetune, init_params=init_params)
  if is_main:
    print(init_source.write_report(workdir, config.init, report), end="")
  return params


def _abstract_like(x: jax.Array) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _mean(records: list[dict[str, float]]) -> dict[str, float]:
  if not records:
    return {}
  return {k: float(np.mean([r[k] for r in records])) for k in records[0]}
