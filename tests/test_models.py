"""Model family: parameter counts, variants, dtypes, and input/config validation."""

import contextlib
import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cav_mae_jax import models
from cav_mae_jax.models import CAVMAE, CAVMAEFT, ModelConfig, model_config

ROOT = Path(__file__).resolve().parents[1]
# Small inputs and two encoder blocks (one modality-specific, one joint) keep compile time low.
SMALL = dict(audio_length=64, image_size=32, encoder_depth=2, modality_specific_depth=1)


def _cfg(**overrides) -> ModelConfig:
  return ModelConfig.from_config(model_config("tiny", **{**SMALL, **overrides}))


def _inputs(cfg: ModelConfig, batch: int = 4, seed: int = 0):
  ka, kv = jax.random.split(jax.random.key(seed))
  audio = jax.random.normal(ka, (batch, cfg.audio_length, cfg.num_mel_bins))
  image = jax.random.normal(kv, (batch, cfg.image_size, cfg.image_size, 3))
  return audio, image


def _init(model, audio, image):
  return jax.jit(model.init)({"params": jax.random.key(0), "mask": jax.random.key(1)}, audio, image)


def _init_and_run(model, audio, image, **kwargs):
  """Initializes and runs a pretraining model in one compiled function (one compile per test)."""
  @jax.jit
  def run(audio, image):
    variables = model.init({"params": jax.random.key(0), "mask": jax.random.key(1)}, audio, image)
    return variables["params"], model.apply(variables, audio, image, rngs={"mask": jax.random.key(2)},
                                            **kwargs)
  return run(audio, image)


# ---- Parameter counts of the paper's model (eval_shape only; nothing is materialized). ----

@pytest.fixture(scope="module")
def base_shapes():
  return models.param_shapes(model_config("base"))


def test_base_pretraining_counts_match_original(base_shapes):
  mask = models.requires_grad_mask(base_shapes, model_config("base"))
  assert models.count_params(base_shapes) == 191_036_160
  assert round(models.count_params(base_shapes, mask) / 1e6, 2) == 190.13
  decoder = {k: v for k, v in base_shapes.items() if k.startswith("decoder") or k == "mask_token"}
  encoder = {k: v for k, v in base_shapes.items() if k not in decoder}
  assert round(models.count_params(encoder) / 1e6, 2) == 164.50
  assert round(models.count_params(decoder) / 1e6, 2) == 26.54


def test_base_finetuning_count_matches_original():
  shapes = models.param_shapes(model_config("base", num_classes=527, trainable_pos_embed=True),
                               finetune=True)
  assert round(models.count_params(shapes) / 1e6, 3) == 164.907
  assert shapes["mlp_head_1"]["kernel"].shape == (768, 527)


def test_every_block_owns_six_layer_norms(base_shapes):
  for name in ("blocks_a_0", "blocks_v_10", "blocks_u_0", "decoder_blocks_7"):
    block = base_shapes[name]
    assert {"norm1", "norm1_a", "norm1_v", "norm2", "norm2_a", "norm2_v", "attn", "mlp"} == set(block)
  assert base_shapes["blocks_a_0"]["attn"]["qkv"]["kernel"].shape == (768, 2304)
  assert base_shapes["patch_embed_a"]["proj"]["kernel"].shape == (16, 16, 1, 768)
  assert base_shapes["pos_embed_a"].shape == (1, 512, 768)
  assert base_shapes["decoder_pred_v"]["kernel"].shape == (512, 768)


@pytest.mark.parametrize("config, total, trainable", [
    ("configs/pretrain.py:base", 191_036_160, 190_129_920),  # grouped contrast (batch 48 / 4)
    ("configs/finetune.py:as2m", 164_907_023, 164_907_023),
])
def test_model_summary_tool_prints_total_last(config, total, trainable):
  result = subprocess.run([sys.executable, str(ROOT / "tools/model_summary.py"), "--config",
                           str(ROOT / config)], capture_output=True, text=True, check=True, cwd=ROOT)
  lines = result.stdout.strip().splitlines()
  assert lines[-1] == f"total_params {total}"
  assert lines[-2] == f"trainable_params {trainable}"
  assert "encoder_params 164500224" in lines  # the original's encoder count, any head
  names = [line.split()[0] for line in lines if line.startswith("  ")]
  assert names.index("blocks_a_2") < names.index("blocks_a_10")  # natural order
  if "pretrain" in config:
    assert "decoder_params 26535936" in lines and "encoder/audio: 78,625,536" in lines


# ---- Behaviour on tiny models. ----

