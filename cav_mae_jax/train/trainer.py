"""CAV-MAE pretraining loop, read top to bottom: setup, data, model and optimizer, init or
restore, compiled steps, evaluators, loop.

The same code runs on one CPU, on 8 fake CPU devices and on many hosts: every process runs this
function; batches are host-local numpy dicts assembled into global arrays over the mesh.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable, Iterable, Iterator, Protocol

import jax
import ml_collections
import numpy as np

from cav_mae_jax import models
from cav_mae_jax.eval.retrieval import RetrievalEvaluator
from cav_mae_jax.models.cav_mae import CAVMAE
from cav_mae_jax.train import checkpoint as checkpoint_lib
from cav_mae_jax.train import flops as flops_lib
from cav_mae_jax.train import mesh as mesh_lib
from cav_mae_jax.train import metrics as metrics_lib
from cav_mae_jax.train import optim
from cav_mae_jax.train import step as step_lib
from cav_mae_jax.train import validation

CHECKPOINT_DIR = "checkpoints"
EVAL_MASK_SEED = 1234  # fixed masks for eval losses, so evals at different steps compare


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class TrainInput(Protocol):
  """Host-local batches plus a JSON-serializable position (the tf.data pipeline's interface)."""

  def __next__(self) -> dict[str, np.ndarray]: ...
  def get_state(self) -> dict[str, Any]: ...
  def set_state(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass
class Inputs:
  """What the loop consumes: a train iterator, a fresh-eval-pass factory and the epoch size."""
  train: TrainInput
  eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]] | None
  train_examples: int


def records_inputs(config: ml_collections.ConfigDict) -> Inputs:
  """The tf.data pipelines over `config.data.train_dir` / `eval_dir` (imports TensorFlow)."""
  from cav_mae_jax.data import input as input_lib  # pylint: disable=g-import-not-at-top
  train_index = validation.read_records_index(config.data.train_dir, "data.train_dir")
  eval_batches = None
  if config.eval.every_steps > 0:
    eval_batches = lambda: input_lib.InputPipeline(config, "eval", seed=config.seed,
                                                   batch_size=config.eval.batch_size)
  return Inputs(train=input_lib.InputPipeline(config, "train", seed=config.seed),
                eval_batches=eval_batches, train_examples=train_index.num_examples)


def resolve_total_steps(config: ml_collections.ConfigDict, train_examples: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps) from the records' example count and the config duration."""
  steps_per_epoch = train_examples // config.data.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"config.data.batch_size={config.data.batch_size} exceeds the "
                     f"{train_examples} training examples.")
  if config.total_steps is not None:
    return steps_per_epoch, int(config.total_steps)
  return steps_per_epoch, int(math.ceil(config.total_epochs * steps_per_epoch))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       inputs: Inputs | None = None) -> dict[str, float]:
  """Pretrains (resuming from the latest checkpoint in workdir); returns the last metrics."""
  # ---------------------------------------------------------------- setup
  model_config = validation.validate_config(
      config, jax.device_count(), jax.process_count(), check_data=inputs is None)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(config.mesh)
  logging.info("Mesh %s over %d devices, %d processes.", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  writer = metrics_lib.make_writer(workdir, is_main)
  writer.write_hparams(config.to_dict())

  # ---------------------------------------------------------------- data
  inputs = inputs or records_inputs(config)
  steps_per_epoch, total_steps = resolve_total_steps(config, inputs.train_examples)
  logging.info("%d steps (%d per epoch of %d examples).", total_steps, steps_per_epoch,
               inputs.train_examples)

  # ---------------------------------------------------------------- model and optimizer
  model = CAVMAE(config=model_config)
  trainable = models.trainable_mask(step_lib.abstract_params(model, model_config), model_config)
  schedule = optim.make_schedule(config, steps_per_epoch, total_steps)
  tx = optim.make_optimizer(config.optim, schedule, trainable)

  # ---------------------------------------------------------------- init or restore
  rng = jax.random.PRNGKey(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR),
                                             config.checkpoint)
  train_rng = jax.device_put(train_rng, mesh_lib.replicated(mesh))
  start_step = checkpointer.latest_step() or 0
  if start_step:  # restored straight into its shardings; nothing is initialized
    abstract_state = step_lib.abstract_train_state(model, model_config, tx, mesh)
    restored, input_state = checkpointer.restore(
        start_step, {"state": abstract_state, "rng": _abstract_like(train_rng)})
    state, train_rng = restored["state"], restored["rng"]
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    inputs.train.set_state(input_state)
    logging.info("Resumed from step %d.", start_step)
  else:
    state, shardings = step_lib.create_train_state(model, model_config, tx, mesh, init_rng)

  # ---------------------------------------------------------------- compiled steps
  train_step = step_lib.make_train_step(
      model, tx, schedule, trainable, mesh, shardings,
      audio_noise=config.data.noise and config.data.get("noise_on_device", False))
  step_flops = flops_lib.pretrain_step_flops(config.model)
  peak = flops_lib.peak_flops(jax.devices()[0].device_kind)

  # ---------------------------------------------------------------- evaluators
  evaluate = None
  if inputs.eval_batches is not None and config.eval.every_steps > 0:
    evaluate = make_evaluate(config, model, mesh, shardings.params, inputs.eval_batches)

  # ---------------------------------------------------------------- loop
  preemption = checkpoint_lib.PreemptionWatcher(checkpointer)
  progress = metrics_lib.ProgressBar(total_steps, start_step, enabled=is_main)
  pending: list[tuple[int, dict[str, jax.Array]]] = []  # dispatched, not yet checked on host
  logged: list[dict[str, float]] = []
  summary: dict[str, float] = {}
  if evaluate and start_step == 0:  # the initialization's baseline
    writer.write_scalars(0, dict(evaluate(state.params)))
  last_log_time, last_log_step = time.monotonic(), start_step

  def check(upto_step: int) -> None:
    """Fetches metrics of steps <= upto_step; stops the run on a non-finite loss."""
    while pending and pending[0][0] <= upto_step:
      step, device_metrics = pending.pop(0)
      host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      if not math.isfinite(host["loss"]):
        checkpointer.wait()
        raise NonFiniteLossError(
            f"Non-finite loss {host['loss']} at step {step}; stopping. The last good "
            f"checkpoint is step {checkpointer.latest_step()} in {checkpointer.manager.directory}.")
      logged.append(host)

  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = mesh_lib.global_batch(next(inputs.train), mesh)
      state, device_metrics = train_step(state, batch, train_rng)
      pending.append((step, device_metrics))
      check(step - 1)  # one step behind, so dispatch runs ahead of the host

      preempted = preemption.preempted(step)
      final = step == total_steps or preempted
      if step % config.log_every_steps == 0 or final:
        check(step)
        now = time.monotonic()
        summary = _mean(logged)
        logged.clear()
        seconds_per_step = (now - last_log_time) / (step - last_log_step)
        summary["step_time_s"] = seconds_per_step
        summary["samples_per_s"] = config.data.batch_size / seconds_per_step
        summary["epoch"] = step / steps_per_epoch
        if peak:
          summary["mfu"] = summary["samples_per_s"] * step_flops / (peak * jax.device_count())
        writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
        progress.update(step, {k: summary[k] for k in ("loss", "c_acc", "lr")})
        last_log_time, last_log_step = now, step
      if checkpointer.should_save(step) or final:
        check(step)
        checkpointer.save(step, {"state": state, "rng": train_rng}, inputs.train.get_state())
      if evaluate and (step % config.eval.every_steps == 0 or step == total_steps):
        eval_metrics = dict(evaluate(state.params))
        writer.write_scalars(step, eval_metrics)
        summary.update(eval_metrics)
        last_log_time = time.monotonic()  # eval time is not train step time
      if preempted:
        logging.warning("Preempted: saved step %d; stopping.", step)
        break
  finally:
    progress.close()
    preemption.restore_handler()
    checkpointer.close()
    writer.flush()
    writer.close()
  return summary


