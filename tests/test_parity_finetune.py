"""Fine-tuning parity with the PyTorch reference of the original (float32, CPU, tiny model).

Training: the task's `loss_fn` with `optim.for_task` (configs/finetune.py `as20k`: BCE, head lr
x100, Adam betas (0.95, 0.999), coupled decay 5e-7; base lr 1e-4, the VGGSound recipe's, so that
a base step is 10x the tolerance and a head step 1000x) against the original's `traintest_ft.py`: `nn.BCEWithLogitsLoss()` on the
reference `CAVMAEFT` in multimodal mode, `torch.optim.Adam` with two parameter groups (`mlp_head`
at lr * 100, the rest at lr). Same weights (tests/parity.py), same batches, smoothed labels,
no mixup (mixup happens in the input pipeline, before the loss). The comparisons and their one
exception (near-zero-gradient Adam elements) are those of tests/test_parity_optim.py; parameters
are compared after one and after two steps.

Loss functions: 'bce' and 'ce' (cross-entropy on soft targets, the VGGSound recipe) equal
torch's BCEWithLogitsLoss / CrossEntropyLoss on mixed, smoothed labels, values and gradients.

Released files: a fine-tuned `.pth` as the original writes it (`module.` + the reference
CAVMAEFT's state dict) converts (tools/convert.py's pipeline, and `config.init.source='cavmae'`),
loads as tools/evaluate.py loads it, and gives the reference's logits in all five modes; the
classification evaluator's scores on it equal the statistics of the reference's probabilities.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="fine-tuning parity compares against the PyTorch reference")

import jax  # noqa: E402
import ml_collections  # noqa: E402

from cav_mae_jax import models  # noqa: E402
from cav_mae_jax import tasks  # noqa: E402
from cav_mae_jax.convert import init_source  # noqa: E402
from cav_mae_jax.convert import io as convert_io  # noqa: E402
from cav_mae_jax.convert import pipelines  # noqa: E402
from cav_mae_jax.convert import state_dict as sd  # noqa: E402
from cav_mae_jax.eval import stats  # noqa: E402
from cav_mae_jax.models.config import FT_MODES  # noqa: E402
from cav_mae_jax.tasks import finetune as finetune_task  # noqa: E402
from cav_mae_jax.train import evaluate  # noqa: E402
from cav_mae_jax.train import mesh as mesh_lib  # noqa: E402
from cav_mae_jax.train import optim  # noqa: E402
from configs import common  # noqa: E402
from configs import finetune  # noqa: E402

try:  # pytest puts tests/ on sys.path; `python -m` from the repo root has `tests` instead.
  import parity  # noqa: E402
  import test_parity_optim as parity_optim  # noqa: E402
except ModuleNotFoundError:
  from tests import parity  # noqa: E402
  from tests import test_parity_optim as parity_optim  # noqa: E402

CLASSES = 6
STEPS = 2
LEARNING_RATE = 1e-4
LABEL_SMOOTH = 0.1
HEAD_PREFIX = "mlp_head."  # the original's `mlp_list` for CAVMAEFT


def finetune_config(recipe: str) -> ml_collections.ConfigDict:
  """A recipe of configs/finetune.py on the parity test's tiny model (float32, short inputs)."""
  config = finetune.get_config(f"{recipe},classes={CLASSES}")
  with config.unlocked():
    config.model = models.model_config("tiny", audio_length=256, image_size=64,
                                       num_classes=CLASSES, ft_mode="multimodal",
                                       trainable_pos_embed=True, dtype="float32")
  return config


def smoothed_labels(batch: int, seed: int) -> np.ndarray:
  """Multi-hot labels as the pipeline gives them without mixup: 1 - s on, s / classes off."""
  on = np.random.default_rng(seed).random((batch, CLASSES)) < 0.3
  return np.where(on, 1 - LABEL_SMOOTH, LABEL_SMOOTH / CLASSES).astype(np.float32)


def make_batches(cfg: models.ModelConfig) -> list[dict[str, np.ndarray]]:
  batches = []
  for step in range(STEPS):
    audio, image = parity.make_inputs(cfg, parity.BATCH, seed=20 + step)
    batches.append({"audio": audio, "image": image, "label": smoothed_labels(parity.BATCH, step)})
  return batches


def is_head(name: str) -> bool:
  return name.startswith(HEAD_PREFIX)


# ----------------------------------------------------------------------------- training steps


