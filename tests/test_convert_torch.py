"""Conversion against our Flax model and the PyTorch reference of the original (tiny configs).

Checks: our parameter tree is exactly the original's state-dict layout (base, via eval_shape);
torch -> ours -> torch is bit-identical and loads with strict=True; converted models give the
reference's outputs within 1e-5; ImageNet-MAE and 512-frame conversions produce models that run.
"""

import dataclasses

import jax
import numpy as np
import pytest

from cav_mae_jax import models
from cav_mae_jax.convert import cavmae_checkpoint
from cav_mae_jax.convert import export
from cav_mae_jax.convert import imagenet_mae
from cav_mae_jax.convert import state_dict as sd
from test_convert_imagenet_mae import mae_shapes
from test_convert_layout import BASE, Dims, original_shapes, random_state_dict

torch = pytest.importorskip("torch", reason="parity with the PyTorch reference needs torch")
torch_reference = pytest.importorskip("torch_reference")

SMALL = dict(audio_length=64, image_size=32)
TINY_CONFIG = models.model_config("tiny", **SMALL)
TINY_DIMS = Dims(embed_dim=64, num_heads=4, modality_specific_depth=2, encoder_depth=3,
                 decoder_embed_dim=32, decoder_depth=1, audio_length=64, image_size=32)
REFERENCE_ARGS = dict(img_size=32, audio_length=64, patch_size=16, embed_dim=64,
                      modality_specific_depth=2, num_heads=4, depth=3)
DECODER_ARGS = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
CLASSES = 7


def _torch_shape(path, shape):
  """The torch shape of a flax leaf under the conversion rule."""
  _, kind = sd.path_to_torch_key(path, len(shape))
  if kind == "linear":
    return tuple(reversed(shape))
  if kind == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def _as_torch_layout(shapes_tree):
  return {sd.path_to_torch_key(p, len(s.shape))[0]: _torch_shape(p, s.shape)
          for p, s in sd.flatten_params(shapes_tree).items()}


def test_base_parameter_tree_is_the_original_layout():
  assert _as_torch_layout(models.param_shapes(models.model_config("base"))) == original_shapes(BASE)