def test_pos_embed_matches_reference_formula():
  from cav_mae_jax.models.pos_embed import sincos_2d
  dim, rows, cols = 16, 8, 64
  table = sincos_2d(dim, rows, cols)
  k = 3 * cols + 5  # row 3, column 5
  w = 10000.0 ** (-np.arange(dim // 4) / (dim / 4))
  e = lambda p: np.concatenate([np.sin(p * w), np.cos(p * w)])
  np.testing.assert_allclose(table[k], np.concatenate([e(5), e(3)]).astype(np.float32), atol=1e-7)
  assert table.dtype == np.float32


@pytest.fixture(scope="module")
def tiny_params():
  cfg = _cfg()
  return _init(CAVMAE(cfg), *_inputs(cfg))["params"]


def test_pretraining_outputs_and_fixed_pos_embeds_get_no_gradient(tiny_params):
  cfg = _cfg()
  audio, image = _inputs(cfg)
  model = CAVMAE(cfg)
  params = tiny_params
  loss_fn = lambda p: model.apply({"params": p}, audio, image, rngs={"mask": jax.random.key(2)})["loss"]
  grads = jax.jit(jax.grad(loss_fn))(params)
  assert float(jnp.abs(grads["pos_embed_a"]).max()) == 0.0
  assert float(jnp.abs(grads["decoder_pos_embed_v"]).max()) == 0.0
  assert float(jnp.abs(grads["modality_a"]).max()) > 0.0
  mask = models.trainable_mask(params, cfg)
  assert not mask["pos_embed_v"] and mask["blocks_a_0"]["attn"]["qkv"]["kernel"]
  assert not mask["blocks_a_0"]["norm1_a"]["scale"] and mask["blocks_u_0"]["norm1_a"]["scale"]


def test_bfloat16_compute_keeps_float32_params_and_losses(tiny_params):
  cfg16 = _cfg(dtype="bfloat16")
  audio, image = _inputs(cfg16)
  variables = {"params": tiny_params}
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  out16 = jax.jit(lambda v: CAVMAE(cfg16).apply(v, audio, image, rngs={"mask": jax.random.key(3)}))(variables)
  out32 = jax.jit(lambda v: CAVMAE(_cfg()).apply(v, audio, image, rngs={"mask": jax.random.key(3)}))(variables)
  for key in ("loss", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc"):
    assert out16[key].dtype == jnp.float32
  assert abs(float(out16["loss"]) - float(out32["loss"])) < 0.05 * float(out32["loss"])
  assert float(out16["loss"]) != float(out32["loss"])  # bf16 really changed the compute


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable", "attention_only"])
def test_remat_gives_the_same_parameters_losses_and_gradients(tiny_params, policy):
  """config.model.remat only recomputes activations: same tree, same losses and gradients."""
  cfg, remat_cfg = _cfg(), _cfg(remat=True, remat_policy=policy)
  audio, image = _inputs(cfg)
  remat_params = models.param_shapes(remat_cfg)
  assert jax.tree.structure(remat_params) == jax.tree.structure(tiny_params)

  def loss_and_grads(config):
    loss_fn = lambda p: CAVMAE(config).apply({"params": p}, audio, image,
                                             rngs={"mask": jax.random.key(2)})["loss"]
    return jax.jit(jax.value_and_grad(loss_fn))(tiny_params)

  loss, grads = loss_and_grads(cfg)
  remat_loss, remat_grads = loss_and_grads(remat_cfg)
  np.testing.assert_allclose(float(remat_loss), float(loss), rtol=1e-6)
  for g, rg in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
    np.testing.assert_allclose(rg, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant, overrides, decoder, contrast", [
    ("cav_mae", {}, True, True),
    ("av_mae", dict(lambda_c=0.0), True, False),
    ("vanilla_av_mae", dict(lambda_c=0.0, modality_specific_depth=0), True, False),
    ("cav", dict(lambda_mae=0.0), False, True),
    ("audio_mae", dict(modalities="audio", lambda_c=0.0, modality_specific_depth=0), True, False),
    ("visual_mae", dict(modalities="visual", lambda_c=0.0, modality_specific_depth=0), True, False),
])
def test_variants(variant, overrides, decoder, contrast):
  cfg = _cfg(**overrides)
  audio, image = _inputs(cfg)
  params, out = _init_and_run(CAVMAE(cfg), audio, image)
  assert any(k.startswith("decoder") for k in params) == decoder
  assert (float(out["loss_c"]) > 0) == contrast
  assert (float(out["loss_mae"]) > 0) == decoder
  np.testing.assert_allclose(float(out["loss"]), float(out["loss_mae"]) + float(out["loss_c"]), rtol=1e-6)
  if variant == "vanilla_av_mae":
    assert not any(k.startswith("blocks_a") for k in params)
    assert sum(k.startswith("blocks_u") for k in params) == cfg.encoder_depth
  if variant == "audio_mae":
    assert "patch_embed_v" not in params and float(out["loss_mae_v"]) == 0.0
  if variant == "visual_mae":
    assert "patch_embed_a" not in params and float(out["loss_mae_a"]) == 0.0


def test_finetuning_modes_and_features():
  cfg = _cfg(num_classes=7, trainable_pos_embed=True)
  audio, image = _inputs(cfg)
  model = CAVMAEFT(cfg)

  @jax.jit
  def run(audio, image):
    variables = model.init(jax.random.key(0), audio, image)
    # Freshly initialized LayerNorms are all identical; make the joint and audio norms differ.
    variables["params"]["norm_a"]["bias"] = variables["params"]["norm_a"]["bias"] + jnp.linspace(-1.0, 1.0, cfg.embed_dim)
    logits = {mode: model.apply(variables, audio, image, mode=mode) for mode in models.FT_MODES}
    logits["audio_alone"] = model.apply(variables, audio, None, mode="audioonly")
    logits["video_alone"] = model.apply(variables, None, image, mode="missingvideoonly")
    return logits, model.apply(variables, audio, image, method="features")

  logits, (a, v) = run(audio, image)
  for mode in models.FT_MODES:
    assert logits[mode].shape == (4, 7) and logits[mode].dtype == jnp.float32
  # Single-modality modes ignore the other modality entirely.
  np.testing.assert_allclose(logits["audio_alone"], logits["audioonly"], rtol=1e-6)
  np.testing.assert_allclose(logits["video_alone"], logits["missingvideoonly"], rtol=1e-6)
  assert not np.allclose(logits["multimodal"], logits["audioonly"])
  assert not np.allclose(logits["missingaudioonly"], logits["audioonly"])
  assert a.shape == (4, cfg.num_audio_patches, cfg.embed_dim) and v.shape == (4, cfg.num_image_patches, cfg.embed_dim)


def test_streams_are_the_unmasked_encoder_streams():
  cfg = _cfg(mask_ratio_a=0.0, mask_ratio_v=0.0)
  audio, image = _inputs(cfg, batch=2)
  model = CAVMAE(cfg)
  keep_order = lambda count: jnp.tile(jnp.arange(count, dtype=jnp.float32), (2, 1))

  @jax.jit
  def run(audio, image):
    variables = model.init({"params": jax.random.key(0), "mask": jax.random.key(1)}, audio, image)
    # Freshly initialized LayerNorms are identical; make the three final norms differ.
    for i, name in enumerate(("norm", "norm_a", "norm_v")):
      variables["params"][name]["bias"] = variables["params"][name]["bias"] + i
    encoded = model.apply(variables, audio, image, noise_a=keep_order(cfg.num_audio_patches),
                          noise_v=keep_order(cfg.num_image_patches), method="encode")
    return encoded, model.apply(variables, audio, image, method="streams")

  encoded, streams = run(audio, image)
  np.testing.assert_allclose(streams["joint"], encoded["x"], atol=1e-5)
  np.testing.assert_allclose(streams["audio"], encoded["latent_c_a"], atol=1e-5)
  np.testing.assert_allclose(streams["video"], encoded["latent_c_v"], atol=1e-5)
  assert streams["joint"].shape == (2, cfg.num_audio_patches + cfg.num_image_patches, cfg.embed_dim)


@pytest.mark.parametrize("modalities", ["audio", "visual"])
def test_single_modality_mae_stream_and_finetuning(modalities):
  """A single-modality MAE trains only the joint LayerNorms, and has no norm_a / norm_v: its one
  stream (features, HEAR) is the pretraining encoder's, and fine-tuning it pools that stream in
  ft_mode 'multimodal'. Its stream used to need norm_a/norm_v (a Flax error), and an
  audio-only model could not fine-tune in the modes it could be configured with."""
  from cav_mae_jax.convert import cavmae_checkpoint, export, state_dict  # pylint: disable=import-outside-toplevel
  single = dict(modalities=modalities, lambda_c=0.0, modality_specific_depth=0)
  cfg = _cfg(mask_ratio_a=0.0, mask_ratio_v=0.0, **single)
  audio, image = _inputs(cfg, batch=2)
  audio, image = (audio, None) if modalities == "audio" else (None, image)
  stream, letter = ("audio", "a") if modalities == "audio" else ("video", "v")
  model = CAVMAE(cfg)
  params = _init(model, audio, image)["params"]
  assert "norm" in params and f"norm_{letter}" not in params
  keep_order = jnp.tile(jnp.arange(cfg.num_audio_patches if audio is not None else
                                   cfg.num_image_patches, dtype=jnp.float32), (2, 1))
  noise = {"noise_a": keep_order} if audio is not None else {"noise_v": keep_order}
  encoded = model.apply({"params": params}, audio, image, method="encode", **noise)
  streams = model.apply({"params": params}, audio, image, method="streams")
  assert set(streams) == {stream}
  np.testing.assert_allclose(streams[stream], encoded["x"], atol=1e-5)

  host_params = jax.tree.map(np.asarray, params)
  for ft_mode in ("multimodal", f"{stream}only", f"missing{stream}only"):
    ft_cfg = _cfg(num_classes=5, ft_mode=ft_mode, **single)
    ft_model = CAVMAEFT(ft_cfg)
    ft_init = jax.tree.map(np.asarray, _init(ft_model, audio, image)["params"])
    if ft_mode != "multimodal":  # their pooling runs norm_a / norm_v, which the MAE never trained
      with pytest.raises(state_dict.ParamsMismatchError, match="ft_mode='multimodal'"):
        cavmae_checkpoint.cavmae_to_params(export.to_original_state_dict(host_params)[0],
                                           ft_init, new_head=True)
      logits = ft_model.apply({"params": ft_init}, audio, image)
      assert logits.shape == (2, 5)
      if not ft_mode.startswith("missing"):  # it has no joint final norm
        with pytest.raises(ValueError, match="does not have"):
          ft_model.apply({"params": ft_init}, audio, image, mode="multimodal")
      continue
    assert "norm" in ft_init and f"norm_{letter}" not in ft_init
    ft_params, _ = cavmae_checkpoint.cavmae_to_params(
        export.to_original_state_dict(host_params)[0], ft_init, new_head=True)
    ft_streams = ft_model.apply({"params": ft_params}, audio, image, method="streams")
    np.testing.assert_allclose(ft_streams[stream], streams[stream], atol=1e-5)
    np.testing.assert_allclose(ft_model.apply({"params": ft_params}, audio, image),
                               ft_model.apply({"params": ft_params}, audio, image,
                                              mode=f"{stream}only"), rtol=1e-6)


def test_single_modality_finetuning_config():
  from configs import finetune  # pylint: disable=import-outside-toplevel
  config = finetune.get_config("tiny,encoder=audio_mae")
  assert (config.model.modalities, config.model.modality_specific_depth) == ("audio", 0)
  assert finetune.get_config("tiny,encoder=vanilla_avmae").model.modality_specific_depth == 0
  with pytest.raises(ValueError, match="ft_mode='videoonly': needs the video"):
    finetune.get_config("tiny,encoder=audio_mae,mode=videoonly")
  with pytest.raises(ValueError, match="encoder='cav'"):
    finetune.get_config("tiny,encoder=cav")


def test_unpatchify_inverts_patchify():
  from cav_mae_jax.models import losses  # pylint: disable=import-outside-toplevel
  images = np.random.default_rng(0).standard_normal((2, 32, 48, 3)).astype(np.float32)
  patches = losses.patchify(images, 16)
  assert patches.shape == (2, 6, 768)
  np.testing.assert_array_equal(losses.unpatchify(patches, (2, 3), 16), images)


def test_inpaint_returns_reconstructions_and_masks():
  cfg = _cfg(norm_pix_loss=False)
  audio, image = _inputs(cfg)
  _, out = _init_and_run(CAVMAE(cfg), audio, image, method="inpaint")
  assert out["pred_a"].shape == (4, cfg.num_audio_patches, 256)
  assert out["pred_v"].shape == (4, cfg.num_image_patches, 768)
  assert out["mask_a"].shape == (4, cfg.num_audio_patches)


# ---- Bad input: ValueError naming the field, raised in Python before any tracing. ----

@pytest.mark.parametrize("overrides, field", [
    (dict(mask_ratio_a=1.0), "mask_ratio_a"),
    (dict(mask_ratio_v=-0.1), "mask_ratio_v"),
    (dict(mask_mode_a="diagonal"), "mask_mode_a"),
    (dict(ft_mode="bimodal"), "ft_mode"),
    (dict(audio_length=1000), "audio_length"),
    (dict(num_heads=5), "num_heads"),
    (dict(modality_specific_depth=3), "modality_specific_depth"),
    (dict(dtype="float16"), "dtype"),
    (dict(remat=True, remat_policy="save_everything"), "remat_policy"),
    (dict(remat=True, remat_policy="attention_only", attention_impl="cudnn"), "remat_policy"),
    (dict(attention_impl="cudnn", dtype="float32"), "attention_impl"),
    (dict(modalities="audio"), "lambda_c"),
    (dict(contrast_group_size=-2), "contrast_group_size"),
    (dict(mask_ratio_a="0.75"), "mask_ratio_a"),
    (dict(dropout=0.1), "dropout"),
])
def test_bad_config_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    model_config("tiny", **overrides)


def test_bad_inputs_name_the_field():
  """The checks run when the model is traced: abstract evaluation is enough to reach them."""
  cfg = _cfg(contrast_group_size=3)
  model = CAVMAE(cfg)
  audio, image = _inputs(cfg, batch=6)
  rngs = {"params": jax.random.key(0), "mask": jax.random.key(1)}
  with pytest.raises(ValueError, match="audio_length"):
    jax.eval_shape(model.init, rngs, audio[:, :48], image)
  with pytest.raises(ValueError, match="num_mel_bins"):
    jax.eval_shape(model.init, rngs, audio[:, :, :64], image)
  with pytest.raises(ValueError, match="image_size"):
    jax.eval_shape(model.init, rngs, audio, image[:, :16, :16])
  # init: any batch (params do not depend on it)
  params = jax.eval_shape(model.init, rngs, audio[:1], image[:1])
  with pytest.raises(ValueError, match="contrast_group_size"):
    jax.eval_shape(lambda p: model.apply(p, audio[:4], image[:4],
                                         rngs={"mask": jax.random.key(1)}), params)
  with pytest.raises(ValueError, match="fine-tuning mode"):
    jax.eval_shape(lambda: CAVMAEFT(_cfg()).init(jax.random.key(0), audio, image, mode="stereo"))
  with pytest.raises(ValueError, match="image is required"):
    jax.eval_shape(lambda: CAVMAEFT(_cfg()).init(jax.random.key(0), audio, None,
                                                 mode="videoonly"))


# ---- The optimizer mask: exactly the parameters the objective reaches (torch: grad is not None). ----

def _zero_grad_tensors(grads) -> dict[str, bool]:
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  return {jax.tree_util.keystr(path): bool(jnp.all(g == 0)) for path, g in flat}


def _masked_out(mask) -> dict[str, bool]:
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  return {jax.tree_util.keystr(path): not m for path, m in flat}


def _assert_mask_matches_gradients(mask, grads):
  zero, masked_out = _zero_grad_tensors(grads), _masked_out(mask)
  fixed = {k for k in zero if any(f"'{name}'" in k for name in models.FIXED_POS_EMBEDS)}
  wrong = {k for k in zero if k not in fixed and zero[k] != masked_out[k]}
  assert not wrong, sorted(wrong)[:10]
  assert any(masked_out[k] for k in zero if k not in fixed)  # every model has unused norms


@pytest.mark.parametrize("overrides", [dict(lambda_c=0.0), dict(lambda_mae=0.0)], ids=["av_mae", "cav"])
def test_trainable_mask_is_what_pretraining_reaches(overrides):
  cfg = _cfg(**overrides)
  audio, image = _inputs(cfg)
  model = CAVMAE(cfg)

  @jax.jit
  def grads(audio, image):
    params = model.init({"params": jax.random.key(0), "mask": jax.random.key(1)}, audio, image)["params"]
    loss = lambda p: model.apply({"params": p}, audio, image, rngs={"mask": jax.random.key(2)})["loss"]
    return params, jax.grad(loss)(params)

  params, g = grads(audio, image)
  _assert_mask_matches_gradients(models.trainable_mask(params, cfg), g)


def test_trainable_mask_is_what_each_finetuning_mode_reaches():
  cfg = _cfg(num_classes=5, trainable_pos_embed=True)
  audio, image = _inputs(cfg)
  model = CAVMAEFT(cfg)
  weights = jax.random.normal(jax.random.key(3), (4, 5))

  @jax.jit
  def grads(audio, image):
    params = model.init(jax.random.key(0), audio, image)["params"]
    out = {}
    for mode in models.FT_MODES:
      loss = lambda p, mode=mode: jnp.sum(model.apply({"params": p}, audio, image, mode=mode) * weights)
      out[mode] = jax.grad(loss)(params)
    return params, out

  params, per_mode = grads(audio, image)
  for mode, g in per_mode.items():
    mode_cfg = ModelConfig.from_config(model_config("tiny", **{**SMALL, "ft_mode": mode,
                                                               "trainable_pos_embed": True}))
    _assert_mask_matches_gradients(models.trainable_mask(params, mode_cfg, finetune=True), g)


@pytest.mark.parametrize("length", [49, 50, 177])
def test_fused_attention_pads_odd_lengths_exactly(length):
  """The cuDNN path's call (here through XLA's implementation of the same jax.nn call, on a CPU):
  an odd token count gets one masked padding token; outputs and gradients are plain attention's."""
  from cav_mae_jax.models import vit  # pylint: disable=g-import-not-at-top
  q, k, v, w = jax.random.normal(jax.random.key(0), (4, 2, length, 3, 8))
  fused = lambda q, k, v: vit.fused_attention(q, k, v, implementation="xla")
  plain = lambda q, k, v: vit._attention_core(q, k, v, jnp.float32)  # pylint: disable=protected-access
  np.testing.assert_allclose(fused(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-6)
  grads = [jax.grad(lambda *x, f=f: jnp.sum(f(*x) * w), argnums=(0, 1, 2))(q, k, v)
           for f in (fused, plain)]
  for g_fused, g_plain in zip(*grads):
    np.testing.assert_allclose(g_fused, g_plain, rtol=1e-4, atol=1e-5)


def test_fused_attention_gives_cudnn_only_lengths_it_trains():
  """JAX's cuDNN attention refuses an odd token count under autodiff; fused_attention calls it
  with even ones only (JAX's own check, run on what it receives; a CPU needs no cuDNN for it)."""
  from cav_mae_jax.models import vit  # pylint: disable=g-import-not-at-top
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention  # pylint: disable=g-import-not-at-top
    check = cudnn_attention.check_is_flash_attention
    layout = cudnn_attention.AttentionLayout.BTNH.value
  except (ImportError, AttributeError) as e:
    pytest.skip(f"JAX's cuDNN shape check moved ({e})")

  def trains(q):  # as JAX checks a training call (its bias flag is set even without a bias)
    check(q, q, q, layout, 90000, True, True)

  q = jnp.zeros((2, 49, 3, 8))
  with pytest.raises(NotImplementedError, match="sequence length"):
    trains(q)
  received = []

  def record(q, k, v, **kwargs):
    received.append(q.shape)
    return q
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax.nn, "dot_product_attention", record)
    assert vit.fused_attention(q, q, q).shape == q.shape
  assert received == [(2, 50, 3, 8)]
  trains(jnp.zeros(received[0]))


# ---- bfloat16 compute: parameter gradients summed in float32. ----

@pytest.fixture
def no_half_precision_sums():
  """JAX's own check: any sum (reduce_sum) of bfloat16 or float16 values raises while tracing."""
  jax.config.update("jax_allow_f16_reductions", False)
  try:
    yield
  finally:
    jax.config.update("jax_allow_f16_reductions", True)


@pytest.mark.parametrize("module, arg, overrides", [
    ("pretrain", "tiny", {}),
    ("pretrain", "tiny,audio_mae", {}),
    ("pretrain", "tiny", {"trainable_pos_embed": True, "remat": True,
                          "remat_policy": "attention_only"}),
    ("finetune", "tiny", {}),
    ("finetune", "tiny,mode=missingvideoonly", {}),
    ("finetune", "tiny,probe", {}),
], ids=["pretrain", "audio_mae", "trainable_pos_remat", "finetune", "missing_video", "probe"])
def test_bfloat16_gradients_sum_nothing_in_bfloat16(no_half_precision_sums, module, arg,
                                                     overrides):
  """Every sum in every task's bfloat16 gradient runs in float32: XLA accumulates a bfloat16 sum
  in bfloat16 (a bias's gradient sums its cotangent over every token of the batch), which is
  what torch's autocast avoids. Traced only (nothing compiled)."""
  import importlib  # pylint: disable=g-import-not-at-top
  from cav_mae_jax import tasks  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import benchmark  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{module}").get_config(arg)
  with config.unlocked():
    config.model.update(dtype="bfloat16", **overrides)
  task = tasks.get_task(config)
  params = jax.eval_shape(task.init_params, jax.random.key(0))
  batch = benchmark.abstract_batch(task, 4)
  jax.make_jaxpr(jax.grad(task.loss_fn, has_aux=True))(params, batch, jax.random.key(1))


@pytest.mark.parametrize("layer", ["dense", "patch_conv"])
def test_dense_and_patch_conv_are_flax_layers_whose_bias_gradient_sums_in_float32(layer):
  """vit.Dense and vit.PatchConv have flax's nn.Dense's and nn.Conv's parameters, initial values
  and outputs, bit for bit in float32 and bfloat16; under bfloat16 their bias gradient is the
  float32 sum of the cotangents. flax's is a bfloat16 sum, which on this CPU stops growing once
  its spacing outgrows the addends: 8,192 for the Dense's 32,768 rows (sum 32,757), 2,048 for the
  conv's 8,192 patches (sum 8,199)."""
  from cav_mae_jax.models import vit  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2, 128, 128, 3))

  def layers(dtype):
    if layer == "dense":
      return vit.dense(16, "proj", dtype), nn.Dense(
          16, kernel_init=vit.dense_init, bias_init=nn.initializers.zeros, dtype=dtype,
          param_dtype=jnp.float32, name="proj")
    return vit.PatchConv(16, 2, dtype, name="proj"), nn.Conv(
        16, (2, 2), strides=(2, 2), padding="VALID", kernel_init=vit.patch_kernel_init,
        bias_init=vit.patch_bias_init(12), dtype=dtype, param_dtype=jnp.float32, name="proj")

  for dtype in (jnp.float32, jnp.bfloat16):
    ours, flax_layer = layers(dtype)
    params = ours.init(jax.random.key(1), x)
    flax_params = flax_layer.init(jax.random.key(1), x)
    assert jax.tree.map(np.asarray, params).keys() == flax_params.keys()
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(flax_params)):
      np.testing.assert_array_equal(a, b)
    out = ours.apply(params, x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, flax_layer.apply(params, x))

  cotangent = jax.random.uniform(jax.random.key(2), out.shape, jnp.float32, 0.5, 1.5)
  grad = jax.grad(lambda p: jnp.sum(ours.apply(p, x).astype(jnp.float32) * cotangent))(params)
  # The bfloat16 output's cotangent is the bfloat16-rounded `cotangent`; its exact sum per feature:
  exact = np.asarray(cotangent.astype(jnp.bfloat16), np.float64).reshape(-1, 16).sum(axis=0)
  assert grad["params"]["bias"].dtype == jnp.float32
  np.testing.assert_allclose(grad["params"]["bias"], exact, rtol=1e-5)


