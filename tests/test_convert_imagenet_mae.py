"""ImageNet MAE -> CAV-MAE initialization, one test per mapping rule (synthetic state dicts)."""

import dataclasses

import numpy as np
import pytest

from cav_mae_jax.convert import imagenet_mae
from cav_mae_jax.convert import state_dict as sd
from test_convert_layout import BASE, Dims, random_state_dict

TINY = Dims()
S = TINY.modality_specific_depth


def mae_shapes(dims: Dims, *, decoder: bool = True) -> dict[str, tuple[int, ...]]:
  """Key names and shapes of a facebookresearch/mae pretraining checkpoint ('model' entry)."""
  d, dd, p = dims.embed_dim, dims.decoder_embed_dim, dims.patch_size
  n = (dims.image_size // p) ** 2
  shapes = {"cls_token": (1, 1, d), "pos_embed": (1, n + 1, d),
            "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,),
            "norm.weight": (d,), "norm.bias": (d,)}

  def block(prefix, dim):
    h = int(dim * dims.mlp_ratio)
    return {f"{prefix}.norm1.weight": (dim,), f"{prefix}.norm1.bias": (dim,),
            f"{prefix}.attn.qkv.weight": (3 * dim, dim), f"{prefix}.attn.qkv.bias": (3 * dim,),
            f"{prefix}.attn.proj.weight": (dim, dim), f"{prefix}.attn.proj.bias": (dim,),
            f"{prefix}.norm2.weight": (dim,), f"{prefix}.norm2.bias": (dim,),
            f"{prefix}.mlp.fc1.weight": (h, dim), f"{prefix}.mlp.fc1.bias": (h,),
            f"{prefix}.mlp.fc2.weight": (dim, h), f"{prefix}.mlp.fc2.bias": (dim,)}

  for i in range(dims.encoder_depth):
    shapes.update(block(f"blocks.{i}", d))
  if decoder:
    shapes.update({"mask_token": (1, 1, dd), "decoder_pos_embed": (1, n + 1, dd),
                   "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,),
                   "decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,),
                   "decoder_pred.weight": (p * p * 3, dd), "decoder_pred.bias": (p * p * 3,)})
    for k in range(dims.decoder_depth):
      shapes.update(block(f"decoder_blocks.{k}", dd))
  return shapes


def _random(shapes, seed):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


@pytest.fixture(name="converted", scope="module")
def _converted():
  mae = _random(mae_shapes(TINY), seed=1)
  init = sd.torch_to_flax(random_state_dict(TINY, seed=2))
  params, report = imagenet_mae.imagenet_mae_to_params(mae, init)
  return mae, init, params, report


def _flax(mae, key):
  return sd.torch_array_to_flax(key, mae[key])[1]


def _block_leaves(tree):
  return {"/".join(p): v for p, v in sd.flatten_params(tree).items()}


def test_blocks_before_the_joint_block_go_to_both_modality_stacks(converted):
  mae, init, params, _ = converted
  for i in range(S):
    np.testing.assert_array_equal(params[f"blocks_a_{i}"]["attn"]["qkv"]["kernel"],
                                  mae[f"blocks.{i}.attn.qkv.weight"].T)
    for stack in ("blocks_a", "blocks_v"):
      for rest in imagenet_mae.BLOCK_KEYS:
        path, expected = sd.torch_array_to_flax(f"{stack}.{i}.{rest}", mae[f"blocks.{i}.{rest}"])
        got = params
        for name in path:
          got = got[name]
        np.testing.assert_array_equal(got, expected, err_msg=f"{stack}.{i}.{rest}")
      for norm in ("norm1_a", "norm1_v", "norm2_a", "norm2_v"):  # unused there: init kept
        np.testing.assert_array_equal(params[f"{stack}_{i}"][norm]["scale"],
                                      init[f"{stack}_{i}"][norm]["scale"])


def test_last_block_goes_to_the_joint_block_with_norm_copies(converted):
  mae, _, params, _ = converted
  joint = params["blocks_u_0"]
  np.testing.assert_array_equal(joint["mlp"]["fc2"]["kernel"], mae[f"blocks.{S}.mlp.fc2.weight"].T)
  np.testing.assert_array_equal(joint["attn"]["proj"]["bias"], mae[f"blocks.{S}.attn.proj.bias"])
  for number in ("1", "2"):
    for suffix in ("", "_a", "_v"):
      np.testing.assert_array_equal(joint[f"norm{number}{suffix}"]["scale"],
                                    mae[f"blocks.{S}.norm{number}.weight"])
      np.testing.assert_array_equal(joint[f"norm{number}{suffix}"]["bias"],
                                    mae[f"blocks.{S}.norm{number}.bias"])


def test_final_norm_is_copied_to_all_three(converted):
  mae, _, params, _ = converted
  for name in ("norm_a", "norm_v", "norm"):
    np.testing.assert_array_equal(params[name]["scale"], mae["norm.weight"])
    np.testing.assert_array_equal(params[name]["bias"], mae["norm.bias"])


def test_audio_patch_kernel_is_the_rgb_sum(converted):
  mae, _, params, _ = converted
  rgb = mae["patch_embed.proj.weight"]  # [D, 3, p, p]
  audio = params["patch_embed_a"]["proj"]["kernel"]  # [p, p, 1, D]
  assert audio.shape == (16, 16, 1, TINY.embed_dim)
  np.testing.assert_array_equal(audio[..., 0, :], (rgb[:, 0] + rgb[:, 1] + rgb[:, 2]).transpose(1, 2, 0))
  np.testing.assert_array_equal(params["patch_embed_v"]["proj"]["kernel"], rgb.transpose(2, 3, 1, 0))
  for name in ("patch_embed_a", "patch_embed_v"):
    np.testing.assert_array_equal(params[name]["proj"]["bias"], mae["patch_embed.proj.bias"])


def test_video_pos_embeds_drop_the_cls_row(converted):
  mae, init, params, _ = converted
  np.testing.assert_array_equal(params["pos_embed_v"], mae["pos_embed"][:, 1:])
  np.testing.assert_array_equal(params["decoder_pos_embed_v"], mae["decoder_pos_embed"][:, 1:])
  np.testing.assert_array_equal(params["pos_embed_a"], init["pos_embed_a"])


def test_audio_decoder_pred_is_the_first_256_rows(converted):
  mae, _, params, _ = converted
  weight, bias = mae["decoder_pred.weight"], mae["decoder_pred.bias"]
  np.testing.assert_array_equal(params["decoder_pred_a"]["kernel"], weight[:256].T)
  np.testing.assert_array_equal(params["decoder_pred_a"]["bias"], bias[:256])
  np.testing.assert_array_equal(params["decoder_pred_v"]["kernel"], weight.T)


def test_other_decoder_weights_map_by_name(converted):
  mae, _, params, _ = converted
  np.testing.assert_array_equal(params["mask_token"], mae["mask_token"])
  np.testing.assert_array_equal(params["decoder_embed"]["kernel"], mae["decoder_embed.weight"].T)
  np.testing.assert_array_equal(params["decoder_norm"]["scale"], mae["decoder_norm.weight"])
  np.testing.assert_array_equal(params["decoder_blocks_0"]["mlp"]["fc1"]["kernel"],
                                mae["decoder_blocks.0.mlp.fc1.weight"].T)


def test_report_accounts_for_every_key(converted):
  _, init, params, report = converted
  assert report.dropped == {"cls_token": "CAV-MAE has no CLS token"}
  assert not report.unexpected
  all_paths = set(_block_leaves(init))
  assert set(report.mapped) | set(report.kept_init) == all_paths
  assert not set(report.mapped) & set(report.kept_init)
  for kept in ("modality_a", "modality_v", "decoder_modality_a", "pos_embed_a",
               "decoder_pos_embed_a", "blocks_a_0/norm1_a/scale", "decoder_blocks_0/norm2_v/bias"):
    assert kept in report.kept_init
  assert set(_block_leaves(params)) == all_paths
  assert "cls_token" in report.summary()
  # The blocks of one stream keep only their unused per-stream norms at init: said so (the
  # summary read "kept at init: blocks_a_*/* (8 arrays) (not in ImageNet MAE)").
  assert report.kept_init["blocks_a_0/norm1_a/scale"].startswith("only their per-stream norms")
  assert all(why.startswith("only their per-stream norms") for name, why in
             report.kept_init.items() if name.startswith(("blocks_a_", "blocks_v_")))


def test_checkpoint_without_decoder_keeps_the_decoder_init():
  mae = _random(mae_shapes(TINY, decoder=False), seed=3)
  init = sd.torch_to_flax(random_state_dict(TINY, seed=4))
  params, report = imagenet_mae.imagenet_mae_to_params(mae, init)
  np.testing.assert_array_equal(params["decoder_pred_a"]["kernel"], init["decoder_pred_a"]["kernel"])
  assert report.kept_init["decoder_embed/kernel"] == "MAE checkpoint has no decoder"
  np.testing.assert_array_equal(params["norm"]["scale"], mae["norm.weight"])


def test_finetuned_mae_is_rejected_naming_what_is_missing():
  mae = _random(mae_shapes(TINY, decoder=False), seed=5)
  mae["fc_norm.weight"], mae["fc_norm.bias"] = mae.pop("norm.weight"), mae.pop("norm.bias")
  init = sd.torch_to_flax(random_state_dict(TINY, seed=6))
  with pytest.raises(sd.ParamsMismatchError, match=r"\(it is a fine-tuned ViT: fc_norm and a "
                     r"classification head instead of the pretrained MAE's norm; .*\): 2 keys "
                     r"missing: norm\.weight, norm\.bias"):
    imagenet_mae.imagenet_mae_to_params(mae, init)



def test_a_cavmae_checkpoint_is_named_as_such():
  # It was told only which of ImageNet MAE's keys it lacks.
  released = {"module." + k: v for k, v in random_state_dict(TINY, seed=6).items()}
  init = sd.torch_to_flax(random_state_dict(TINY, seed=6))
  with pytest.raises(sd.ParamsMismatchError, match=r"decoder \(it is a CAV-MAE checkpoint, with "
                     r"blocks_a, blocks_v and blocks_u: map it with tools/convert.py cavmae or "
                     r"config.init.source='cavmae'\): \d+ keys missing: patch_embed.proj.weight"):
    imagenet_mae.imagenet_mae_to_params(released, init)

def test_unknown_keys_and_wrong_widths_are_errors():
  init = sd.torch_to_flax(random_state_dict(TINY, seed=7))
  mae = _random(mae_shapes(TINY), seed=8)
  mae["head.weight"] = np.zeros((10, TINY.embed_dim), np.float32)
  with pytest.raises(sd.ParamsMismatchError, match="head.weight"):
    imagenet_mae.imagenet_mae_to_params(mae, init)
  _, report = imagenet_mae.imagenet_mae_to_params(mae, init, allow_unexpected=True)
  assert report.unexpected == ["head.weight"]
  wide = _random(mae_shapes(dataclasses.replace(TINY, embed_dim=24)), seed=9)
  with pytest.raises(sd.ParamsMismatchError, match=r"shape mismatch for pos_embed_v: .* gives \(1, 4, 24\), target \(1, 4, 16\)"):
    imagenet_mae.imagenet_mae_to_params(wide, init)


def test_rules_at_real_vit_base_shapes():
  """Shape-dependent rules on ViT-B/16 arrays (NumPy only, no model)."""
  shapes = mae_shapes(BASE)
  keys = ("patch_embed.proj.weight", "pos_embed", "decoder_pos_embed", "decoder_pred.weight",
          "decoder_pred.bias", "cls_token")
  mae = _random({k: shapes[k] for k in keys}, seed=10)
  mapped, dropped, unexpected = imagenet_mae.mae_rules(mae, modality_specific_depth=11, patch_size=16)
  assert not unexpected and set(dropped) == {"cls_token"}
  got = {k: v.shape for k, (v, _) in mapped.items()}
  assert got == {"patch_embed_v.proj.weight": (768, 3, 16, 16),
                 "patch_embed_a.proj.weight": (768, 1, 16, 16),
                 "pos_embed_v": (1, 196, 768), "decoder_pos_embed_v": (1, 196, 512),
                 "decoder_pred_v.weight": (768, 512), "decoder_pred_a.weight": (256, 512),
                 "decoder_pred_v.bias": (768,), "decoder_pred_a.bias": (256,)}
  np.testing.assert_array_equal(mapped["decoder_pred_a.weight"][0], mae["decoder_pred.weight"][:256])
  rgb = mae["patch_embed.proj.weight"]
  np.testing.assert_array_equal(mapped["patch_embed_a.proj.weight"][0][:, 0],
                                rgb[:, 0] + rgb[:, 1] + rgb[:, 2])


def _without_decoder(state_dict):
  return {k: v for k, v in state_dict.items() if not (k.startswith("decoder_") or k == "mask_token")}


def test_contrastive_only_target_drops_the_decoder():
  """CAV (lambda_mae=0) has no decoder: the MAE decoder is dropped, not an error."""
  mae = _random(mae_shapes(TINY), seed=11)
  init = sd.torch_to_flax(_without_decoder(random_state_dict(TINY, seed=12)))
  params, report = imagenet_mae.imagenet_mae_to_params(mae, init)
  assert "decoder_embed" not in params
  assert report.dropped["decoder_embed.weight -> decoder_embed/kernel"] == "not a parameter of this model variant"
  assert not report.unexpected


def test_shared_encoder_target_puts_every_block_in_the_joint_stack():
  """Vanilla AV-MAE (modality_specific_depth=0): all MAE blocks become joint blocks."""
  shared = dataclasses.replace(TINY, modality_specific_depth=0)
  mae = _random(mae_shapes(shared), seed=13)
  params, _ = imagenet_mae.imagenet_mae_to_params(mae, sd.torch_to_flax(random_state_dict(shared, seed=14)))
  assert not any(name.startswith(("blocks_a", "blocks_v")) for name in params)
  for i in range(shared.encoder_depth):
    np.testing.assert_array_equal(params[f"blocks_u_{i}"]["norm1_a"]["scale"], mae[f"blocks.{i}.norm1.weight"])
    np.testing.assert_array_equal(params[f"blocks_u_{i}"]["attn"]["qkv"]["kernel"],
                                  mae[f"blocks.{i}.attn.qkv.weight"].T)
