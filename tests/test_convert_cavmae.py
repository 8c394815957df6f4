"""Released CAV-MAE checkpoints -> our params -> the original's layout (tiny configs)."""

import dataclasses
import re

import ml_collections
import numpy as np
import pytest

from cav_mae_jax import models
from cav_mae_jax.convert import cavmae_checkpoint
from cav_mae_jax.convert import export
from cav_mae_jax.convert import init_source
from cav_mae_jax.convert import state_dict as sd
from cav_mae_jax.models import pos_embed as sincos
from test_convert_imagenet_mae import mae_shapes
from test_convert_layout import Dims, original_shapes, random_state_dict

TINY = Dims()
TINY_FT = dataclasses.replace(TINY, num_classes=5)


def _init(dims, seed=100):
  """Stand-in for a target model's init params with the original's tree."""
  return sd.torch_to_flax(random_state_dict(dims, seed=seed))


def _released(dims, seed=0):
  """A state dict as the released files store it: DataParallel's 'module.' prefix on every key."""
  return {"module." + k: v for k, v in random_state_dict(dims, seed=seed).items()}


def test_pretraining_checkpoint_round_trip_is_bit_identical():
  released = _released(TINY)
  params, report = cavmae_checkpoint.cavmae_to_params(released, _init(TINY))
  assert not report.unexpected and not report.dropped and not report.kept_init
  back, notes = export.to_original_state_dict(params, module_prefix=True)
  assert not notes and set(back) == set(released)
  for key, value in released.items():
    assert back[key].dtype == value.dtype and back[key].tobytes() == value.tobytes(), key


def test_the_originals_adapted_imagenet_mae_file_converts_without_its_cls_tokens():
  # src/adapt_vmae_weights.py (the recipes' ori_mae_11_for_pretrain.pth) attaches MAE's CLS
  # token three times to a CAVMAE whose forward uses none; the original loads it with
  # strict=False. It was refused: "3 source arrays have no place in the target model".
  plain = random_state_dict(TINY, seed=0)
  cls = np.random.default_rng(1).standard_normal((1, 1, TINY.embed_dim)).astype(np.float32)
  adapted = {**plain, "cls_token_a": cls, "cls_token_v": cls, "cls_token_av": cls}
  params, report = cavmae_checkpoint.cavmae_to_params(adapted, _init(TINY))
  expected, _ = cavmae_checkpoint.cavmae_to_params(plain, _init(TINY))
  assert sd.flatten_params(params).keys() == sd.flatten_params(expected).keys()
  for path, value in sd.flatten_params(expected).items():
    assert sd.flatten_params(params)[path].tobytes() == value.tobytes(), path
  assert sorted(report.dropped) == ["cls_token_a", "cls_token_av", "cls_token_v"]
  assert not report.unexpected


def test_pretraining_checkpoint_to_finetuning_model_with_new_head():
  released = _released(TINY)
  init = _init(TINY_FT)
  params, report = cavmae_checkpoint.cavmae_to_params(released, init, new_head=True)
  np.testing.assert_array_equal(params["mlp_head_1"]["kernel"], init["mlp_head_1"]["kernel"])
  np.testing.assert_array_equal(params["blocks_u_0"]["attn"]["qkv"]["kernel"],
                                released["module.blocks_u.0.attn.qkv.weight"].T)
  assert report.dropped["decoder_pred_a/kernel"].startswith("decoder")
  assert report.dropped["mask_token"].startswith("decoder")
  assert set(report.kept_init) == {"mlp_head_0/scale", "mlp_head_0/bias", "mlp_head_1/kernel",
                                   "mlp_head_1/bias"}
  summary = report.summary()
  assert "decoder_blocks_*/* (20 arrays)  (decoder, not part of the target model)" in summary
  assert "mlp_head_*/* (4 arrays)  (new classification head)" in summary