def test_gelu_rounds_once_in_bfloat16_and_its_backward_keeps_only_its_input():
  """vit.gelu on bfloat16: float32 exact GELU rounded once, forward and backward, keeping only
  the input for the backward; on float32: jax.nn.gelu with autodiff's gradient, bit for bit."""
  from cav_mae_jax.models import vit  # pylint: disable=g-import-not-at-top
  x32 = 2.0 * jax.random.normal(jax.random.key(0), (4096,))
  cotangent = jax.random.normal(jax.random.key(1), (4096,))
  exact = lambda v: jax.nn.gelu(v, approximate=False)

  x = x32.astype(jnp.bfloat16)
  np.testing.assert_array_equal(vit.gelu(x), exact(x.astype(jnp.float32)).astype(jnp.bfloat16))
  _, vjp = jax.vjp(vit.gelu, x)
  _, vjp_float32 = jax.vjp(exact, x.astype(jnp.float32))
  ct = cotangent.astype(jnp.bfloat16)
  np.testing.assert_array_equal(vjp(ct)[0],
                                vjp_float32(ct.astype(jnp.float32))[0].astype(jnp.bfloat16))
  backward = jax.make_jaxpr(lambda v: jax.vjp(vit.gelu, v)[1])(x).jaxpr
  from jax.extend import core as jax_core  # pylint: disable=g-import-not-at-top
  kept = [v for v in backward.outvars if isinstance(v, jax_core.Var) and v not in backward.invars]
  assert not kept, kept  # the backward keeps only x

  np.testing.assert_array_equal(vit.gelu(x32), exact(x32))
  np.testing.assert_array_equal(jax.vjp(vit.gelu, x32)[1](cotangent)[0],
                                jax.vjp(exact, x32)[1](cotangent)[0])