@pytest.fixture(scope="module")
def runs():
  """Both sides for STEPS fine-tuning steps from the same weights on the same batches."""
  config = finetune_config("as20k")
  config.optim.learning_rate = LEARNING_RATE
  assert config.finetune.loss == "bce" and config.finetune.head_lr_multiplier == 100
  optim_config = config.optim
  assert (optim_config.b1, optim_config.b2, optim_config.eps) == (0.95, 0.999, 1e-8)
  assert optim_config.weight_decay == 5e-7 and optim_config.grad_clip_norm == 0  # the original's
  assert config.data.mixup > 0  # the recipe mixes in the input pipeline; these batches are unmixed
  cfg = models.ModelConfig.from_config(config.model)
  reference = parity.build_reference(cfg, finetune=True, seed=4)
  params = parity.flax_params(reference, cfg, finetune=True)
  before = parity_optim.numpy_state(reference)
  batches = make_batches(cfg)

  task = tasks.get_task(config)
  schedule, tx = optim.for_task(config, task, steps_per_epoch=10, total_steps=100)
  assert float(schedule(STEPS)) == pytest.approx(LEARNING_RATE)  # constant over these steps
  rng = jax.random.key(0)
  flax_grads, flax_states = parity_optim.flax_run(
      params, tx, lambda p, b: task.loss_fn(p, b, rng)[0], batches)

  bce = torch.nn.BCEWithLogitsLoss()
  torch_loss = lambda ref, b: bce(ref(parity.to_torch(b["audio"]), parity.nchw(b["image"]),
                                      "multimodal"), parity.to_torch(b["label"]))
  named = list(reference.named_parameters())
  multiplier = config.finetune.head_lr_multiplier
  adam = parity_optim.torch_adam(
      [([p for n, p in named if not is_head(n)], LEARNING_RATE),
       ([p for n, p in named if is_head(n)], LEARNING_RATE * multiplier)], optim_config)
  torch_grads, torch_states = parity_optim.torch_run(reference, adam, torch_loss, batches)
  optax_only = parity_optim.optax_on_torch_grads(params, tx, torch_grads)
  return dict(optim_config=optim_config, multiplier=multiplier, before=before,
              flax_grads=flax_grads, flax_states=flax_states, torch_grads=torch_grads,
              torch_states=torch_states, optax_only=optax_only)


def learning_rate_of(runs):
  return lambda name: LEARNING_RATE * (runs["multiplier"] if is_head(name) else 1.0)


def test_finetuning_gradients_match_torch(runs):
  name, relative = parity_optim.worst_relative_gradient_difference(runs["flax_grads"][0],
                                                                   runs["torch_grads"][0])
  assert relative <= parity_optim.GRAD_RTOL, f"{name}: {relative:.2e}"


def test_finetuning_optimizer_matches_torch_adam_on_same_gradients(runs):
  after, mine = runs["torch_states"][-1], runs["optax_only"]
  diffs = {k: float(np.max(np.abs(mine[k] - after[k]))) for k in after}
  worst = max(diffs, key=diffs.get)
  assert diffs[worst] <= parity.TOLERANCE, f"{worst}: {diffs[worst]:.2e}"


def test_head_moves_at_its_multiplied_rate(runs):
  """A first Adam step moves each element by about lr: x100 on the head, x1 elsewhere."""
  before, mine, theirs = runs["before"], runs["flax_states"][0], runs["torch_states"][0]
  for states in (mine, theirs):
    head = np.max(np.abs(states["mlp_head.1.weight"] - before["mlp_head.1.weight"]))
    base = np.max(np.abs(states["blocks_u.0.mlp.fc1.weight"] - before["blocks_u.0.mlp.fc1.weight"]))
    assert head == pytest.approx(LEARNING_RATE * runs["multiplier"], rel=1e-3)
    assert base == pytest.approx(LEARNING_RATE, rel=1e-3)


@pytest.mark.parametrize("steps", [1, 2])
def test_finetuning_steps_match_torch(runs, steps):
  wd = runs["optim_config"].weight_decay
  states_before = [runs["before"]] + runs["torch_states"][:steps - 1]
  worst, name, ill, total = parity_optim.compare_steps(
      runs["torch_grads"][:steps], states_before, runs["flax_states"][steps - 1],
      runs["torch_states"][steps - 1], learning_rate_of(runs), wd)
  print(f"{steps} step(s): worst well-conditioned difference {worst:.2e} ({name}); "
        f"{ill} of {total} elements ill-conditioned")
  assert worst <= parity.TOLERANCE, f"{name}: {worst:.2e}"
  assert ill <= parity_optim.MAX_ILL_CONDITIONED_FRACTION * total, f"{ill} of {total}"