def test_a_float16_checkpoint_is_cast_and_the_cast_listed_by_module():
  # Every array of a float16 checkpoint was named on one line (17,390 characters for the base
  # model).
  released = {key: value.astype(np.float16) for key, value in _released(TINY).items()}
  params, report = cavmae_checkpoint.cavmae_to_params(released, _init(TINY))
  assert params["blocks_u_0"]["attn"]["qkv"]["kernel"].dtype == np.float32
  np.testing.assert_array_equal(params["blocks_u_0"]["attn"]["qkv"]["kernel"],
                                released["module.blocks_u.0.attn.qkv.weight"].T)
  summary = report.summary().splitlines()
  start = summary.index(f"cast to the target dtype: {len(report.cast)}")
  assert len(report.cast) == len(report.mapped) and "  blocks_a_*/* (" in summary[start + 1:][0]
  assert max(map(len, summary)) < 100


def test_pretraining_checkpoint_without_new_head_names_the_head():
  with pytest.raises(sd.ParamsMismatchError, match=r"new_head=True.*mlp_head_0/scale"):
    cavmae_checkpoint.cavmae_to_params(_released(TINY), _init(TINY_FT))


def test_a_checkpoint_of_another_block_layout_says_so():
  # An 11+1 checkpoint given to a vanilla AV-MAE (0+12) or audio-only config listed the 20 or
  # 220 missing block arrays and never said that the layouts differ.
  target = dataclasses.replace(TINY, modality_specific_depth=1)  # 1 + 2 blocks, the source 2 + 1
  with pytest.raises(sd.ParamsMismatchError, match=r"the checkpoint has 2 modality-specific and 1 "
                     r"joint blocks, the config 1 and 2: set config.model.modality_specific_depth"
                     r"=2 and encoder_depth=3"):
    cavmae_checkpoint.cavmae_to_params(_released(TINY), _init(target))


def test_a_checkpoint_with_blocks_the_config_lacks_says_so_in_one_short_line():
  # An 11 + 1 checkpoint given to a 1 + 1 config missed nothing and listed every array of the
  # ten blocks too many (360 names, a 9,400-character line), with a Python argument's name.
  target = dataclasses.replace(TINY, encoder_depth=2, modality_specific_depth=1)  # source 2 + 1
  with pytest.raises(sd.ParamsMismatchError) as info:
    cavmae_checkpoint.cavmae_to_params(_released(TINY), _init(target))
  assert re.match(r"\d+ source arrays have no place in the target model \(the checkpoint has 2 "
                  r"modality-specific and 1 joint blocks, the config 1 and 1: set "
                  r"config.model.modality_specific_depth=2 and encoder_depth=3", str(info.value))
  assert re.search(r"blocks_a_1/.*\.\.\. \(\d+ more\)$", str(info.value))
  assert len(str(info.value)) < 2000
  with pytest.raises(sd.ParamsMismatchError, match=r"no place in the target model \(wrong "
                     r"architecture or config\? allow_unexpected ignores them: "
                     r"--allow_unexpected of tools/convert.py, config.init.allow_unexpected"):
    state = {**_released(TINY), "module.extra": np.zeros(3, np.float32)}
    cavmae_checkpoint.cavmae_to_params(state, _init(TINY))


@pytest.mark.parametrize("modality_specific_depth", [1, 0])
def test_a_single_modality_mae_given_to_an_audiovisual_model_says_so(modality_specific_depth):
  """An audio-only MAE's checkpoint (configs/pretrain.py:<recipe>,audio_mae) given to the default
  fine-tuning model was told to set the block counts; following that, it listed the missing
  visual branch with no hint. Its config is encoder=audio_mae."""
  import jax  # pylint: disable=import-outside-toplevel
  sizes = dict(embed_dim=32, num_heads=2, encoder_depth=2, decoder_embed_dim=16,
               decoder_depth=1, decoder_num_heads=2, audio_length=64, image_size=32)
  audio_mae = models.ModelConfig.from_config(models.model_config(
      "tiny", modalities="audio", modality_specific_depth=0, lambda_c=0.0, **sizes))
  params = jax.tree.map(np.asarray, models.init_params(audio_mae, jax.random.PRNGKey(0)))
  state, _ = export.to_original_state_dict(params)
  target = models.ModelConfig.from_config(models.model_config(
      "tiny", num_classes=3, modality_specific_depth=modality_specific_depth, **sizes))
  init = jax.tree.map(np.asarray, models.init_params(target, jax.random.PRNGKey(1),
                                                     finetune=True))
  with pytest.raises(sd.ParamsMismatchError, match=r"\(it is a single-modality MAE's: the audio "
                     r"branch only, one shared encoder; load it into the model of configs/"
                     r"finetune\.py:<recipe>,encoder=audio_mae, which sets config\.model\."
                     r"modalities='audio'"):
    cavmae_checkpoint.cavmae_to_params(state, init, new_head=True)
  pretraining = jax.tree.map(np.asarray, models.init_params(target, jax.random.PRNGKey(1)))
  with pytest.raises(sd.ParamsMismatchError, match=r"the model of configs/pretrain\.py:<recipe>,"
                     r"audio_mae, which sets"):
    cavmae_checkpoint.cavmae_to_params(state, pretraining)


