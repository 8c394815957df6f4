"""Evaluation without training: any configured evaluator on any checkpoint.

The parameters come from a training workdir (checkpoint `step`, 0 = the latest) or from a
params checkpoint written by tools/convert.py; they must fit the config's task exactly (a
mismatch names the parameters). Results go to the workdir's metric writers when there is one.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from cav_mae_jax import eval as eval_lib
from cav_mae_jax import tasks
from cav_mae_jax.train import checkpoint as checkpoint_lib
from cav_mae_jax.train import mesh as mesh_lib
from cav_mae_jax.train import metrics as metrics_lib
from cav_mae_jax.train import validation


def load_params(task: tasks.Task, mesh: jax.sharding.Mesh, *, workdir: str | None = None,
                step: int = 0, params_path: str | None = None) -> tuple[Any, int]:
  """(params placed over the mesh, step) from a workdir or a params checkpoint."""
  from cav_mae_jax.convert import io  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.convert import state_dict as sd  # pylint: disable=g-import-not-at-top
  if workdir:
    host_params, step = checkpoint_lib.read_workdir_params(workdir, step)
    source = f"{workdir} step {step}"
  else:
    host_params, step, source = io.load_params(params_path), 0, params_path
  abstract = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  params, report = sd.match_to_target(host_params, abstract)
  if report.unexpected:
    raise sd.ParamsMismatchError(f"{source}: parameters the {task.name} model does not have: "
                                 f"{', '.join(report.unexpected[:10])}")
  shardings = mesh_lib.tree_shardings(mesh, abstract)
  return mesh_lib.host_to_global(params, shardings), step


def evaluate(config: ml_collections.ConfigDict, *, workdir: str | None = None, step: int = 0,
             params_path: str | None = None, names: list[str] | None = None,
             batch_source: eval_lib.common.BatchSource | None = None) -> tuple[int, dict[str, float]]:
  """Runs the evaluators of `config.evals` (or `names`); returns (step, metrics)."""
  validation.validate_config(config, jax.device_count(), jax.process_count(),
                             check_data=batch_source is None, training=False)
  task = tasks.get_task(config)
  eval_lib.validate_evals(config, task.predict_fns, jax.device_count(), jax.process_count())
  unknown = sorted(set(names or ()) - set(config.evals.keys()))
  if unknown:
    raise ValueError(f"--evals: {unknown} not in config.evals (have {sorted(config.evals)})")
  if not (workdir or params_path):
    raise ValueError("give a training workdir or a params checkpoint to evaluate")
  mesh = mesh_lib.make_mesh(config.mesh)
  params, step = load_params(task, mesh, workdir=workdir, step=step, params_path=params_path)
  results: dict[str, float] = {}
  for evaluator in eval_lib.build_evaluators(config, task.predict_fns, mesh, batch_source, names):
    results.update(evaluator.run(params))
  if workdir:
    writer = metrics_lib.make_writer(workdir, jax.process_index() == 0, config.tensorboard)
    writer.write_scalars(step, results)
    writer.close()
  return step, results
