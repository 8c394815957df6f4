"""The HEAR API of `cav_mae_jax.hear` for HEAR's own tools, which take only a `torch.nn.Module`.

`hear-validator cav_mae_jax.hear_torch -m CHECKPOINT` and hear-eval-kit's embedding step
(`--module cav_mae_jax.hear_torch --model CHECKPOINT`) check that `load_model` returns a
`torch.nn.Module` (or a `tf.Module`) and move it to their device; `cav_mae_jax.hear.load_model`
returns a plain object holding JAX parameters. Here `load_model` wraps that object in a module
with HEAR's attributes and no torch parameters (its `.to(device)` moves nothing: the model runs
in JAX on JAX's devices), and the embedding functions are `cav_mae_jax.hear`'s, the same
numbers, torch in and torch out on the input's device. Needs torch (the `torch` extra).

On a GPU, JAX takes 75% of the GPU's memory when it starts and torch shares the GPU in these
tools: set `XLA_PYTHON_CLIENT_PREALLOCATE=false` (or `XLA_PYTHON_CLIENT_MEM_FRACTION`) before
running them.
"""

from __future__ import annotations

from typing import Any

import torch

from cav_mae_jax import hear

sample_rate = hear.sample_rate  # pylint: disable=invalid-name  (HEAR API attribute)


class HearModule(torch.nn.Module):
  """A `cav_mae_jax.hear.HearModel` as a torch module: HEAR's attributes, no parameters."""

  def __init__(self, model: hear.HearModel):
    super().__init__()
    self.hear_model = model
    self.sample_rate = int(model.sample_rate)
    self.scene_embedding_size = int(model.scene_embedding_size)
    self.timestamp_embedding_size = int(model.timestamp_embedding_size)

  def forward(self, audio: torch.Tensor) -> torch.Tensor:
    """Scene embeddings [n, D] of `audio` [n, samples] (HEAR calls the functions below)."""
    return get_scene_embeddings(audio, self)


def load_model(model_file_path: str = "", **kwargs: Any) -> HearModule:
  """`cav_mae_jax.hear.load_model(model_file_path, **kwargs)` as a torch module."""
  return HearModule(hear.load_model(model_file_path, **kwargs))


def get_scene_embeddings(audio: torch.Tensor, model: HearModule) -> torch.Tensor:
  """[n, D] float32 on `audio`'s device: `cav_mae_jax.hear.get_scene_embeddings`."""
  return hear.get_scene_embeddings(audio, model.hear_model)


def get_timestamp_embeddings(audio: torch.Tensor,
                             model: HearModule) -> tuple[torch.Tensor, torch.Tensor]:
  """([n, T, D], [n, T] ms) float32 on `audio`'s device:
  `cav_mae_jax.hear.get_timestamp_embeddings`."""
  return hear.get_timestamp_embeddings(audio, model.hear_model)