def test_an_incomplete_checkpoint_is_not_told_to_use_new_head():
  """The new_head hint only where the head alone is missing: following it would still fail."""
  released = _released(TINY)
  incomplete = {k: v for k, v in released.items() if "blocks_a.0." not in k}
  with pytest.raises(sd.ParamsMismatchError, match="blocks_a_0") as error:
    cavmae_checkpoint.cavmae_to_params(incomplete, _init(TINY_FT))
  assert "new_head" not in str(error.value)


def test_finetuned_checkpoint_where_pretraining_is_expected_names_what_is_missing():
  with pytest.raises(sd.ParamsMismatchError,
                     match=r"fine-tuned checkpoint has no decoder.*decoder_embed/kernel.*mask_token"):
    cavmae_checkpoint.cavmae_to_params(_released(TINY_FT), _init(TINY))


def test_a_state_dict_of_another_model_is_named_as_such():
  # It used to be blamed on a missing decoder (the first hint that matched).
  other = {"encoder.layer.0.weight": np.zeros(3, np.float32), "head.bias": np.zeros(2, np.float32)}
  with pytest.raises(sd.ParamsMismatchError) as info:
    cavmae_checkpoint.cavmae_to_params(other, _init(TINY))
  message = str(info.value)
  assert "not a CAV-MAE checkpoint; its keys: encoder.layer.0.weight, head.bias)" in message
  assert "decoder" not in message.split(":")[0]



@pytest.mark.parametrize("decoder", [True, False], ids=["with_decoder", "encoder_only"])
def test_an_imagenet_mae_checkpoint_is_named_as_such(decoder):
  # With its decoder (whose names are ours) it was said to be a fine-tuned checkpoint without one.
  mae = {k: np.zeros(s, np.float32) for k, s in mae_shapes(TINY, decoder=decoder).items()}
  for target in (_init(TINY), _init(TINY_FT)):
    with pytest.raises(sd.ParamsMismatchError) as info:
      cavmae_checkpoint.cavmae_to_params({"module." + k: v for k, v in mae.items()}, target)
    hint = str(info.value).split(": ")[0]
    assert hint.endswith("(it is in ImageNet MAE's layout, with cls_token, patch_embed and "
                         "blocks.N"), hint
    assert "fine-tuned" not in hint and "not a CAV-MAE" not in hint


def test_a_fine_tuned_checkpoint_of_a_compiled_model_keeps_its_head_as_an_init_source(
    monkeypatch):
  """torch.compile prefixes every key with '_orig_mod.': the head was not seen, so a fine-tuning
  run replaced it with a new one (listed as dropped) instead of starting from it."""
  released = random_state_dict(TINY_FT, seed=0)
  init = ml_collections.ConfigDict({"source": "cavmae", "path": "compiled.npz", "new_head": False,
                                    "audio_pos_resize": "", "allow_unexpected": False})
  config = models.model_config("tiny", embed_dim=16, num_heads=2, modality_specific_depth=2,
                               encoder_depth=3, decoder_embed_dim=8, decoder_num_heads=2,
                               decoder_depth=1, audio_length=64, image_size=32, num_classes=5)
  monkeypatch.setattr(init_source.formats, "read_state_dict",
                      lambda path: {"_orig_mod." + k: v for k, v in released.items()})
  params, report = init_source.load_init_params(init, config, finetune=True,
                                                init_params=_init(TINY_FT))
  assert not report.dropped and not report.kept_init
  np.testing.assert_array_equal(params["mlp_head_1"]["kernel"], released["mlp_head.1.weight"].T)