def test_finetuning_parameters_without_gradient_stay_unchanged(runs):
  unused = parity_optim.assert_unused_unchanged(runs["torch_grads"][0], runs["before"],
                                                runs["torch_states"][-1], runs["flax_states"][-1])
  assert {"norm_a.weight", "norm_v.weight"} <= set(unused)  # multimodal: no modality norms


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("loss", finetune_task.LOSSES)
def test_loss_on_soft_targets_matches_torch(loss):
  rng = np.random.default_rng(5)
  logits = (3 * rng.standard_normal((8, CLASSES))).astype(np.float32)
  lam = rng.beta(10, 10, size=(8, 1)).astype(np.float32)  # mixed and smoothed, as the pipeline
  first, second = smoothed_labels(8, 1), smoothed_labels(8, 2)
  labels = (lam * first + (1 - lam) * second).astype(np.float32)
  torch_fn = torch.nn.BCEWithLogitsLoss() if loss == "bce" else torch.nn.CrossEntropyLoss()
  torch_logits = parity.to_torch(logits).requires_grad_(True)
  expected = torch_fn(torch_logits, parity.to_torch(labels))
  expected.backward()
  value, grad = jax.value_and_grad(finetune_task.classification_loss)(logits, labels, loss)
  assert float(value) == pytest.approx(expected.item(), abs=1e-6)
  np.testing.assert_allclose(np.asarray(grad), torch_logits.grad.numpy(), atol=1e-7)
  # Each clip's loss (what the evaluator averages over the clips): torch's without reduction,
  # BCE's averaged over the classes.
  per_clip = torch_fn.__class__(reduction="none")(torch_logits, parity.to_torch(labels))
  per_clip = (per_clip.mean(dim=1) if loss == "bce" else per_clip).detach().numpy()
  np.testing.assert_allclose(
      np.asarray(finetune_task.classification_loss(logits, labels, loss, per_clip=True)),
      per_clip, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- released files


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """A fine-tuned .pth as the original saves it (DataParallel), converted by tools/convert.py's
  pipeline; its reference and inputs."""
  config = finetune_config("as20k")
  reference = parity.build_reference(models.ModelConfig.from_config(config.model), finetune=True,
                                     seed=6)
  directory = tmp_path_factory.mktemp("released")
  path, converted = str(directory / "audio_model.wa.pth"), str(directory / "converted")
  torch.save({"module." + k: v for k, v in reference.state_dict().items()}, path)
  report = pipelines.cavmae_to_checkpoint(path, converted, config.model, finetune=True)
  audio, image = parity.make_inputs(models.ModelConfig.from_config(config.model), 8, seed=30)
  return dict(reference=reference, path=path, converted=converted, report=report, audio=audio,
              image=image)


def reference_logits(released, mode: str) -> np.ndarray:
  with torch.no_grad():
    return released["reference"](parity.to_torch(released["audio"]),
                                 parity.nchw(released["image"]), mode).numpy()


def test_released_finetuned_pth_converts_and_gives_the_reference_logits(released):
  report = released["report"]
  assert not report.unexpected and not report.dropped and not report.kept_init
  # The training path (config.init.source='cavmae') maps the same file to the same params.
  config = finetune_config("as20k")
  config.init.source, config.init.path = "cavmae", released["path"]
  task = tasks.get_task(config)
  shapes = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                        jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
  init_params, _ = init_source.load_init_params(config.init, config.model, finetune=True,
                                                init_params=shapes)
  converted = convert_io.load_params(released["converted"])
  for (path, a), b in zip(sd.flatten_params(converted).items(),
                          sd.flatten_params(init_params).values()):
    np.testing.assert_array_equal(a, b, err_msg=str(path))

  # Loaded as tools/evaluate.py loads --params; the task's logits in every mode.
  mesh = mesh_lib.make_mesh(common.mesh_config(), jax.devices()[:1])
  params, _ = evaluate.load_params(task, mesh, params_path=released["converted"])
  logits = jax.jit(task.predict_fns["logits"], static_argnums=2)
  batch = {"audio": released["audio"], "image": released["image"]}
  diffs = {mode: float(np.max(np.abs(np.asarray(logits(params, batch, mode))
                                     - reference_logits(released, mode)))) for mode in FT_MODES}
  print("max |logits - reference|:", {k: f"{v:.1e}" for k, v in diffs.items()})
  assert max(diffs.values()) <= parity.TOLERANCE, diffs


def test_evaluating_a_released_finetuned_pth_scores_the_reference_probabilities(released):
  config = finetune_config("as20k")
  config.data.batch_size = config.evals.val.batch_size = 8
  labels = (smoothed_labels(8, 3) > 0.5).astype(np.float32)
  batch = {"audio": released["audio"], "image": released["image"], "label": labels,
           "valid": np.ones(8, bool)}
  _, results = evaluate.evaluate(config, params_path=released["converted"],
                                 batch_source=lambda *args, **kwargs: iter([batch]))
  probabilities = 1 / (1 + np.exp(-reference_logits(released, "multimodal").astype(np.float64)))
  expected = stats.classification_stats(probabilities, labels)  # as20k: BCE, so sigmoid
  assert results["val/num_clips"] == 8
  for key, value in expected.items():
    assert results[f"val/{key}"] == pytest.approx(value, abs=1e-6), key
  # The held-out loss, as the original's validate computes valid_loss (one batch here).
  reference_loss = torch.nn.BCEWithLogitsLoss()(
      parity.to_torch(reference_logits(released, "multimodal")), parity.to_torch(labels))
  assert results["val/loss"] == pytest.approx(reference_loss.item(), rel=1e-5)
