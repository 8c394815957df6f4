"""Fine-tuning: the CAV-MAE encoder with a LayerNorm + Linear head, on labelled clips.

As the original's `run_cavmae_ft.py`: the five modality modes of `models.CAVMAEFT`; BCE with
logits averaged over clips and classes (AudioSet, multi-label) or cross-entropy on soft targets
averaged over clips (VGGSound); the head (`mlp_head_*`, the original's second parameter group)
at `head_lr_multiplier` times the base rate. Labels arrive smoothed and mixed by the input
pipeline. A linear probe (`tasks/probe.py`) is the same task with the encoder frozen: its
parameters get no gradient (stop_gradient, so XLA drops their backward pass) and no optimizer
state.

Fields of `config.finetune`: loss ('bce' | 'ce'), head_lr_multiplier, average_first_epoch /
average_last_epoch (the epochs whose checkpoints `tools/average.py` averages, 1-based).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cav_mae_jax import models
from cav_mae_jax import tasks
from cav_mae_jax.tasks import Batch, Task
from cav_mae_jax.train import flops

USES_LABELS = True  # the loss reads the clips' labels (tasks/__init__.py)
HEAD_MODULES = ("mlp_head_0", "mlp_head_1")
LOSSES = ("bce", "ce")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks `config.finetune`; raises ValueError naming the field."""
  if "finetune" not in config:
    raise ValueError(f"config.task={config.task!r} needs the config.finetune section, which this "
                     "config lacks (a pretraining config?): use configs/finetune.py "
                     f"(',probe' for the linear probe)")
  section = config.finetune
  if section.loss not in LOSSES:
    raise ValueError(f"config.finetune.loss={section.loss!r}: must be one of {LOSSES} "
                     "('bce' multi-label as AudioSet, 'ce' single-label as VGGSound).")
  if section.loss == "ce" and config.model.get("num_classes") == 1:
    raise ValueError("config.model.num_classes=1: with config.finetune.loss='ce' the softmax of "
                     "one class is 1 whatever the clip, so the loss is 0 and nothing learns; "
                     "use --config.finetune.loss=bce (the class present or not).")
  if not section.head_lr_multiplier > 0:
    raise ValueError(f"config.finetune.head_lr_multiplier={section.head_lr_multiplier}: must be "
                     "positive.")
  first, last = section.average_first_epoch, section.average_last_epoch
  if not 1 <= first <= last:
    raise ValueError(f"config.finetune.average_first_epoch={first}: must be in [1, "
                     f"average_last_epoch={last}].")


def probabilities(logits: jax.Array, loss: str) -> jax.Array:
  """Scores that are averaged over frames and scored: sigmoid (BCE) or softmax (CE)."""
  logits = logits.astype(jnp.float32)
  return jax.nn.sigmoid(logits) if loss == "bce" else jax.nn.softmax(logits, axis=-1)


def classification_loss(logits: jax.Array, labels: jax.Array, loss: str,
                        per_clip: bool = False) -> jax.Array:
  """torch BCEWithLogitsLoss (mean over clips and classes) or CrossEntropyLoss on soft targets;
  with `per_clip`, each clip's [clips] (BCE: its mean over classes), whose mean is the loss."""
  logits, labels = logits.astype(jnp.float32), labels.astype(jnp.float32)
  if loss == "bce":
    losses = optax.sigmoid_binary_cross_entropy(logits, labels)
    return losses.mean(axis=-1) if per_clip else losses.mean()
  losses = optax.softmax_cross_entropy(logits, labels)
  return losses if per_clip else losses.mean()


def make_task(config: ml_collections.ConfigDict, *, probe: bool = False) -> Task:
  """The fine-tuning task (or, with `probe`, the linear probe) for `config.model`."""
  model_config = models.ModelConfig.from_config(config.model)
  model = models.CAVMAEFT(model_config)
  loss_name = config.finetune.loss

  def init_params(rng: jax.Array) -> Any:
    return models.init_params(model_config, rng, finetune=True)

  def logits_fn(params: Any, batch: Batch, mode: str | None = None) -> jax.Array:
    return model.apply({"params": params}, batch.get("audio"), batch.get("image"), mode)

  def loss_fn(params: Any, batch: Batch, rng: jax.Array):
    del rng  # no randomness in the forward pass (no dropout, as the original)
    if probe:
      params = {k: v if k in HEAD_MODULES else jax.lax.stop_gradient(v)
                for k, v in params.items()}
    logits = logits_fn(params, batch)
    loss = classification_loss(logits, batch["label"], loss_name)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch["label"], -1))
    return loss, {"loss": loss, "accuracy": accuracy.astype(jnp.float32)}

  def classify_fn(params: Any, batch: Batch, mode: str | None = None) -> dict[str, jax.Array]:
    """One forward pass: 'logits', 'probabilities' and each clip's 'loss' for batch['label']."""
    logits = logits_fn(params, batch, mode)
    return {"logits": logits, "probabilities": probabilities(logits, loss_name),
            "loss": classification_loss(logits, batch["label"], loss_name, per_clip=True)}

  shapes = models.param_shapes(model_config, finetune=True)
  trainable = models.trainable_mask(shapes, model_config, finetune=True)
  is_head = {k: jax.tree.map(lambda _, k=k: k in HEAD_MODULES, v) for k, v in shapes.items()}
  if probe:
    trainable = jax.tree.map(lambda t, h: bool(t and h), trainable, is_head)
  multiplier = float(config.finetune.head_lr_multiplier)
  lr_multipliers = jax.tree.map(lambda h: multiplier if h else 1.0, is_head)
  step_flops = flops.finetune_step_flops(config.model, probe=probe)
  return Task(name="probe" if probe else "finetune", model_config=model_config,
              init_params=init_params, loss_fn=loss_fn, trainable=trainable,
              lr_multipliers=lr_multipliers,
              predict_fns={"classify": classify_fn, "logits": logits_fn,
                           **tasks.feature_fns(model, model_config)},
              step_flops=step_flops, finetune=True)


make_probe_task = functools.partial(make_task, probe=True)