def test_other_class_count_needs_a_new_head():
  released = _released(TINY_FT)
  other = _init(dataclasses.replace(TINY_FT, num_classes=7))
  with pytest.raises(sd.ParamsMismatchError, match=r"mlp_head_1/kernel: source \(16, 5\) vs target \(16, 7\)"):
    cavmae_checkpoint.cavmae_to_params(released, other)
  params, report = cavmae_checkpoint.cavmae_to_params(released, other, new_head=True)
  assert params["mlp_head_1"]["kernel"].shape == (16, 7)
  assert "mlp_head_1/kernel" in report.dropped
  np.testing.assert_array_equal(params["norm"]["scale"], released["module.norm.weight"])


def test_wrong_depth_is_rejected():
  deeper = dataclasses.replace(TINY, modality_specific_depth=1)  # 1 + 2 joint blocks
  with pytest.raises(sd.ParamsMismatchError, match="blocks_u_1"):
    cavmae_checkpoint.cavmae_to_params(_released(TINY), _init(deeper))


@pytest.mark.parametrize("method", ["trim", "interpolate"])
def test_audio_length_change_resizes_both_audio_grids(method):
  source_dims = dataclasses.replace(TINY, audio_length=1024)  # 8 x 64 audio grid
  target_dims = dataclasses.replace(TINY, audio_length=512)  # 8 x 32
  released = _released(source_dims)
  with pytest.raises(sd.ParamsMismatchError, match="pos_embed_a.*audio_pos_resize"):
    cavmae_checkpoint.cavmae_to_params(released, _init(target_dims))
  params, report = cavmae_checkpoint.cavmae_to_params(released, _init(target_dims),
                                                      audio_pos_resize=method)
  for name, dim in (("pos_embed_a", 16), ("decoder_pos_embed_a", 8)):
    assert params[name].shape == (1, 256, dim)
    source = released[f"module.{name}"].reshape(8, 64, dim)
    if method == "trim":
      np.testing.assert_array_equal(params[name].reshape(8, 32, dim), source[:, :32])
    else:  # halving: each new column is the mean of two neighbours
      np.testing.assert_allclose(params[name].reshape(8, 32, dim),
                                 (source[:, 0::2] + source[:, 1::2]) / 2, rtol=1e-5, atol=1e-6)
  assert any(method in note and "8 x 64 -> 8 x 32" in note for note in report.notes)



def test_a_resize_that_has_nothing_to_do_says_so():
  # --audio_pos_resize with a checkpoint of the target's audio length did nothing, without a word.
  _, report = cavmae_checkpoint.cavmae_to_params(_released(TINY), _init(TINY),
                                                 audio_pos_resize="interpolate")
  assert report.notes == ["audio_pos_resize=interpolate: nothing resized (the checkpoint's audio "
                          "position grids already fit the target's audio length)"]
  _, report = cavmae_checkpoint.cavmae_to_params(_released(TINY), _init(TINY))
  assert report.notes == []

