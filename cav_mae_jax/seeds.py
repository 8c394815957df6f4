"""The seeds a user gives (`config.seed`, an evaluator's `mask_seed`, a tool's `--seed`).

Each becomes a JAX PRNG key (`jax.random.PRNGKey(seed)`), which without `jax_enable_x64` keeps
a seed's low 32 bits: -1 gives seed 4294967295's key and 2**32 seed 0's, so two runs told to
differ would draw the same numbers. A seed is therefore refused outside [0, 2**32 - 1].
"""

from __future__ import annotations

MAX_SEED = 2**32 - 1
RANGE = f"must be in [0, {MAX_SEED}] (a PRNG key keeps a seed's low 32 bits)"


def valid(seed: int) -> bool:
  """Whether `seed` gives a key of its own."""
  return not isinstance(seed, bool) and 0 <= seed <= MAX_SEED


def check(field: str, seed: int) -> None:
  """Raises ValueError naming `field` (e.g. 'config.seed') when `seed` is not `valid`."""
  if not valid(seed):
    raise ValueError(f"{field}={seed!r}: {RANGE}.")
