"""Optimizer parity: training steps on the torch reference and on the Flax model agree.

torch: `torch.optim.Adam(trainable, lr, betas=(0.95, 0.999), weight_decay=5e-7)`, the original's
optimizer (coupled L2). Flax: the project's `cav_mae_jax.train.optim.make_optimizer` with the
tiny pretraining recipe's `config.optim` (configs/pretrain.py, lr 1e-3) and
`cav_mae_jax.models.trainable_mask`. Same weights and mask noise as tests/test_parity.py.

Three checks, from the same start:
- gradients of the loss agree (relative to each tensor's largest gradient);
- the optimizer alone: fed torch's gradients, optax reproduces torch's parameters after two
  steps within 1e-5 everywhere (two steps, because a first Adam step is lr * g'/(|g'| + eps)
  whatever the betas);
- one full training step on each side gives parameters within 1e-5 wherever Adam's update is
  well conditioned. Where |g'| is tiny, g'/(|g'| + eps) turns float32 rounding of the gradient
  into a step of up to lr in either direction (slope 1/eps = 1e8), which no two float32
  implementations can agree on; those elements are counted (a small fraction) and bounded by 2 lr.
"""

from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="optimizer parity compares against torch.optim.Adam")

import jax  # noqa: E402
import optax  # noqa: E402

from cav_mae_jax import models  # noqa: E402
from cav_mae_jax.convert import state_dict as sd  # noqa: E402
from cav_mae_jax.train import optim  # noqa: E402

try:  # pytest puts tests/ on sys.path; `python -m` from the repo root has `tests` instead.
  import test_parity as parity  # noqa: E402
except ModuleNotFoundError:
  from tests import test_parity as parity  # noqa: E402

STEPS = 2


def recipe_optim_config():
  """`config.optim` of the tiny pretraining recipe (lr 1e-3; Adam betas/eps/decay of the original)."""
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  return pretrain.get_config("tiny").optim


GRAD_RTOL = 1e-4  # gradient diffs, relative to the tensor's largest gradient
WELL_CONDITIONED = 1e-4  # |g'| >= this * max|g| of the tensor
MAX_ILL_CONDITIONED_FRACTION = 1e-2


