"""Tests for the torch <-> flax renames and transposes (NumPy only)."""

import numpy as np
import pytest

from cav_mae_jax.convert import state_dict as sd

D, P, CLASSES = 8, 4, 5


def _original_layout(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A small state dict with one of every kind of key the original has."""
  shapes = {
      "patch_embed_a.proj.weight": (D, 1, P, P),
      "patch_embed_a.proj.bias": (D,),
      "patch_embed_v.proj.weight": (D, 3, P, P),
      "patch_embed_v.proj.bias": (D,),
      "modality_a": (1, 1, D),
      "pos_embed_a": (1, 6, D),
      "blocks_a.0.norm1.weight": (D,),
      "blocks_a.0.norm1.bias": (D,),
      "blocks_a.0.attn.qkv.weight": (3 * D, D),
      "blocks_a.0.attn.qkv.bias": (3 * D,),
      "blocks_a.0.mlp.fc1.weight": (4 * D, D),
      "blocks_a.10.mlp.fc2.weight": (D, 4 * D),
      "blocks_u.0.norm2_v.weight": (D,),
      "norm_a.weight": (D,),
      "mlp_head.0.weight": (D,),
      "mlp_head.0.bias": (D,),
      "mlp_head.1.weight": (CLASSES, D),
      "mlp_head.1.bias": (CLASSES,),
  }
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def test_paths_and_layouts():
  torch_sd = _original_layout(np.random.default_rng(0))
  params = sd.torch_to_flax(torch_sd)
  conv = params["patch_embed_v"]["proj"]["kernel"]
  assert conv.shape == (P, P, 3, D)
  np.testing.assert_array_equal(conv[1, 2, 0, 3], torch_sd["patch_embed_v.proj.weight"][3, 0, 1, 2])
  qkv = params["blocks_a_0"]["attn"]["qkv"]["kernel"]
  assert qkv.shape == (D, 3 * D)
  np.testing.assert_array_equal(qkv, torch_sd["blocks_a.0.attn.qkv.weight"].T)
  assert params["blocks_a_10"]["mlp"]["fc2"]["kernel"].shape == (4 * D, D)
  assert set(params["mlp_head_0"]) == {"scale", "bias"}
  assert params["mlp_head_1"]["kernel"].shape == (D, CLASSES)
  assert params["blocks_u_0"]["norm2_v"]["scale"].shape == (D,)
  assert params["modality_a"].shape == (1, 1, D)
  assert params["pos_embed_a"].shape == (1, 6, D)


def test_converted_kernels_compute_the_same_function():
  rng = np.random.default_rng(1)
  torch_sd = _original_layout(rng)
  params = sd.torch_to_flax(torch_sd)
  x = rng.standard_normal((2, D)).astype(np.float32)
  torch_linear = x @ torch_sd["mlp_head.1.weight"].T  # torch: y = x W^T
  flax_linear = x @ params["mlp_head_1"]["kernel"]
  np.testing.assert_allclose(flax_linear, torch_linear, rtol=1e-6)
  patch_nchw = rng.standard_normal((3, P, P)).astype(np.float32)
  torch_conv = np.einsum("dcij,cij->d", torch_sd["patch_embed_v.proj.weight"], patch_nchw)
  flax_conv = np.einsum("ijcd,ijc->d", params["patch_embed_v"]["proj"]["kernel"],
                        np.transpose(patch_nchw, (1, 2, 0)))
  np.testing.assert_allclose(flax_conv, torch_conv, rtol=1e-5)


def test_round_trip_is_bit_identical_and_strips_module_prefix():
  torch_sd = _original_layout(np.random.default_rng(2))
  released = {"module." + k: v for k, v in torch_sd.items()}
  back = sd.flax_to_torch(sd.torch_to_flax(released))
  assert set(back) == set(torch_sd)
  for key, value in torch_sd.items():
    assert back[key].dtype == value.dtype and back[key].shape == value.shape
    assert back[key].tobytes() == value.tobytes(), key


def test_module_prefix_kept_when_not_stripped():
  params = sd.torch_to_flax({"module.norm.weight": np.ones(3)}, strip_module_prefix=False)
  assert params["module"]["norm"]["scale"].shape == (3,)


def test_mixed_module_prefix_is_an_error():
  with pytest.raises(ValueError, match="mixes keys"):
    sd.torch_to_flax({"module.norm.weight": np.ones(3), "norm.bias": np.zeros(3)})



@pytest.mark.parametrize("prefix", ["module.module.", "_orig_mod.", "module._orig_mod."])
def test_every_wrappers_prefix_is_stripped(prefix):
  # Nested DataParallel / DistributedDataParallel, and torch.compile: the state dict held none of
  # the model's keys ("not a CAV-MAE checkpoint").
  torch_sd = _original_layout(np.random.default_rng(3))
  wrapped = sd.torch_to_flax({prefix + k: v for k, v in torch_sd.items()})
  assert sd.flatten_params(wrapped).keys() == sd.flatten_params(sd.torch_to_flax(torch_sd)).keys()
  with pytest.raises(ValueError, match="mixes keys with and without the '_orig_mod.' prefix"):
    sd.remove_module_prefix({"module._orig_mod.norm.weight": 1, "module.norm.bias": 2})

@pytest.mark.parametrize("key,shape,message", [
    ("blocks.0.conv1d.weight", (4, 2, 3), "rank-3 weight"),
    ("0.weight", (3,), "starts with an index"),
    ("norm..weight", (3,), "malformed"),
])
def test_unsupported_keys_are_errors(key, shape, message):
  with pytest.raises(ValueError, match=message):
    sd.torch_to_flax({key: np.zeros(shape)})


def _shapes(tree):
  return {k: _shapes(v) if isinstance(v, dict) else np.zeros(v.shape, v.dtype) for k, v in tree.items()}


def test_match_to_target_accounts_for_every_key():
  params = sd.torch_to_flax(_original_layout(np.random.default_rng(3)))
  target = _shapes(params)
  del target["mlp_head_1"]  # the source has a head the target does not
  target["norm_a"]["scale"] = np.zeros((D,), np.float16)
  matched, report = sd.match_to_target(params, target)
  assert set(report.unexpected) == {"mlp_head_1/kernel", "mlp_head_1/bias"}
  assert report.cast == ("norm_a/scale",)
  assert matched["norm_a"]["scale"].dtype == np.float16
  assert len(report.mapped) == len(sd.flatten_params(target))
  np.testing.assert_array_equal(matched["blocks_a_0"]["attn"]["qkv"]["kernel"],
                                params["blocks_a_0"]["attn"]["qkv"]["kernel"])
  assert "mlp_head_1/kernel" in report.summary()


def test_match_to_target_missing_key_names_it():
  params = sd.torch_to_flax(_original_layout(np.random.default_rng(4)))
  target = _shapes(params)
  target["decoder_norm"] = {"scale": np.zeros((D,), np.float32)}
  with pytest.raises(sd.ParamsMismatchError, match="decoder_norm/scale"):
    sd.match_to_target(params, target)


def test_match_to_target_shape_mismatch_names_it():
  params = sd.torch_to_flax(_original_layout(np.random.default_rng(5)))
  target = _shapes(params)
  target["pos_embed_a"] = np.zeros((1, 12, D), np.float32)
  with pytest.raises(sd.ParamsMismatchError, match=r"pos_embed_a: source \(1, 6, 8\) vs target \(1, 12, 8\)"):
    sd.match_to_target(params, target)
