"""The original's state-dict layout written out from its module structure (for conversion tests).

`original_shapes` lists every key of the original CAVMAE / CAVMAEFT state dict with its shape,
independently of our model, so the tests here can check our parameter tree against it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cav_mae_jax.convert import state_dict as sd

BLOCK_PARTS = ("norm1", "norm1_a", "norm1_v", "norm2", "norm2_a", "norm2_v")


@dataclasses.dataclass(frozen=True)
class Dims:
  embed_dim: int = 16
  num_heads: int = 2
  modality_specific_depth: int = 2
  encoder_depth: int = 3
  decoder_embed_dim: int = 8
  decoder_depth: int = 1
  patch_size: int = 16
  audio_length: int = 64  # fbank frames -> 8 x 4 audio grid
  image_size: int = 32  # -> 2 x 2 image grid
  mlp_ratio: float = 4.0
  num_classes: int | None = None  # None: pretraining model (CAVMAE)

  @property
  def audio_patches(self) -> int:
    return 8 * (self.audio_length // self.patch_size)

  @property
  def image_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


BASE = Dims(embed_dim=768, num_heads=12, modality_specific_depth=11, encoder_depth=12,
            decoder_embed_dim=512, decoder_depth=8, audio_length=1024, image_size=224)


def _block(prefix: str, dim: int, mlp_ratio: float) -> dict[str, tuple[int, ...]]:
  hidden = int(dim * mlp_ratio)
  shapes = {}
  for norm in BLOCK_PARTS:
    shapes[f"{prefix}.{norm}.weight"] = (dim,)
    shapes[f"{prefix}.{norm}.bias"] = (dim,)
  shapes.update({
      f"{prefix}.attn.qkv.weight": (3 * dim, dim), f"{prefix}.attn.qkv.bias": (3 * dim,),
      f"{prefix}.attn.proj.weight": (dim, dim), f"{prefix}.attn.proj.bias": (dim,),
      f"{prefix}.mlp.fc1.weight": (hidden, dim), f"{prefix}.mlp.fc1.bias": (hidden,),
      f"{prefix}.mlp.fc2.weight": (dim, hidden), f"{prefix}.mlp.fc2.bias": (dim,),
  })
  return shapes


def original_shapes(dims: Dims) -> dict[str, tuple[int, ...]]:
  """Every key of the original CAVMAE (num_classes None) or CAVMAEFT state dict, with shapes."""
  d, p = dims.embed_dim, dims.patch_size
  shapes = {
      "modality_a": (1, 1, d), "modality_v": (1, 1, d),
      "pos_embed_a": (1, dims.audio_patches, d), "pos_embed_v": (1, dims.image_patches, d),
      "patch_embed_a.proj.weight": (d, 1, p, p), "patch_embed_a.proj.bias": (d,),
      "patch_embed_v.proj.weight": (d, 3, p, p), "patch_embed_v.proj.bias": (d,),
  }
  for stack in ("blocks_a", "blocks_v"):
    for i in range(dims.modality_specific_depth):
      shapes.update(_block(f"{stack}.{i}", d, dims.mlp_ratio))
  for j in range(dims.encoder_depth - dims.modality_specific_depth):
    shapes.update(_block(f"blocks_u.{j}", d, dims.mlp_ratio))
  for norm in ("norm_a", "norm_v", "norm"):
    shapes[f"{norm}.weight"], shapes[f"{norm}.bias"] = (d,), (d,)
  if dims.num_classes is not None:
    shapes.update({"mlp_head.0.weight": (d,), "mlp_head.0.bias": (d,),
                   "mlp_head.1.weight": (dims.num_classes, d), "mlp_head.1.bias": (dims.num_classes,)})
    return shapes
  dd = dims.decoder_embed_dim
  shapes.update({
      "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,), "mask_token": (1, 1, dd),
      "decoder_modality_a": (1, 1, dd), "decoder_modality_v": (1, 1, dd),
      "decoder_pos_embed_a": (1, dims.audio_patches, dd),
      "decoder_pos_embed_v": (1, dims.image_patches, dd),
      "decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,),
      "decoder_pred_a.weight": (p * p, dd), "decoder_pred_a.bias": (p * p,),
      "decoder_pred_v.weight": (p * p * 3, dd), "decoder_pred_v.bias": (p * p * 3,),
  })
  for k in range(dims.decoder_depth):
    shapes.update(_block(f"decoder_blocks.{k}", dd, dims.mlp_ratio))
  return shapes


def random_state_dict(dims: Dims, seed: int = 0) -> dict[str, np.ndarray]:
  """An original-layout state dict of float32 random values."""
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in original_shapes(dims).items()}


def test_base_layout_has_the_original_parameter_count():
  total = sum(int(np.prod(s)) for s in original_shapes(BASE).values())
  assert total == 191_036_160  # docs/original.md: counted by running the original
  finetune = dataclasses.replace(BASE, num_classes=527)
  finetune_total = sum(int(np.prod(s)) for s in original_shapes(finetune).values())
  assert round(finetune_total / 1e6, 3) == 164.907


def test_layout_keys_round_trip_through_flax_paths():
  for dims in (Dims(), Dims(num_classes=5)):
    shapes = original_shapes(dims)
    flat = {}
    for key, shape in shapes.items():
      path, kind = sd.torch_key_to_path(key, len(shape))
      flat[path] = kind
      assert sd.path_to_torch_key(path, len(shape)) == (key, kind)
    assert len(flat) == len(shapes)
