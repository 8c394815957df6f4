"""Weight averaging: exact for identical trees, correctly rounded for two, clear on mismatch."""

from fractions import Fraction

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from cav_mae_jax.train.averaging import average_params


def awkward_values(rng, size, dtype=np.float32):
  """Values over the dtype's exponent range, with signed zeros, subnormals and extremes."""
  info = ml_dtypes.finfo(dtype)
  span = min(60, info.maxexp - 2)
  values = (rng.normal(size=size) * np.exp2(rng.integers(-span, span, size=size))).astype(dtype)
  values[:6] = np.array([0.0, -0.0, info.smallest_subnormal, -info.smallest_subnormal * 3,
                         info.max, info.tiny], dtype)
  return values


def params_tree(rng, dtype=np.float32):
  return {
      "encoder": {"kernel": awkward_values(rng, 300, dtype).reshape(20, 15),
                  "bias": awkward_values(rng, 15, dtype)},
      "blocks": [{"scale": awkward_values(rng, 7, dtype)}, {"scale": np.ones(7, dtype)}],
  }


def bits(array):
  array = np.asarray(array)
  return array.view(np.dtype(f"u{array.dtype.itemsize}"))


def assert_bitwise_equal(tree, expected):
  assert tree.keys() == expected.keys()
  for got, want in [(tree["encoder"]["kernel"], expected["encoder"]["kernel"]),
                    (tree["encoder"]["bias"], expected["encoder"]["bias"]),
                    (tree["blocks"][0]["scale"], expected["blocks"][0]["scale"]),
                    (tree["blocks"][1]["scale"], expected["blocks"][1]["scale"])]:
    assert got.dtype == np.asarray(want).dtype and got.shape == np.shape(want)
    np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_identical_trees_average_to_themselves_bitwise(dtype):
  tree = params_tree(np.random.default_rng(0), dtype)
  naive_differs = False
  for k in range(1, 8):
    assert_bitwise_equal(average_params([tree] * k), tree)
    # The original's way (add in the leaf dtype, then divide) does not always give it back.
    kernel = tree["encoder"]["kernel"]
    with np.errstate(over="ignore"):
      naive = sum([kernel] * (k - 1), kernel) / np.array(k, kernel.dtype)
    naive_differs |= not np.array_equal(bits(naive.astype(kernel.dtype)), bits(kernel))
  assert naive_differs


def test_identical_jax_trees_average_to_themselves():
  tree = params_tree(np.random.default_rng(1))
  device_tree = {"encoder": {"kernel": jnp.asarray(tree["encoder"]["kernel"]),
                             "bias": jnp.asarray(tree["encoder"]["bias"])},
                 "blocks": [{"scale": jnp.asarray(b["scale"])} for b in tree["blocks"]]}
  assert_bitwise_equal(average_params([device_tree] * 3), tree)


def correctly_rounded(result, a, b):
  """True if no float32 neighbour of `result` is closer to the exact mean of a and b."""
  exact = (Fraction(float(a)) + Fraction(float(b))) / 2
  error = abs(Fraction(float(result)) - exact)
  for direction in (-np.inf, np.inf):
    with np.errstate(over="ignore"):
      neighbour = np.nextafter(result, np.float32(direction))
    if np.isfinite(neighbour) and abs(Fraction(float(neighbour)) - exact) < error:
      return False
  return True


def test_two_trees_give_their_correctly_rounded_mean():
  rng = np.random.default_rng(2)
  first, second = params_tree(rng), params_tree(rng)
  second["encoder"]["bias"][:6] = -first["encoder"]["bias"][:6]  # cancellation down to zero
  mean = average_params([first, second])
  for path in (("encoder", "kernel"), ("encoder", "bias")):
    a, b, got = first[path[0]][path[1]], second[path[0]][path[1]], mean[path[0]][path[1]]
    expected = ((a.astype(np.float64) + b.astype(np.float64)) / 2).astype(np.float32)
    np.testing.assert_array_equal(bits(got), bits(expected))
    assert all(correctly_rounded(r, x, y) for r, x, y in zip(got.ravel(), a.ravel(), b.ravel()))


def test_bfloat16_leaves_keep_their_dtype_and_average_exactly():
  rng = np.random.default_rng(3)
  a = rng.normal(size=1000).astype(ml_dtypes.bfloat16)
  b = rng.normal(size=1000).astype(ml_dtypes.bfloat16)
  c = rng.normal(size=1000).astype(ml_dtypes.bfloat16)
  mean = average_params([{"w": a}, {"w": b}, {"w": c}])["w"]
  assert mean.dtype == ml_dtypes.bfloat16
  expected = ((a.astype(np.float64) + b.astype(np.float64) + c.astype(np.float64)) / 3)
  np.testing.assert_array_equal(bits(mean), bits(expected.astype(ml_dtypes.bfloat16)))
  naive = ((a + b + c) / np.array(3, ml_dtypes.bfloat16)).astype(ml_dtypes.bfloat16)
  assert not np.array_equal(bits(naive), bits(mean))  # bfloat16 accumulation would be wrong


def test_mismatches_name_the_first_differing_path():
  tree = {"encoder": {"bias": np.zeros(3, np.float32), "kernel": np.zeros((2, 3), np.float32)},
          "head": np.zeros(4, np.float32)}
  reshaped = {"encoder": {"bias": np.zeros(3, np.float32), "kernel": np.zeros((3, 2), np.float32)},
              "head": np.zeros(4, np.float32)}
  with pytest.raises(ValueError, match=r"Tree 1 .*\['encoder'\]\['kernel'\].*\[3, 2\] instead of "
                                       r"float32\[2, 3\]"):
    average_params([tree, reshaped])
  renamed = {"encoder": {"bias": np.zeros(3, np.float32), "weight": np.zeros((2, 3), np.float32)},
             "head": np.zeros(4, np.float32)}
  with pytest.raises(ValueError, match=r"Tree 2 .*\['encoder'\]\['kernel'\]: found "
                                       r"\['encoder'\]\['weight'\]"):
    average_params([tree, tree, renamed])
  missing = {"encoder": tree["encoder"]}
  with pytest.raises(ValueError, match=r"\['head'\]: missing"):
    average_params([tree, missing])
  recast = dict(tree, head=np.zeros(4, np.float16))
  with pytest.raises(ValueError, match=r"\['head'\]: float16\[4\] instead of float32\[4\]"):
    average_params([tree, recast])
  with pytest.raises(ValueError, match=r"non-float leaf \['step'\]"):
    average_params([{"step": np.array(3)}])
  with pytest.raises(ValueError, match="at least one"):
    average_params([])
