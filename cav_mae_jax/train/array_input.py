"""In-memory input: batches of host arrays in a seeded order, with a checkpointable position.

Serves the same batch dicts as the tf.data pipeline (`audio`, `image`, `valid`) from arrays
already in memory: used for benchmarks and for testing the trainer without records. Each epoch is
a fresh permutation drawn from `seed` and the epoch number, so the order is a pure function of
(seed, position) and resuming from `get_state()` continues it exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ArrayInput:
  """Iterator over host-local batches of `arrays` (all with the same leading size)."""

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int = 0,
               shuffle: bool = True, process_index: int = 0, process_count: int = 1):
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"arrays have different leading sizes: {sizes}")
    self.num_examples = next(iter(sizes.values()))
    if batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes")
    if batch_size > self.num_examples:
      raise ValueError(f"batch_size={batch_size} exceeds the {self.num_examples} examples")
    self.arrays = arrays
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    self.process_index = process_index
    self.local_batch_size = batch_size // process_count
    self.batches_per_epoch = self.num_examples // batch_size
    self.position = 0  # global batches served so far

  def __iter__(self) -> ArrayInput:
    return self

  def global_indices(self, position: int) -> np.ndarray:
    """Example indices of the global batch served at `position`."""
    epoch, within = divmod(position, self.batches_per_epoch)
    order = np.arange(self.num_examples)
    if self.shuffle:
      order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
    return order[within * self.batch_size:(within + 1) * self.batch_size]

  def __next__(self) -> dict[str, np.ndarray]:
    indices = self.global_indices(self.position)
    local = indices[self.process_index * self.local_batch_size:
                    (self.process_index + 1) * self.local_batch_size]
    self.position += 1
    batch = {k: v[local] for k, v in self.arrays.items()}
    batch.setdefault("valid", np.ones(len(local), bool))
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serializable position, for checkpoints."""
    return {"position": self.position, "seed": self.seed}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a state returned by `get_state`."""
    if state["seed"] != self.seed:
      raise ValueError(f"input state has seed {state['seed']}, this input has seed {self.seed}")
    self.position = int(state["position"])


def random_clips(num_examples: int, audio_length: int, num_mel_bins: int, image_size: int,
                 seed: int = 0, num_classes: int | None = None) -> dict[str, np.ndarray]:
  """Standard-normal `audio` [N, T, F] and `image` [N, H, W, 3] float32 arrays; with
  `num_classes`, also one-hot `label` [N, num_classes] float32 of uniformly drawn classes."""
  rng = np.random.default_rng(seed)
  clips = {
      "audio": rng.standard_normal((num_examples, audio_length, num_mel_bins), np.float32),
      "image": rng.standard_normal((num_examples, image_size, image_size, 3), np.float32),
  }
  if num_classes is not None:
    clips["label"] = np.eye(num_classes, dtype=np.float32)[rng.integers(num_classes,
                                                                         size=num_examples)]
  return clips