def numpy_state(module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def torch_run(reference, cfg, optim_config, batches):
  """The original's training steps; returns per-step gradients (None: no gradient) and states."""
  trainable = [p for p in reference.parameters() if p.requires_grad]
  adam = torch.optim.Adam(trainable, lr=optim_config.learning_rate, betas=(optim_config.b1, optim_config.b2),
                          eps=optim_config.eps, weight_decay=optim_config.weight_decay)
  grads, states = [], []
  for audio, image, noise_a, noise_v in batches:
    adam.zero_grad(set_to_none=True)
    out = reference.forward_details(parity.to_torch(audio), parity.nchw(image), noise_a=parity.to_torch(noise_a),
                                    noise_v=parity.to_torch(noise_v), **parity.reference_forward_kwargs(cfg))
    out["loss"].backward()
    grads.append({n: None if p.grad is None else p.grad.numpy().copy()
                  for n, p in reference.named_parameters() if p.requires_grad})
    adam.step()
    states.append(numpy_state(reference))
  return grads, states


def flax_run(params, cfg, optim_config, batches):
  """The same steps with the project's optax optimizer; per-step gradients and params, torch layout."""
  model = models.CAVMAE(cfg)
  tx = optim.make_optimizer(optim_config, optim_config.learning_rate, models.trainable_mask(params, cfg))

  @jax.jit
  def step(params, opt_state, audio, image, noise_a, noise_v):
    loss_fn = lambda p: model.apply({"params": p}, audio, image, noise_a=noise_a, noise_v=noise_v)["loss"]
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grads

  opt_state = tx.init(params)
  grads, states = [], []
  for batch in batches:
    params, opt_state, g = step(params, opt_state, *batch)
    grads.append(sd.flax_to_torch(jax.device_get(g)))
    states.append(sd.flax_to_torch(jax.device_get(params)))
  return grads, states


def optax_on_torch_grads(params, cfg, optim_config, torch_grads) -> dict[str, np.ndarray]:
  """The project's optimizer alone, fed torch's gradients (zeros where torch has none)."""
  tx = optim.make_optimizer(optim_config, optim_config.learning_rate, models.trainable_mask(params, cfg))
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  for step_grads in torch_grads:
    as_torch = {k: np.zeros_like(v) if step_grads.get(k) is None else step_grads[k]
                for k, v in sd.flax_to_torch(params).items()}
    grads, _ = sd.match_to_target(sd.torch_to_flax(as_torch), params)
    updates, opt_state = update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return sd.flax_to_torch(jax.device_get(params))


@pytest.fixture(scope="module")
def runs():
  """Both sides for STEPS steps from the same weights on the same batches and masks."""
  cfg = parity.tiny_config()
  optim_config = recipe_optim_config()
  assert (optim_config.b1, optim_config.b2, optim_config.eps) == (0.95, 0.999, 1e-8)
  assert optim_config.weight_decay == 5e-7 and optim_config.grad_clip_norm == 0  # the original's
  reference = parity.build_reference(cfg)
  params = parity.flax_params(reference, cfg)
  before = numpy_state(reference)
  batches = []
  for step in range(STEPS):
    audio, image = parity.make_inputs(cfg, parity.BATCH, seed=10 + step)
    batches.append((audio, image, *parity.make_noise(cfg, parity.BATCH, seed=10 + step)))
  flax_grads, flax_states = flax_run(params, cfg, optim_config, batches)
  torch_grads, torch_states = torch_run(reference, cfg, optim_config, batches)
  optax_only = optax_on_torch_grads(params, cfg, optim_config, torch_grads)
  no_grad = {k for k, g in torch_grads[0].items() if g is None}
  return dict(optim_config=optim_config, before=before, flax_grads=flax_grads, flax_states=flax_states,
              torch_grads=torch_grads, torch_states=torch_states, optax_only=optax_only, no_grad=no_grad)


def test_gradients_match_torch(runs):
  flax_grads, torch_grads = runs["flax_grads"][0], runs["torch_grads"][0]
  relative = {}
  for name, expected in torch_grads.items():
    if expected is None:  # unused by the objective: Flax must give exactly zero
      assert not np.any(flax_grads[name]), name
      continue
    relative[name] = float(np.max(np.abs(flax_grads[name] - expected)) / np.max(np.abs(expected)))
  worst = max(relative, key=relative.get)
  assert relative[worst] <= GRAD_RTOL, f"{worst}: {relative[worst]:.2e}"


def test_optimizer_matches_torch_adam_on_same_gradients(runs):
  before, after, mine = runs["before"], runs["torch_states"][-1], runs["optax_only"]
  compared = [k for k in after if k not in runs["no_grad"]]
  diffs = {k: float(np.max(np.abs(mine[k] - after[k]))) for k in compared}
  worst = max(diffs, key=diffs.get)
  assert diffs[worst] <= parity.TOLERANCE, f"{worst}: {diffs[worst]:.2e}"
  moved = {k: float(np.max(np.abs(after[k] - before[k]))) for k in compared}
  fixed = [k for k in models.FIXED_POS_EMBEDS if k in moved]
  assert len(fixed) == 4 and all(moved[k] == 0 for k in fixed), {k: moved[k] for k in fixed}
  assert min(v for k, v in moved.items() if k not in fixed) > 100 * parity.TOLERANCE  # real steps


def test_training_step_matches_torch(runs):
  lr, wd = runs["optim_config"].learning_rate, runs["optim_config"].weight_decay
  before, mine, theirs = runs["before"], runs["flax_states"][0], runs["torch_states"][0]
  ill, total, worst = 0, 0, (0.0, "")
  for name, grad in runs["torch_grads"][0].items():
    diff = np.abs(mine[name] - theirs[name])
    assert np.max(diff) <= 2 * lr * (1 + 1e-3), name  # an Adam step never exceeds lr
    if grad is None:
      continue
    coupled = grad + wd * before[name]
    well = np.abs(coupled) >= WELL_CONDITIONED * np.max(np.abs(grad))
    ill += int(np.sum(~well))
    total += grad.size
    if np.any(well):
      worst = max(worst, (float(np.max(diff[well])), name))
  assert worst[0] <= parity.TOLERANCE, f"{worst[1]}: {worst[0]:.2e}"
  assert ill <= MAX_ILL_CONDITIONED_FRACTION * total, f"{ill} of {total} elements ill-conditioned"


def test_parameters_without_gradient_stay_unchanged(runs):
  before, theirs, mine = runs["before"], runs["torch_states"][-1], runs["flax_states"][-1]
  unused = sorted(k for k in runs["no_grad"] if k not in models.FIXED_POS_EMBEDS)
  assert unused  # the six-LayerNorm blocks always have unused norms
  for k in unused:
    np.testing.assert_array_equal(theirs[k], before[k], err_msg=f"torch moved {k}")
  moved = {k: float(np.max(np.abs(mine[k] - before[k]))) for k in unused}
  assert max(moved.values()) == 0, {k: f"{v:.1e}" for k, v in moved.items() if v}