def test_sincos_recomputes_fixed_audio_grids_for_a_longer_input_and_refuses_trained_ones():
  source_dims = dataclasses.replace(TINY, audio_length=1024)  # 8 x 64 audio grid
  target_dims = dataclasses.replace(TINY, audio_length=2048)  # 8 x 128
  released = _released(source_dims)
  for name, dim in (("pos_embed_a", 16), ("decoder_pos_embed_a", 8)):  # pretraining: fixed
    released[f"module.{name}"] = sincos.sincos_2d(dim, 8, 64)[None]
  params, report = cavmae_checkpoint.cavmae_to_params(released, _init(target_dims),
                                                      audio_pos_resize="sincos")
  for name, dim in (("pos_embed_a", 16), ("decoder_pos_embed_a", 8)):
    np.testing.assert_array_equal(params[name], sincos.sincos_2d(dim, 8, 128)[None])
    # The first 64 time columns keep their codes; 'interpolate' would stretch them instead.
    np.testing.assert_array_equal(params[name].reshape(8, 128, dim)[:, :64],
                                  released[f"module.{name}"].reshape(8, 64, dim))
  assert any("sincos" in note and "8 x 64 -> 8 x 128" in note for note in report.notes)
  # 'interpolate' stretches a fixed table: done as asked, and the report says what fits it.
  _, report = cavmae_checkpoint.cavmae_to_params(released, _init(target_dims),
                                                 audio_pos_resize="interpolate")
  assert [note for note in report.notes if "stretched" in note] == [
      f"{name}: the checkpoint's table is the fixed sin-cos embedding; 'interpolate' stretched "
      "it (a model built at this length, as the original builds one, has it recomputed: "
      "audio_pos_resize='sincos')" for name in ("pos_embed_a", "decoder_pos_embed_a")]
  released["module.pos_embed_a"] = released["module.pos_embed_a"] + 1e-3  # trained in fine-tuning
  with pytest.raises(ValueError, match="not the fixed sin-cos.*use method='interpolate'"):
    cavmae_checkpoint.cavmae_to_params(released, _init(target_dims), audio_pos_resize="sincos")


def test_unexpected_source_keys_are_errors_unless_allowed():
  released = _released(TINY)
  released["module.extra_token"] = np.zeros((1, 1, 16), np.float32)
  with pytest.raises(sd.ParamsMismatchError, match="extra_token"):
    cavmae_checkpoint.cavmae_to_params(released, _init(TINY))
  _, report = cavmae_checkpoint.cavmae_to_params(released, _init(TINY), allow_unexpected=True)
  assert report.unexpected == ["extra_token"]


def test_learned_temperature_is_kept_at_init_and_left_out_of_the_export():
  init = _init(TINY)
  init["log_temperature"] = np.asarray(np.log(0.05), np.float32)
  params, report = cavmae_checkpoint.cavmae_to_params(_released(TINY), init)
  assert report.kept_init == {"log_temperature": "not in the original model"}
  back, notes = export.to_original_state_dict(params)
  assert "log_temperature" not in back and "log_temperature" in notes[0]
  assert set(back) == set(original_shapes(TINY))


def test_eval_export_casts_floats(tmp_path):
  from cav_mae_jax.convert import io  # pylint: disable=import-outside-toplevel
  params, _ = cavmae_checkpoint.cavmae_to_params(_released(TINY_FT), _init(TINY_FT))
  export.export_for_eval(params, {"num_classes": 5}, tmp_path / "eval", dtype="bfloat16")
  restored = io.load_params(tmp_path / "eval")
  kernel = restored["mlp_head_1"]["kernel"]
  assert str(kernel.dtype) == "bfloat16"
  np.testing.assert_allclose(np.asarray(kernel, np.float32), params["mlp_head_1"]["kernel"],
                             rtol=1e-2, atol=1e-2)
  assert io.load_model_config(tmp_path / "eval") == {"num_classes": 5}
  with pytest.raises(ValueError, match="export dtype 'int8'"):
    export.export_for_eval(params, {}, tmp_path / "eval8", dtype="int8")
  assert not (tmp_path / "eval8").exists()


def test_width_mismatch_is_named_as_a_width_not_an_audio_length():
  import jax  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.convert import cavmae_checkpoint  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.convert import state_dict as sd_lib  # pylint: disable=import-outside-toplevel
  source = {"pos_embed_a": np.zeros((1, 512, 768), np.float32)}
  target = {"pos_embed_a": jax.ShapeDtypeStruct((1, 512, 64), np.float32)}
  with pytest.raises(sd_lib.ParamsMismatchError, match="different width") as error:
    cavmae_checkpoint.cavmae_to_params(source, target)
  assert "audio length" not in str(error.value)
  target = {"pos_embed_a": jax.ShapeDtypeStruct((1, 256, 768), np.float32)}
  with pytest.raises(sd_lib.ParamsMismatchError, match="different audio length"):
    cavmae_checkpoint.cavmae_to_params(source, target)