def test_layer_norm_is_flax_forward_and_its_bfloat16_backward_is_float32_math():
  """vit.layer_norm: flax's nn.LayerNorm's parameters and outputs bit for bit (float32 and
  bfloat16); float32 takes flax's gradient bit for bit; bfloat16's backward is the float32
  LayerNorm gradient of the bfloat16 input and cotangent (to its rounding; closer to it than
  autodiff's through flax), and keeps the input and two float32 row statistics only."""
  from cav_mae_jax.models import vit  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x32 = 3.0 * jax.random.normal(jax.random.key(0), (4, 37, 96)) + 1.0
  cotangent = jax.random.normal(jax.random.key(1), x32.shape)
  flax_norm = lambda dtype: nn.LayerNorm(epsilon=vit.LAYER_NORM_EPS, use_fast_variance=False,
                                         dtype=dtype, param_dtype=jnp.float32)
  params = flax_norm(jnp.float32).init(jax.random.key(2), x32)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape), params)

  def vjp(module, x, ct):
    out, pullback = jax.vjp(module.apply, params, x)
    return out, pullback(ct)

  for dtype in (jnp.float32, jnp.bfloat16):
    ours = vit.layer_norm("norm", dtype)
    assert jax.tree.map(np.shape, ours.init(jax.random.key(2), x32)) == jax.tree.map(
        np.shape, params)
    x, ct = x32.astype(dtype), cotangent.astype(dtype)
    out, grads = vjp(ours, x, ct)
    flax_out, flax_grads = vjp(flax_norm(dtype), x, ct)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, flax_out)
    if dtype == jnp.float32:
      for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(flax_grads)):
        np.testing.assert_array_equal(a, b)
  # bfloat16: the float32 LayerNorm's gradient at the same (bfloat16) input and cotangent.
  _, exact = vjp(flax_norm(jnp.float32), x.astype(jnp.float32), ct.astype(jnp.float32))
  np.testing.assert_allclose(grads[0]["params"]["scale"], exact[0]["params"]["scale"], rtol=1e-5)
  np.testing.assert_allclose(grads[0]["params"]["bias"], exact[0]["params"]["bias"], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grads[1], np.float32), exact[1], rtol=2**-8, atol=1e-6)
  error = lambda g: np.linalg.norm(np.asarray(g, np.float32) - exact[1])
  assert error(grads[1]) < 0.8 * error(flax_grads[1])  # 0.16% against 0.24%
  # No dtype: flax's output promotes to float32, and so does ours.
  x = x32.astype(jnp.bfloat16)
  np.testing.assert_array_equal(vit.LayerNorm().apply(params, x), nn.LayerNorm().apply(params, x))
  assert vit.LayerNorm().apply(params, x).dtype == jnp.float32
  for dtype in (jnp.float32, jnp.bfloat16):  # one call each, as flax's (capture_intermediates)
    _, state = vit.layer_norm("norm", dtype).apply(params, x32.astype(dtype), mutable=True,
                                                   capture_intermediates=True)
    assert len(state["intermediates"]["__call__"]) == 1, dtype
  # What the backward keeps: x itself and [4, 37, 1] float32 statistics.
  from jax.extend import core as jax_core  # pylint: disable=g-import-not-at-top
  backward = jax.make_jaxpr(lambda v: jax.vjp(ours.apply, params, v)[1])(x).jaxpr
  kept = [v.aval for v in backward.outvars if isinstance(v, jax_core.Var)
          and v not in backward.invars]
  assert all(a.size <= 4 * 37 for a in kept), kept


