"""The held-out losses evaluator: full batches only, masks fixed per batch but not shared."""

import jax
import numpy as np
import pytest

from cav_mae_jax.eval import losses
from cav_mae_jax.train import mesh as mesh_lib
from configs import common


def _noise(rng):
  return jax.random.uniform(rng)


def test_every_batch_draws_its_own_fixed_masks():
  audio = np.ones((4, 2), np.float32)
  batches = [{"audio": audio, "image": audio, "valid": np.ones(4, bool)},
             {"audio": audio, "image": audio, "valid": np.ones(4, bool)},
             {"audio": audio, "image": audio, "valid": np.array([True, True, False, False])}]
  # A stand-in for the task's losses: its "loss" is the draw the masks would come from.
  predict_fns = {"losses": lambda params, batch, rng: {"loss": _noise(rng) + params}}
  entry = common.evaluator("losses", every_steps=1, batch_size=4, mask_seed=7)
  mesh = mesh_lib.make_mesh(common.mesh_config(), jax.devices()[:1])
  evaluator = losses.LossesEvaluator("val", entry, predict_fns, mesh,
                                     lambda split, directory, batch_size: iter(batches))
  first = dict(evaluator.run(0.0))
  assert first["val/full_batches"] == 2.0  # the padded batch is left out
  key = jax.random.PRNGKey(7)
  draws = [float(_noise(jax.random.fold_in(key, b))) for b in (0, 1)]
  assert draws[0] != draws[1]  # the two batches' masks differ (one shared key gave equal ones)
  assert first["val/loss"] == pytest.approx(np.mean(draws), rel=1e-6)
  assert dict(evaluator.run(0.0)) == first  # and are the same at every evaluation


def test_evaluators_are_due_at_their_steps_and_epochs():
  import types  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.eval import common  # pylint: disable=import-outside-toplevel
  from configs import common as config_common  # pylint: disable=import-outside-toplevel

  def due_steps(every_steps=0, every_epochs=0.0, at_start=False):
    entry = config_common.evaluator("losses", every_steps=every_steps, batch_size=8,
                                    every_epochs=every_epochs, at_start=at_start)
    evaluator = types.SimpleNamespace(config=entry)
    return [step for step in range(17) if common.Evaluator.due(evaluator, step, 16, 8)]

  assert due_steps() == [16]  # the end only
  assert due_steps(every_steps=5, at_start=True) == [0, 5, 10, 15, 16]
  assert due_steps(every_epochs=1.0) == [8, 16]
  assert due_steps(every_epochs=0.5) == [4, 8, 12, 16]
  # Less than a step's worth of an epoch rounded to 0 steps: the evaluator never ran on its
  # schedule, without a word. It runs every step instead.
  assert due_steps(every_epochs=0.01) == list(range(1, 17))