def _randomized(module, seed):
  """Reference module with every parameter random (LayerNorms included), in eval mode."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in module.named_parameters():
      if "pos_embed" not in name:
        param.add_(0.1 * torch.randn(param.shape, generator=generator))
  return module.eval()


@pytest.fixture(name="pretrain_reference", scope="module")
def _pretrain_reference():
  torch.manual_seed(0)
  return _randomized(torch_reference.CAVMAE(norm_pix_loss=True, **REFERENCE_ARGS, **DECODER_ARGS), 1)


@pytest.fixture(name="finetune_reference", scope="module")
def _finetune_reference():
  torch.manual_seed(2)
  return _randomized(torch_reference.CAVMAEFT(label_dim=CLASSES, **REFERENCE_ARGS), 3)


def _numpy_state_dict(module):
  return {"module." + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _inputs(batch=3, seed=4):
  rng = np.random.default_rng(seed)
  audio = rng.standard_normal((batch, 64, 128)).astype(np.float32)
  image = rng.standard_normal((batch, 32, 32, 3)).astype(np.float32)
  return audio, image


def test_reference_layout_matches_the_original_layout(pretrain_reference, finetune_reference):
  got = {k: tuple(v.shape) for k, v in pretrain_reference.state_dict().items()}
  assert got == original_shapes(TINY_DIMS)
  got = {k: tuple(v.shape) for k, v in finetune_reference.state_dict().items()}
  assert got == original_shapes(dataclasses.replace(TINY_DIMS, num_classes=CLASSES))


def test_round_trip_is_bit_identical_and_loads_strictly(pretrain_reference):
  released = _numpy_state_dict(pretrain_reference)
  params, report = cavmae_checkpoint.cavmae_to_params(released, models.param_shapes(TINY_CONFIG))
  assert not report.unexpected and not report.kept_init
  back, _ = export.to_original_state_dict(params)
  for key, value in released.items():
    assert back[key[len("module."):]].tobytes() == value.tobytes(), key
  fresh = torch_reference.CAVMAE(**REFERENCE_ARGS, **DECODER_ARGS)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


@pytest.fixture(name="pretrain_forward", scope="module")
def _pretrain_forward():
  """Jitted tiny pretraining forward with explicit mask noise: (losses, (audio, video) features)."""
  model = models.CAVMAE(models.ModelConfig.from_config(TINY_CONFIG))

  @jax.jit
  def forward(params, audio, image, noise_a, noise_v):
    variables = {"params": params}
    return (model.apply(variables, audio, image, noise_a=noise_a, noise_v=noise_v),
            model.apply(variables, audio, image, method="features"))

  return forward


def _noise(batch=3, seed=5):
  rng = np.random.default_rng(seed)
  return rng.random((batch, 32)).astype(np.float32), rng.random((batch, 4)).astype(np.float32)


def test_converted_pretraining_model_matches_the_reference(pretrain_reference, pretrain_forward):
  params, _ = cavmae_checkpoint.cavmae_to_params(
      _numpy_state_dict(pretrain_reference), models.param_shapes(TINY_CONFIG))
  audio, image = _inputs()
  noise_a, noise_v = _noise()
  ours, feats = pretrain_forward(params, audio, image, noise_a, noise_v)
  images_nchw = torch.from_numpy(image.transpose(0, 3, 1, 2))
  with torch.no_grad():
    theirs = pretrain_reference.forward_details(
        torch.from_numpy(audio), images_nchw, noise_a=torch.from_numpy(noise_a),
        noise_v=torch.from_numpy(noise_v))
    their_feats = pretrain_reference.forward_feat(torch.from_numpy(audio), images_nchw)
  for key in ("loss", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc"):
    np.testing.assert_allclose(ours[key], theirs[key].numpy(), rtol=1e-5, atol=1e-5, err_msg=key)
  for got, want in zip(feats, their_feats):
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_converted_finetuning_model_matches_the_reference(finetune_reference):
  config = models.model_config("tiny", **SMALL, num_classes=CLASSES, trainable_pos_embed=True)
  params, report = cavmae_checkpoint.cavmae_to_params(
      _numpy_state_dict(finetune_reference), models.param_shapes(config, finetune=True))
  assert not report.kept_init
  model = models.CAVMAEFT(models.ModelConfig.from_config(config))
  audio, image = _inputs()
  images_nchw = torch.from_numpy(image.transpose(0, 3, 1, 2))
  modes = ("multimodal", "audioonly", "videoonly")  # the head and all three final norms
  logits = jax.jit(lambda p, a, v: {m: model.apply({"params": p}, a, v, mode=m) for m in modes})(
      params, audio, image)
  for mode in modes:
    with torch.no_grad():
      want = finetune_reference(torch.from_numpy(audio), images_nchw, mode).numpy()
    np.testing.assert_allclose(logits[mode], want, rtol=1e-5, atol=1e-5, err_msg=mode)


def test_our_finetuning_tree_exports_into_the_reference_strictly():
  config = models.model_config("tiny", **SMALL, num_classes=CLASSES)
  shapes = models.param_shapes(config, finetune=True)
  assert _as_torch_layout(shapes) == original_shapes(dataclasses.replace(TINY_DIMS, num_classes=CLASSES))
  zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  back, notes = export.to_original_state_dict(zeros)
  assert not notes
  fresh = torch_reference.CAVMAEFT(label_dim=CLASSES, **REFERENCE_ARGS)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_imagenet_mae_initialized_model_runs(pretrain_forward):
  rng = np.random.default_rng(6)
  mae = {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in mae_shapes(TINY_DIMS).items()}
  init = jax.tree_util.tree_map(  # stands in for init values (target.init_params is tested by the tool)
      lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), models.param_shapes(TINY_CONFIG))
  params, report = imagenet_mae.imagenet_mae_to_params(mae, init)
  assert report.kept_init["modality_a"] == "not in ImageNet MAE"
  np.testing.assert_array_equal(params["modality_a"], init["modality_a"])
  out, _ = pretrain_forward(params, *_inputs(), *_noise())
  assert np.isfinite(out["loss"]) and out["loss"] > 0


def test_checkpoint_converted_to_512_frames_runs_with_the_trimmed_grid():
  source = {"module." + k: v for k, v in random_state_dict(
      dataclasses.replace(TINY_DIMS, audio_length=1024), seed=7).items()}
  config = models.model_config("tiny", audio_length=512, image_size=32)
  params, _ = cavmae_checkpoint.cavmae_to_params(
      source, models.param_shapes(config), audio_pos_resize="trim")
  grid = params["pos_embed_a"].reshape(8, 32, 64)
  np.testing.assert_array_equal(grid, source["module.pos_embed_a"].reshape(8, 64, 64)[:, :32])
  model = models.CAVMAE(models.ModelConfig.from_config(config))
  audio = np.random.default_rng(8).standard_normal((2, 512, 128)).astype(np.float32)
  image = np.zeros((2, 32, 32, 3), np.float32)
  audio_tokens, _ = jax.jit(lambda p, a, v: model.apply({"params": p}, a, v, method="features"))(
      params, audio, image)
  assert audio_tokens.shape == (2, 256, 64) and np.isfinite(audio_tokens).all()