def _equations(jaxpr):
  """The equations of `jaxpr` and of every jaxpr inside them (custom_vjp calls, pjit, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for inner in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


def test_split_dense_is_dense_split_and_in_bfloat16_one_product_per_piece():
  """vit.SplitDense(features, 3): Dense(3 * features)'s parameters, and its output in three
  pieces: float32 bit for bit, forward and gradients; bfloat16 as three products, one per piece
  (no [..., 3 * features] output), with Dense's outputs and gradients to bfloat16's rounding."""
  from cav_mae_jax.models import vit  # pylint: disable=g-import-not-at-top
  x32 = jax.random.normal(jax.random.key(0), (4, 37, 48))
  cts32 = tuple(jax.random.normal(jax.random.key(i), (4, 37, 16)) for i in (1, 2, 3))
  params = vit.dense(48, "qkv", jnp.float32).init(jax.random.key(4), x32)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(5), p.shape), params)

  for dtype in (jnp.float32, jnp.bfloat16):
    split, fused = vit.SplitDense(16, 3, dtype, name="qkv"), vit.dense(48, "qkv", dtype)
    assert jax.tree.map(np.shape, split.init(jax.random.key(4), x32)) == jax.tree.map(
        np.shape, params)
    x, cts = x32.astype(dtype), tuple(ct.astype(dtype) for ct in cts32)
    out, pullback = jax.vjp(split.apply, params, x)
    ref, ref_pullback = jax.vjp(lambda p, v: tuple(jnp.split(fused.apply(p, v), 3, -1)),
                                params, x)
    grads, ref_grads = pullback(list(cts)), ref_pullback(cts)
    products = [e for e in _equations(jax.make_jaxpr(split.apply)(params, x).jaxpr)
                if e.primitive.name == "dot_general"]
    if dtype == jnp.float32:
      for a, b in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((ref, ref_grads))):
        np.testing.assert_array_equal(a, b)
      assert [e.outvars[0].aval.shape for e in products] == [(4, 37, 48)]
      continue
    assert [e.outvars[0].aval.shape for e in products] == [(4, 37, 16)] * 3
    # The backward keeps x once (autodiff through three products would keep it three times).
    from jax.extend import core as jax_core  # pylint: disable=g-import-not-at-top
    backward = jax.make_jaxpr(lambda v: jax.vjp(split.apply, params, v)[1])(x).jaxpr
    kept = [v.aval.shape for v in backward.outvars
            if isinstance(v, jax_core.Var) and v.aval.size >= x.size]
    assert kept == [x.shape], kept
    for a, b in zip(out, ref):
      assert a.dtype == dtype
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                 rtol=2**-7, atol=1e-2)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      assert np.linalg.norm(a - b) <= 2**-7 * np.linalg.norm(b)


def test_the_fsdp_step_moves_no_qkv_pieces_between_devices():
  """The tiny pretraining step in bfloat16 with its parameters split over 8 devices (fsdp=8):
  `mesh.fsdp_spec` splits a Linear's kernel [in, out] along `in`, so SplitDense's q, k and v
  slices are each device's own and XLA permutes nothing (split along `out`, the qkv kernel's
  largest dimension, the slices spanned devices: 119 collective permutes)."""
  from cav_mae_jax.train import benchmark  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import mesh  # pylint: disable=g-import-not-at-top
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec  # pylint: disable=g-import-not-at-top
  assert mesh.fsdp_spec((64, 192), 8) == PartitionSpec("fsdp", None)  # the tiny qkv kernel
  config = pretrain.get_config("tiny")
  with config.unlocked():
    config.model.update(dtype="bfloat16", contrast_group_size=2)
    config.mesh.update(data=1, fsdp=8)
  text = benchmark.setup_train_step(config, 16, jax.devices()[:8]).compile().as_text()
  assert "all-gather" in text and "collective-permute" not in text


def test_mean_tokens_is_the_float32_mean_and_pins_a_split_half_precision_stream_row_major():
  """models.mean_tokens: x.astype(float32).mean(1) bit for bit with the same gradient. Under
  `batch_split_over` (as the train step traces) a bfloat16 x and its gradient are constrained to
  the row-major layout shard by shard (a shard_map over the batch's mesh axes; XLA:GPU otherwise
  turns the whole encoder stream token-minor); a float32 x, or no split, is left alone."""
  from cav_mae_jax.models import vit  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  plain = lambda v: v.astype(jnp.float32).mean(axis=1)
  ct = jax.random.normal(jax.random.key(1), (8, 5))
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  ops = lambda f, v: str(jax.make_jaxpr(jax.grad(lambda u: f(u).sum()))(v))
  for dtype in (jnp.bfloat16, jnp.float32):
    x = jax.random.normal(jax.random.key(0), (8, 7, 5)).astype(dtype)
    for split in (False, True):
      sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
      with vit.batch_split_over(sharding) if split else contextlib.nullcontext():
        np.testing.assert_array_equal(jax.jit(models.mean_tokens)(x), plain(x))
        np.testing.assert_array_equal(jax.vjp(models.mean_tokens, x)[1](ct)[0],
                                      jax.vjp(plain, x)[1](ct)[0])
        jaxpr = ops(models.mean_tokens, x)
      pinned = split and dtype == jnp.bfloat16 and vit._ROW_MAJOR is not None  # pylint: disable=protected-access
      assert jaxpr.count("layout_constraint") == (2 if pinned else 0), (dtype, split)
      assert ("shard_map" in jaxpr) == pinned


def test_the_train_step_pins_the_pooled_stream_without_gathering_it():
  """The tiny pretraining step in bfloat16 over 8 devices (batch split 8 ways): the pooled streams
  are pinned row-major (4 layout constraints: two streams, forward and backward) and nothing is
  gathered across devices (a layout constraint outside shard_map made XLA gather each stream)."""
  from cav_mae_jax.models import vit  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import benchmark  # pylint: disable=g-import-not-at-top
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  if vit._ROW_MAJOR is None:  # pylint: disable=protected-access
    pytest.skip(f"JAX {jax.__version__} has no layout constraint or shard_map")
  config = pretrain.get_config("tiny")
  with config.unlocked():
    config.model.update(dtype="bfloat16", contrast_group_size=2)
    config.mesh.update(data=8, fsdp=1)
  setup = benchmark.setup_train_step(config, 16, jax.devices()[:8])
  args = (setup.abstract_state, setup.abstract_batch, setup.abstract_rng)
  assert str(jax.make_jaxpr(setup.train_step)(*args)).count("layout_constraint") == 4
  text = setup.compile().as_text()
  assert "all-reduce" in text and "all-gather" not in text


def test_param_shapes_are_traced_once_per_model_and_kind(monkeypatch):
  """models.param_shapes traces the model's init once per config and kind in a process (the
  base model's trace takes ~1 s; a trainer's start asked four times); every call gets its own
  containers, and a task's abstract train state is the one its own init gives."""
  from cav_mae_jax import tasks  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.models import params as params_lib  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import optim, step  # pylint: disable=g-import-not-at-top
  from configs import finetune, pretrain  # pylint: disable=g-import-not-at-top
  traced = []
  init = params_lib.init_params
  monkeypatch.setattr(params_lib, "init_params",
                      lambda config, rng, **kw: traced.append(kw) or init(config, rng, **kw))
  params_lib._traced_param_shapes.cache_clear()  # pylint: disable=protected-access
  cfg = _cfg(embed_dim=48)
  first = models.param_shapes(cfg)
  first.pop("norm")  # the caller's own dict: the next call is whole
  assert models.param_shapes(cfg)["norm"]["scale"].shape == (48,)
  assert "norm" in models.param_shapes(dataclasses.asdict(cfg))  # the same model, as a dict
  assert "mlp_head_1" in models.param_shapes(cfg, finetune=True)
  assert traced == [{"finetune": False}, {"finetune": True}]
  for config in (pretrain.get_config("tiny"), finetune.get_config("tiny")):
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    task = tasks.get_task(config)
    _, tx = optim.for_task(config, task, steps_per_epoch=1, total_steps=1)
    expected = jax.eval_shape(lambda rng, task=task, tx=tx: step.state_from_params(
        init(task.model_config, rng, finetune=task.finetune), tx), jax.random.key(0))
    for abstract in (step.abstract_train_state(task, tx, mesh), step.abstract_state_of(config)):
      assert jax.tree.structure(abstract) == jax.tree.structure(expected)
      assert [(x.shape, x.dtype) for x in jax.tree.leaves(abstract)] == [
          (x.shape, x.dtype) for x in jax.tree.leaves(expected)]


def test_the_packages_names_are_its_modules():
  """`cav_mae_jax.models` imports its modules on first use (`__getattr__`): each exported name is
  the object its module defines, and a name it does not export is an AttributeError."""
  from cav_mae_jax.models import cav_mae, config, masking, params, vit  # pylint: disable=C0415
  modules = (cav_mae, config, masking, params, vit)
  for name in models.__all__:
    assert any(getattr(m, name, None) is getattr(models, name) for m in modules), name
  assert set(models.__all__) <= set(dir(models))
  with pytest.raises(AttributeError, match="has no attribute 'init_param'"):
    models.init_param  # pylint: disable=pointless-statement
