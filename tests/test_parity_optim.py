"""Optimizer parity: training steps on the torch reference and on the Flax model agree.

torch: `torch.optim.Adam(trainable, lr, betas=(0.95, 0.999), weight_decay=5e-7)`, the original's
optimizer (coupled L2). Flax: the project's `cav_mae_jax.train.optim.make_optimizer` with the
tiny pretraining recipe's `config.optim` (configs/pretrain.py, lr 1e-3) and
`cav_mae_jax.models.trainable_mask`. Same weights and mask noise as tests/parity.py.

Three checks, from the same start:
- gradients of the loss agree (relative to each tensor's largest gradient);
- the optimizer alone: fed torch's gradients, optax reproduces torch's parameters after two
  steps within 1e-5 everywhere (two steps, because a first Adam step is lr * g'/(|g'| + eps)
  whatever the betas);
- one and two full training steps on each side give parameters within 1e-5 wherever Adam's
  update is well conditioned. Where |g'| is tiny, g'/(|g'| + eps) turns float32 rounding of the
  gradient into a step of up to lr in either direction (slope 1/eps = 1e8), which no two float32
  implementations can agree on; those elements are counted (a small fraction) and bounded by
  2 lr per step. "Tiny" is |g'| < 1e-4 of the largest gradient of the element's output unit (a
  row of the torch weight): rounding scales with the terms summed into that row, and a fused
  qkv weight holds q and k rows whose gradients are ~100x smaller than its v rows'.

The runners and comparisons below take the loss and the optimizer as arguments: the fine-tuning
parity test (tests/test_parity_finetune.py) uses them with the original's two parameter groups.
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
  import parity  # noqa: E402
except ModuleNotFoundError:
  from tests import parity  # noqa: E402

STEPS = 2


def recipe_optim_config():
  """`config.optim` of the tiny pretraining recipe (lr 1e-3; Adam betas/eps/decay of the original)."""
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  return pretrain.get_config("tiny").optim


GRAD_RTOL = 1e-4  # gradient diffs, relative to the tensor's largest gradient
WELL_CONDITIONED = 1e-4  # |g'| >= this * max|g| of the output unit
MAX_ILL_CONDITIONED_FRACTION = 5e-3


def numpy_state(module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def torch_adam(param_groups: list[tuple[list, float]], optim_config) -> "torch.optim.Adam":
  """The original's `torch.optim.Adam`: one group per (params, lr), its betas and coupled decay."""
  return torch.optim.Adam([{"params": params, "lr": lr} for params, lr in param_groups],
                          betas=(optim_config.b1, optim_config.b2), eps=optim_config.eps,
                          weight_decay=optim_config.weight_decay)


def torch_run(reference, adam, loss_of, batches):
  """Training steps of the reference (`loss_of(reference, batch)` -> loss); per-step gradients
  (None: no gradient) and states."""
  grads, states = [], []
  for batch in batches:
    adam.zero_grad(set_to_none=True)
    loss_of(reference, batch).backward()
    grads.append({n: None if p.grad is None else p.grad.numpy().copy()
                  for n, p in reference.named_parameters() if p.requires_grad})
    adam.step()
    states.append(numpy_state(reference))
  return grads, states


def flax_run(params, tx, loss_of, batches):
  """The same steps with an optax optimizer (`loss_of(params, batch)` -> loss); per-step
  gradients and params, torch layout."""

  @jax.jit
  def step(params, opt_state, batch):
    grads = jax.grad(loss_of)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grads

  opt_state = tx.init(params)
  grads, states = [], []
  for batch in batches:
    params, opt_state, g = step(params, opt_state, batch)
    grads.append(sd.flax_to_torch(jax.device_get(g)))
    states.append(sd.flax_to_torch(jax.device_get(params)))
  return grads, states


def optax_on_torch_grads(params, tx, torch_grads) -> dict[str, np.ndarray]:
  """An optax optimizer alone, fed torch's gradients (zeros where torch has none)."""
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  for step_grads in torch_grads:
    as_torch = {k: np.zeros_like(v) if step_grads.get(k) is None else step_grads[k]
                for k, v in sd.flax_to_torch(params).items()}
    grads, _ = sd.match_to_target(sd.torch_to_flax(as_torch), params)
    updates, opt_state = update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return sd.flax_to_torch(jax.device_get(params))


def well_conditioned(grad: np.ndarray, param: np.ndarray, weight_decay: float) -> np.ndarray:
  """Elements whose coupled gradient g' = g + wd * p is not tiny against the largest gradient
  of their output unit (row of a torch weight; the whole tensor for a vector)."""
  rows = np.abs(grad).reshape(grad.shape[0], -1) if grad.ndim > 1 else np.abs(grad)[None]
  scale = rows.max(axis=1, keepdims=True)
  coupled = np.abs(grad + weight_decay * param).reshape(rows.shape)
  return (coupled >= WELL_CONDITIONED * scale).reshape(grad.shape)


