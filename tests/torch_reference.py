"""PyTorch reference of the original CAV-MAE and CAV-MAE fine-tuning models, for parity tests.

Written from docs/original.md and the paper, with the original's module and parameter names
(`blocks_a.0.norm1_a.weight`, `blocks_u.0.attn.qkv.weight`, `mlp_head.0.weight`, ...), so a
released `.pth` state dict (after dropping the `module.` prefix) loads with `strict=True`.
No timm: attention, MLP and block are written here with the original's semantics.

Behaviour follows the original, including its quirks:
- Audio [B, T, F] is transposed to an image [B, 1, F, T]: frequency is the height, time the
  width, and audio patches are in row-major order of the (F/p) x (T/p) grid.
- In `CAVMAE.forward_encoder` the audio-only and video-only joint streams apply each joint block
  to the modality-specific output (`for blk in blocks_u: ca = blk(a, 'a')`), so only the last
  joint block counts. With one joint block (the paper's 11 + 1) this equals chaining the blocks,
  which is what the Flax model does; the two differ only when the joint depth is above 1. Set
  `unchained_joint_streams=False` to chain them (as `forward_feat` and `CAVMAEFT` always do).
- The decoder takes the number of masked tokens from the first sample of the batch.

One deliberate difference: masks come from a stable argsort of the noise. The original's
`torch.argsort` is unstable, which matters only for ties: in `tf` mode at ratio 0.75 on the 8 x 64
grid, 124 tokens are outside the masked rows/columns (all at noise 1.1) but 128 are kept, so the
original keeps 4 of the tied tokens in whatever order its sort leaves them (device dependent).
Checked against the original code (timm 0.4.5) with the same weights and noise: every output is
bit-identical in all modes, and in `tf` mode too once its argsort is made stable.

Additions over the original, all off by default: explicit mask noise (`noise_a`, `noise_v`),
bidirectional contrast as a forward argument, contrastive groups (`contrast_group_size`, the
original's DataParallel objective: each group of G samples is its own sub-batch, every loss term
is summed over groups and `c_acc` is averaged), a configurable total depth, LayerNorm epsilon,
GELU approximation and mel-bin count (the original hard-codes 12, 1e-5, exact and 128).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

FINETUNE_MODES = ("multimodal", "audioonly", "videoonly", "missingaudioonly", "missingvideoonly")
AUDIO_MASK_MODES = ("unstructured", "time", "freq", "tf")


def sincos_pos_embed_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
  """Sin-cos embedding [M, embed_dim] of positions [M], computed in float64."""
  if embed_dim % 2:
    raise ValueError(f"embed_dim must be even, got {embed_dim}")
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega
  angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 2-D sin-cos embedding [grid_h * grid_w, embed_dim] (float64); first half encodes the column."""
  if embed_dim % 2:
    raise ValueError(f"embed_dim must be even, got {embed_dim}")
  cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
  emb_col = sincos_pos_embed_1d(embed_dim // 2, cols)
  emb_row = sincos_pos_embed_1d(embed_dim // 2, rows)
  return np.concatenate([emb_col, emb_row], axis=1)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> tokens [B, L, D] in row-major order."""

  def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
    super().__init__()
    self.patch_size = patch_size
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (timm layout)."""

  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    if dim % num_heads:
      raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * self.scale
    attn = attn.softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(b, n, c)
    return self.proj(x)


class Mlp(nn.Module):
  """fc1 -> GELU -> fc2."""

  def __init__(self, dim: int, hidden_dim: int, gelu_approximate: str = "none"):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden_dim)
    self.act = nn.GELU(approximate=gelu_approximate)
    self.fc2 = nn.Linear(hidden_dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  """Pre-norm ViT block with three LayerNorm pairs (joint, audio, video) over shared attn/MLP."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, layer_norm_eps: float = 1e-5,
               gelu_approximate: str = "none"):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
    self.norm1_a = nn.LayerNorm(dim, eps=layer_norm_eps)
    self.norm1_v = nn.LayerNorm(dim, eps=layer_norm_eps)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
    self.norm2_a = nn.LayerNorm(dim, eps=layer_norm_eps)
    self.norm2_v = nn.LayerNorm(dim, eps=layer_norm_eps)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), gelu_approximate)

  def forward(self, x: torch.Tensor, modality: Optional[str] = None) -> torch.Tensor:
    if modality is None:
      norm1, norm2 = self.norm1, self.norm2
    elif modality == "a":
      norm1, norm2 = self.norm1_a, self.norm2_a
    elif modality == "v":
      norm1, norm2 = self.norm1_v, self.norm2_v
    else:
      raise ValueError(f"modality must be None, 'a' or 'v', got {modality!r}")
    x = x + self.attn(norm1(x))
    return x + self.mlp(norm2(x))


def _init_linear_and_norm(module: nn.Module) -> None:
  """Xavier-uniform Linear weights, zero biases, LayerNorm 1/0 (the original's init)."""
  if isinstance(module, nn.Linear):
    nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
      nn.init.zeros_(module.bias)
  elif isinstance(module, nn.LayerNorm):
    nn.init.ones_(module.weight)
    nn.init.zeros_(module.bias)


def _init_conv_as_linear(conv: nn.Conv2d) -> None:
  """Xavier-uniform on the conv kernel flattened to [out, in * p * p]."""
  weight = conv.weight.data
  nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
  """[N, C, h*p, w*p] -> [N, h*w, p*p*C], pixel order (row, column, channel) inside a patch."""
  n, c, height, width = images.shape
  h, w, p = height // patch_size, width // patch_size, patch_size
  x = images.reshape(n, c, h, p, w, p)
  x = torch.einsum("nchpwq->nhwpqc", x)
  return x.reshape(n, h * w, p * p * c)


def mask_by_noise(x: torch.Tensor, noise: torch.Tensor, mask_ratio: float):
  """Keeps the int(L * (1 - ratio)) lowest-noise tokens; returns (kept, mask (1 = removed), ids_restore)."""
  n, length, dim = x.shape
  if noise.shape != (n, length):
    raise ValueError(f"noise shape {tuple(noise.shape)} does not match tokens {(n, length)}")
  len_keep = int(length * (1 - mask_ratio))
  ids_shuffle = torch.argsort(noise, dim=1, stable=True)
  ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
  ids_keep = ids_shuffle[:, :len_keep]
  kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
  mask = torch.ones(n, length, dtype=x.dtype, device=x.device)
  mask[:, :len_keep] = 0
  mask = torch.gather(mask, 1, ids_restore)
  return kept, mask, ids_restore


def random_audio_noise(batch_size: int, grid_f: int, grid_t: int, mask_ratio: float, mode: str,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
  """Uniform noise [B, F*T]; structured modes set whole masked rows/columns to 1.1 (the original's rule)."""
  if mode not in AUDIO_MASK_MODES:
    raise ValueError(f"mask_mode must be one of {AUDIO_MASK_MODES}, got {mode!r}")
  noise = torch.rand(batch_size, grid_f, grid_t, generator=generator)
  if mode == "unstructured":
    return noise.reshape(batch_size, -1)
  axis_ratio = mask_ratio if mode in ("time", "freq") else mask_ratio * 0.7
  for i in range(batch_size):
    if mode in ("time", "tf"):
      cols = torch.randperm(grid_t, generator=generator)[: int(grid_t * axis_ratio)]
      noise[i, :, cols] = 1.1
    if mode in ("freq", "tf"):
      rows = torch.randperm(grid_f, generator=generator)[: int(grid_f * axis_ratio)]
      noise[i, rows, :] = 1.1
  return noise.reshape(batch_size, -1)


class _AudioVisualEncoderMixin:
  """Shared embedding and modality-specific stages of CAVMAE and CAVMAEFT."""

  def _build_encoder(self, img_size, audio_length, num_mel_bins, patch_size, in_chans, embed_dim,
                     modality_specific_depth, depth, num_heads, mlp_ratio, tr_pos, layer_norm_eps,
                     gelu_approximate):
    if not 0 <= modality_specific_depth <= depth:
      raise ValueError(f"modality_specific_depth {modality_specific_depth} not in [0, depth={depth}]")
    for name, size in (("audio_length", audio_length), ("num_mel_bins", num_mel_bins), ("img_size", img_size)):
      if size % patch_size:
        raise ValueError(f"{name} {size} is not a multiple of patch_size {patch_size}")
    self.patch_size = patch_size
    self.in_chans = in_chans
    self.grid_a = (num_mel_bins // patch_size, audio_length // patch_size)  # (freq rows, time columns)
    self.grid_v = (img_size // patch_size, img_size // patch_size)
    self.num_patches_a = self.grid_a[0] * self.grid_a[1]
    self.num_patches_v = self.grid_v[0] * self.grid_v[1]

    self.patch_embed_a = PatchEmbed(patch_size, 1, embed_dim)
    self.patch_embed_v = PatchEmbed(patch_size, in_chans, embed_dim)
    self.modality_a = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.modality_v = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed_a = nn.Parameter(torch.zeros(1, self.num_patches_a, embed_dim), requires_grad=tr_pos)
    self.pos_embed_v = nn.Parameter(torch.zeros(1, self.num_patches_v, embed_dim), requires_grad=tr_pos)

    def blocks(n):
      return nn.ModuleList(
          [Block(embed_dim, num_heads, mlp_ratio, layer_norm_eps, gelu_approximate) for _ in range(n)])

    self.blocks_a = blocks(modality_specific_depth)
    self.blocks_v = blocks(modality_specific_depth)
    self.blocks_u = blocks(depth - modality_specific_depth)
    self.norm_a = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
    self.norm_v = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
    self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)

  def _init_encoder(self):
    """Fixed sin-cos position embeddings, conv-as-linear patch kernels, N(0, 0.02) modality tokens."""
    dim = self.pos_embed_a.shape[-1]
    self.pos_embed_a.data.copy_(torch.from_numpy(sincos_pos_embed_2d(dim, *self.grid_a)).float()[None])
    self.pos_embed_v.data.copy_(torch.from_numpy(sincos_pos_embed_2d(dim, *self.grid_v)).float()[None])
    _init_conv_as_linear(self.patch_embed_a.proj)
    _init_conv_as_linear(self.patch_embed_v.proj)
    nn.init.normal_(self.modality_a, std=0.02)
    nn.init.normal_(self.modality_v, std=0.02)

  def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
    """Fbank [B, T, F] -> tokens [B, La, D] with position and modality embeddings."""
    a = audio.unsqueeze(1).transpose(2, 3)
    return self.patch_embed_a(a) + self.pos_embed_a + self.modality_a

  def embed_video(self, images: torch.Tensor) -> torch.Tensor:
    """Images [B, C, H, W] -> tokens [B, Lv, D] with position and modality embeddings."""
    return self.patch_embed_v(images) + self.pos_embed_v + self.modality_v

  def _joint(self, x: torch.Tensor, modality: Optional[str], final_norm: nn.Module) -> torch.Tensor:
    for blk in self.blocks_u:
      x = blk(x, modality)
    return final_norm(x)

  def _modality_specific(self, a, v):
    for blk in self.blocks_a:
      a = blk(a)
    for blk in self.blocks_v:
      v = blk(v)
    return a, v


class CAVMAE(_AudioVisualEncoderMixin, nn.Module):
  """The original CAV-MAE pretraining model (masked reconstruction + audio-visual contrast)."""

  def __init__(self, img_size: int = 224, audio_length: int = 1024, patch_size: int = 16, in_chans: int = 3,
               embed_dim: int = 768, modality_specific_depth: int = 11, num_heads: int = 12,
               decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
               mlp_ratio: float = 4.0, norm_pix_loss: bool = False, tr_pos: bool = False, depth: int = 12,
               num_mel_bins: int = 128, layer_norm_eps: float = 1e-5, gelu_approximate: str = "none",
               unchained_joint_streams: bool = True, temperature: float = 0.05):
    super().__init__()
    self._build_encoder(img_size, audio_length, num_mel_bins, patch_size, in_chans, embed_dim,
                        modality_specific_depth, depth, num_heads, mlp_ratio, tr_pos, layer_norm_eps,
                        gelu_approximate)
    self.norm_pix_loss = norm_pix_loss
    self.unchained_joint_streams = unchained_joint_streams
    self.temperature = temperature

    self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_pos_embed_a = nn.Parameter(torch.zeros(1, self.num_patches_a, decoder_embed_dim),
                                            requires_grad=tr_pos)
    self.decoder_pos_embed_v = nn.Parameter(torch.zeros(1, self.num_patches_v, decoder_embed_dim),
                                            requires_grad=tr_pos)
    self.decoder_blocks = nn.ModuleList([
        Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, layer_norm_eps, gelu_approximate)
        for _ in range(decoder_depth)])
    self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=layer_norm_eps)
    self.decoder_pred_a = nn.Linear(decoder_embed_dim, patch_size**2)
    self.decoder_pred_v = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
    self.initialize_weights()

  def initialize_weights(self) -> None:
    """The original's initialisation."""
    self._init_encoder()
    dim = self.decoder_pos_embed_a.shape[-1]
    self.decoder_pos_embed_a.data.copy_(torch.from_numpy(sincos_pos_embed_2d(dim, *self.grid_a)).float()[None])
    self.decoder_pos_embed_v.data.copy_(torch.from_numpy(sincos_pos_embed_2d(dim, *self.grid_v)).float()[None])
    for p in (self.decoder_modality_a, self.decoder_modality_v, self.mask_token):
      nn.init.normal_(p, std=0.02)
    self.apply(_init_linear_and_norm)

  def forward_encoder(self, audio, images, mask_ratio_a, mask_ratio_v, mask_mode="unstructured",
                      noise_a=None, noise_v=None):
    """Masks and encodes: (joint, mask_a, ids_restore_a, mask_v, ids_restore_v, audio-only, video-only)."""
    a, v = self.embed_audio(audio), self.embed_video(images)
    batch = a.shape[0]
    if noise_a is None:
      noise_a = random_audio_noise(batch, *self.grid_a, mask_ratio_a, mask_mode).to(a.device)
    if noise_v is None:
      noise_v = torch.rand(batch, self.num_patches_v, device=v.device)
    a, mask_a, ids_restore_a = mask_by_noise(a, noise_a, mask_ratio_a)
    v, mask_v, ids_restore_v = mask_by_noise(v, noise_v, mask_ratio_v)
    a, v = self._modality_specific(a, v)

    x = self._joint(torch.cat((a, v), dim=1), None, self.norm)
    if self.unchained_joint_streams:  # the original: each joint block sees the modality-specific output
      ca, cv = a, v
      for blk in self.blocks_u:
        ca, cv = blk(a, "a"), blk(v, "v")
      ca, cv = self.norm_a(ca), self.norm_v(cv)
    else:
      ca, cv = self._joint(a, "a", self.norm_a), self._joint(v, "v", self.norm_v)
    return x, mask_a, ids_restore_a, mask_v, ids_restore_v, ca, cv

  def forward_decoder(self, x, mask_a, ids_restore_a, mask_v, ids_restore_v):
    """Decodes the joint latent into per-patch predictions (pred_a [B, La, p*p], pred_v [B, Lv, p*p*C])."""
    x = self.decoder_embed(x)
    batch, _, dim = x.shape
    num_masked_a = int(mask_a[0].sum())  # as the original: the first sample's count for everyone
    num_masked_v = int(mask_v[0].sum())
    num_kept_a = self.num_patches_a - num_masked_a
    a_ = torch.cat([x[:, :num_kept_a], self.mask_token.expand(batch, num_masked_a, dim)], dim=1)
    a_ = torch.gather(a_, 1, ids_restore_a.unsqueeze(-1).expand(-1, -1, dim))
    v_ = torch.cat([x[:, num_kept_a:], self.mask_token.expand(batch, num_masked_v, dim)], dim=1)
    v_ = torch.gather(v_, 1, ids_restore_v.unsqueeze(-1).expand(-1, -1, dim))
    a_ = a_ + self.decoder_pos_embed_a + self.decoder_modality_a
    v_ = v_ + self.decoder_pos_embed_v + self.decoder_modality_v
    x = torch.cat([a_, v_], dim=1)
    for blk in self.decoder_blocks:
      x = blk(x)
    x = self.decoder_norm(x)
    return self.decoder_pred_a(x[:, :self.num_patches_a]), self.decoder_pred_v(x[:, self.num_patches_a:])

  def forward_contrastive(self, audio_rep, video_rep, bidirect_contrast: bool = False):
    """InfoNCE over the batch (softmax over audio for each video); returns (nce, c_acc)."""
    audio_rep = F.normalize(audio_rep, dim=-1)
    video_rep = F.normalize(video_rep, dim=-1)
    logits = audio_rep @ video_rep.t() / self.temperature
    targets = torch.arange(logits.shape[0], device=logits.device)

    def one_direction(sim):
      nce = -torch.mean(torch.diag(F.log_softmax(sim, dim=0)))
      acc = torch.sum(torch.argmax(F.softmax(sim, dim=0), dim=0) == targets) / sim.shape[0]
      return nce, acc

    nce, acc = one_direction(logits)
    if bidirect_contrast:
      nce_t, acc_t = one_direction(logits.t())
      nce, acc = (nce + nce_t) / 2, (acc + acc_t) / 2
    return nce, acc

  def forward_mae_loss(self, inputs, pred, mask, modality: str):
    """Mean over removed patches of the per-patch MSE against (optionally normalized) patch targets."""
    if modality == "a":
      inputs = inputs.unsqueeze(1).transpose(2, 3)
    target = patchify(inputs, self.patch_size)
    if self.norm_pix_loss:
      mean = target.mean(dim=-1, keepdim=True)
      var = target.var(dim=-1, keepdim=True)
      target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()

  def _forward_group(self, audio, images, mask_ratio_a, mask_ratio_v, mae_loss_weight, contrast_loss_weight,
                     mask_mode, bidirect_contrast, noise_a, noise_v):
    latent, mask_a, ids_restore_a, mask_v, ids_restore_v, latent_a, latent_v = self.forward_encoder(
        audio, images, mask_ratio_a, mask_ratio_v, mask_mode, noise_a, noise_v)
    zero = torch.zeros((), device=audio.device)
    out = dict(mask_a=mask_a, mask_v=mask_v, latent=latent, latent_a=latent_a, latent_v=latent_v)
    if mae_loss_weight != 0:
      pred_a, pred_v = self.forward_decoder(latent, mask_a, ids_restore_a, mask_v, ids_restore_v)
      out.update(pred_a=pred_a, pred_v=pred_v)
      out["loss_mae_a"] = self.forward_mae_loss(audio, pred_a, mask_a, "a")
      out["loss_mae_v"] = self.forward_mae_loss(images, pred_v, mask_v, "v")
      out["loss_mae"] = mae_loss_weight * (out["loss_mae_a"] + out["loss_mae_v"])
    else:
      out.update(loss_mae_a=zero, loss_mae_v=zero, loss_mae=zero)
    if contrast_loss_weight != 0:
      loss_c, c_acc = self.forward_contrastive(latent_a.mean(dim=1), latent_v.mean(dim=1), bidirect_contrast)
      out.update(loss_c=contrast_loss_weight * loss_c, c_acc=c_acc)
    else:
      out.update(loss_c=zero, c_acc=zero)
    out["loss"] = out["loss_mae"] + out["loss_c"]
    return out

  def forward_details(self, audio, images, mask_ratio_a=0.75, mask_ratio_v=0.75, mae_loss_weight=1.0,
                      contrast_loss_weight=0.01, mask_mode="unstructured", bidirect_contrast=False,
                      noise_a=None, noise_v=None, contrast_group_size=0) -> dict:
    """The pretraining forward as a dict: losses, c_acc, masks, predictions and encoder outputs.

    With contrast_group_size G > 0 the batch is split into consecutive groups of G samples, each run
    as its own sub-batch (as on one DataParallel replica); loss terms are summed and c_acc averaged
    over groups, tensors are concatenated along the batch.
    """
    batch = audio.shape[0]
    group = contrast_group_size or batch
    if batch % group:
      raise ValueError(f"contrast_group_size {contrast_group_size} does not divide the batch {batch}")
    if mask_mode not in AUDIO_MASK_MODES:
      raise ValueError(f"mask_mode must be one of {AUDIO_MASK_MODES}, got {mask_mode!r}")
    groups = []
    for start in range(0, batch, group):
      sl = slice(start, start + group)
      groups.append(self._forward_group(
          audio[sl], images[sl], mask_ratio_a, mask_ratio_v, mae_loss_weight, contrast_loss_weight, mask_mode,
          bidirect_contrast, None if noise_a is None else noise_a[sl], None if noise_v is None else noise_v[sl]))
    out = {}
    for key in groups[0]:
      values = [g[key] for g in groups]
      if values[0].ndim == 0:
        out[key] = torch.stack(values).mean() if key == "c_acc" else torch.stack(values).sum()
      else:
        out[key] = torch.cat(values, dim=0)
    return out

  def forward(self, audio, images, mask_ratio_a=0.75, mask_ratio_v=0.75, mae_loss_weight=1.0,
              contrast_loss_weight=0.01, mask_mode="unstructured", bidirect_contrast=False, noise_a=None,
              noise_v=None, contrast_group_size=0):
    """The original's return: (loss, loss_mae, loss_mae_a, loss_mae_v, loss_c, mask_a, mask_v, c_acc)."""
    out = self.forward_details(audio, images, mask_ratio_a, mask_ratio_v, mae_loss_weight, contrast_loss_weight,
                               mask_mode, bidirect_contrast, noise_a, noise_v, contrast_group_size)
    return tuple(out[k] for k in ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "mask_a", "mask_v",
                                  "c_acc"))

  def forward_inpaint(self, audio, images, mask_ratio_a=0.75, mask_ratio_v=0.75, mask_mode="unstructured",
                      noise_a=None, noise_v=None):
    """Reconstructions and masks: (pred_a, pred_v, mask_a, mask_v, loss_pixel_a, loss_pixel_v)."""
    latent, mask_a, ids_restore_a, mask_v, ids_restore_v, _, _ = self.forward_encoder(
        audio, images, mask_ratio_a, mask_ratio_v, mask_mode, noise_a, noise_v)
    pred_a, pred_v = self.forward_decoder(latent, mask_a, ids_restore_a, mask_v, ids_restore_v)
    loss_a = self.forward_mae_loss(audio, pred_a, mask_a, "a")
    loss_v = self.forward_mae_loss(images, pred_v, mask_v, "v")
    return pred_a, pred_v, mask_a, mask_v, loss_a, loss_v

  def forward_feat(self, audio, images):
    """Unmasked audio-only and video-only token outputs ([B, La, D], [B, Lv, D]) used for retrieval."""
    a, v = self._modality_specific(self.embed_audio(audio), self.embed_video(images))
    return self._joint(a, "a", self.norm_a), self._joint(v, "v", self.norm_v)


class CAVMAEFT(_AudioVisualEncoderMixin, nn.Module):
  """The original CAV-MAE fine-tuning model: encoder + LayerNorm/Linear head on mean-pooled tokens."""

  def __init__(self, label_dim: int, img_size: int = 224, audio_length: int = 1024, patch_size: int = 16,
               in_chans: int = 3, embed_dim: int = 768, modality_specific_depth: int = 11, num_heads: int = 12,
               mlp_ratio: float = 4.0, norm_pix_loss: bool = False, tr_pos: bool = True, depth: int = 12,
               num_mel_bins: int = 128, layer_norm_eps: float = 1e-5, gelu_approximate: str = "none"):
    super().__init__()
    del norm_pix_loss  # accepted and unused, as in the original
    self._build_encoder(img_size, audio_length, num_mel_bins, patch_size, in_chans, embed_dim,
                        modality_specific_depth, depth, num_heads, mlp_ratio, tr_pos, layer_norm_eps,
                        gelu_approximate)
    self.mlp_head = nn.Sequential(nn.LayerNorm(embed_dim, eps=layer_norm_eps), nn.Linear(embed_dim, label_dim))
    self.initialize_weights()

  def initialize_weights(self) -> None:
    """The original's initialisation."""
    self._init_encoder()
    self.apply(_init_linear_and_norm)

  def forward(self, audio, images, mode: str):
    """Logits [B, label_dim] for one of the five fine-tuning modes."""
    if mode == "multimodal":
      a, v = self._modality_specific(self.embed_audio(audio), self.embed_video(images))
      pooled = self._joint(torch.cat((a, v), dim=1), None, self.norm).mean(dim=1)
    elif mode in ("audioonly", "missingaudioonly"):
      a = self.embed_audio(audio)
      for blk in self.blocks_a:
        a = blk(a)
      pooled = self._joint(a, "a", self.norm_a).mean(dim=1)
      if mode == "missingaudioonly":
        pooled = (self._joint(a, None, self.norm).mean(dim=1) + pooled) / 2
    elif mode in ("videoonly", "missingvideoonly"):
      v = self.embed_video(images)
      for blk in self.blocks_v:
        v = blk(v)
      pooled = self._joint(v, "v", self.norm_v).mean(dim=1)
      if mode == "missingvideoonly":
        pooled = (self._joint(v, None, self.norm).mean(dim=1) + pooled) / 2
    else:
      raise ValueError(f"mode must be one of {FINETUNE_MODES}, got {mode!r}")
    return self.mlp_head(pooled)

  def forward_feat(self, audio, images, mode: str = "av"):
    """Audio and video token outputs through the modality norms ('av'), or audio only ('a')."""
    if mode == "a":
      a = self.embed_audio(audio)
      for blk in self.blocks_a:
        a = blk(a)
      return self._joint(a, "a", self.norm_a)
    if mode != "av":
      raise ValueError(f"forward_feat mode must be 'av' or 'a', got {mode!r}")
    a, v = self._modality_specific(self.embed_audio(audio), self.embed_video(images))
    return self._joint(a, "a", self.norm_a), self._joint(v, "v", self.norm_v)


def count_elements(module: nn.Module, trainable_only: bool = False) -> int:
  """Number of parameter elements (all, or only those with requires_grad)."""
  return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def strip_module_prefix(state_dict: dict) -> dict:
  """Drops DataParallel's `module.` prefix from every key that has it."""
  return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}