def make_evaluate(config: ml_collections.ConfigDict, model: CAVMAE, mesh: jax.sharding.Mesh,
                  param_shardings: Any,
                  eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]]
                  ) -> Callable[[Any], Iterator[tuple[str, float]]]:
  """Eval losses (over full eval batches) and audio<->visual retrieval on the held-out split."""
  eval_step = step_lib.make_eval_step(model, mesh, param_shardings)
  features_step = step_lib.make_features_step(model, mesh, param_shardings)
  mask_rng = jax.device_put(jax.random.PRNGKey(EVAL_MASK_SEED), mesh_lib.replicated(mesh))

  def features_fn(params, batch):
    audio, video = features_step(params, mesh_lib.global_batch(_model_inputs(batch), mesh))
    return np.asarray(audio), np.asarray(video)

  def global_batches():
    # Every process reads its own part; `valid` must describe the global batch.
    for batch in eval_batches():
      valid = _gather_valid(batch["valid"])
      yield {**batch, "valid": valid}

  retrieval = RetrievalEvaluator(features_fn, global_batches, config.eval.retrieval_max_clips)

  def evaluate(params) -> Iterator[tuple[str, float]]:
    totals: dict[str, float] = {}
    full_batches = 0
    for batch in eval_batches():
      # Eval losses are batch means over the model's contrastive groups: only batches without
      # padding enter them (retrieval below uses every valid clip).
      if not _all_valid_globally(batch["valid"]):
        continue
      out = jax.device_get(eval_step(params, mesh_lib.global_batch(_model_inputs(batch), mesh),
                                     mask_rng))
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + float(v)
      full_batches += 1
    for k, v in totals.items():
      yield f"eval/{k}", v / full_batches
    yield "eval/full_batches", float(full_batches)
    yield from retrieval.run(params)

  return evaluate


def _model_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"audio": batch["audio"], "image": batch["image"]}


def _gather_valid(valid: np.ndarray) -> np.ndarray:
  """The global batch's `valid` mask from every process's local part."""
  if jax.process_count() == 1:
    return np.asarray(valid, bool)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(np.asarray(valid, bool))).reshape(-1)


def _all_valid_globally(valid: np.ndarray) -> bool:
  return bool(np.all(_gather_valid(valid)))


def _abstract_like(x: jax.Array) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _mean(records: list[dict[str, float]]) -> dict[str, float]:
  if not records:
    return {}
  return {k: float(np.mean([r[k] for r in records])) for k in records[0]}