def compare_steps(torch_grads, states_before, mine, theirs, learning_rate_of,
                  weight_decay) -> tuple[float, str, int, int]:
  """Compares parameters after len(torch_grads) full steps on each side.

  Returns (worst difference among well-conditioned elements, its tensor, ill-conditioned
  elements, elements compared). An element is ill-conditioned when its coupled gradient was
  tiny at any of the steps (`well_conditioned`); `states_before[i]` are the torch parameters
  before step i. Every element must stay within 2 * steps * lr of torch's (an Adam step never
  exceeds lr), with its tensor's lr from `learning_rate_of(name)`.
  """
  ill, total, worst = 0, 0, (0.0, "")
  for name in torch_grads[0]:
    diff = np.abs(mine[name] - theirs[name])
    bound = 2 * len(torch_grads) * learning_rate_of(name) * (1 + 1e-3)
    assert np.max(diff) <= bound, f"{name}: {np.max(diff):.2e} > {bound:.2e}"
    step_grads = [grads.get(name) for grads in torch_grads]
    if any(g is None for g in step_grads):
      continue
    well = np.ones(diff.shape, bool)
    for grad, state in zip(step_grads, states_before):
      well &= well_conditioned(grad, state[name], weight_decay)
    ill += int(np.sum(~well))
    total += diff.size
    if np.any(well):
      worst = max(worst, (float(np.max(diff[well])), name))
  return worst[0], worst[1], ill, total


def worst_relative_gradient_difference(flax_grads, torch_grads) -> tuple[str, float]:
  """(tensor, max |flax - torch| / max |torch|) of the worst tensor; a parameter torch gives no
  gradient must get exactly zero from Flax."""
  relative = {}
  for name, expected in torch_grads.items():
    if expected is None:  # unused by the objective
      assert not np.any(flax_grads[name]), name
      continue
    relative[name] = float(np.max(np.abs(flax_grads[name] - expected)) / np.max(np.abs(expected)))
  worst = max(relative, key=relative.get)
  return worst, relative[worst]


def assert_unused_unchanged(torch_grads, before, theirs, mine) -> list[str]:
  """Trainable parameters without a gradient stay bit-identical on both sides; returns them."""
  unused = sorted(k for k, g in torch_grads.items() if g is None)
  for k in unused:
    np.testing.assert_array_equal(theirs[k], before[k], err_msg=f"torch moved {k}")
  moved = {k: float(np.max(np.abs(mine[k] - before[k]))) for k in unused}
  assert not any(moved.values()), {k: f"{v:.1e}" for k, v in moved.items() if v}
  return unused


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
  model = models.CAVMAE(cfg)
  tx = optim.make_optimizer(optim_config, optim_config.learning_rate,
                            models.trainable_mask(params, cfg))
  flax_loss = lambda p, b: model.apply({"params": p}, b[0], b[1], noise_a=b[2], noise_v=b[3])["loss"]
  flax_grads, flax_states = flax_run(params, tx, flax_loss, batches)

  def torch_loss(reference, batch):
    audio, image, noise_a, noise_v = batch
    return reference.forward_details(
        parity.to_torch(audio), parity.nchw(image), noise_a=parity.to_torch(noise_a),
        noise_v=parity.to_torch(noise_v), **parity.reference_forward_kwargs(cfg))["loss"]

  adam = torch_adam([([p for p in reference.parameters() if p.requires_grad],
                      optim_config.learning_rate)], optim_config)
  torch_grads, torch_states = torch_run(reference, adam, torch_loss, batches)
  optax_only = optax_on_torch_grads(params, tx, torch_grads)
  no_grad = {k for k, g in torch_grads[0].items() if g is None}
  return dict(optim_config=optim_config, before=before, flax_grads=flax_grads, flax_states=flax_states,
              torch_grads=torch_grads, torch_states=torch_states, optax_only=optax_only, no_grad=no_grad)


def test_gradients_match_torch(runs):
  name, relative = worst_relative_gradient_difference(runs["flax_grads"][0], runs["torch_grads"][0])
  assert relative <= GRAD_RTOL, f"{name}: {relative:.2e}"


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


@pytest.mark.parametrize("steps", [1, 2])
def test_training_steps_match_torch(runs, steps):
  optim_config = runs["optim_config"]
  worst, name, ill, total = compare_steps(
      runs["torch_grads"][:steps], [runs["before"]] + runs["torch_states"][:steps - 1],
      runs["flax_states"][steps - 1], runs["torch_states"][steps - 1],
      lambda _: optim_config.learning_rate, optim_config.weight_decay)
  assert worst <= parity.TOLERANCE, f"{name}: {worst:.2e}"
  assert ill <= MAX_ILL_CONDITIONED_FRACTION * total, f"{ill} of {total} elements ill-conditioned"


def test_parameters_without_gradient_stay_unchanged(runs):
  unused = assert_unused_unchanged(runs["torch_grads"][0], runs["before"], runs["torch_states"][-1],
                                   runs["flax_states"][-1])
  assert [k for k in unused if k not in models.FIXED_POS_EMBEDS]  # the six-LayerNorm blocks
