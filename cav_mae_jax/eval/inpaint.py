"""Inpainting pictures: original, masked and reconstructed spectrogram and frame of one clip.

The original's inpainting script pictures its released model trained without `norm_pix_loss`
(Base-NoNorm). Here any pretraining model with a decoder works: the masked
patches come from the model's `inpaint` (masks drawn from `seed`, ratios as asked, the audio
mask in the model config's `mask_mode_a`: unstructured by default, which is all the original's
script draws), visible patches are pasted from the input, as the original's script and MAE's
visualization do. Titles give the share of patches actually removed: int(L * (1 - ratio)) are
kept, which on a small grid can differ from the ratio asked for.

With `norm_pix_loss` the decoder predicts each patch normalized by its own mean and unbiased
variance (+1e-6). Such a prediction is mapped back with the statistics of the target patch it
replaces (MAE's visualization does the same); the picture says so, since those statistics come
from the very patch the model did not see. The losses printed are the model's (in normalized
space for such models).

Pictures: spectrograms are the model's input (normalized log-mel), frequency upwards; frames are
the model's input with ImageNet normalization undone. Removed patches are grey.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from cav_mae_jax import files
from cav_mae_jax import models
from cav_mae_jax import seeds
from cav_mae_jax.eval import clips
from cav_mae_jax.models import losses

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
NORM_PIX_EPS = 1e-6  # as the loss (`losses.mae_loss`)


@dataclasses.dataclass
class Inpainting:
  """One clip's inputs, masks (True = removed) and reconstructions, in the model's input space."""

  video_id: str
  audio: np.ndarray  # [T, F]
  image: np.ndarray  # [H, W, 3]
  audio_mask: np.ndarray  # [T, F] bool
  image_mask: np.ndarray  # [H, W] bool
  audio_reconstruction: np.ndarray  # [T, F]: visible input + predicted removed patches
  image_reconstruction: np.ndarray  # [H, W, 3]
  loss_a: float | None  # MSE on the removed patches; None when none is removed
  loss_v: float | None
  mask_ratio_a: float
  mask_ratio_v: float
  seed: int
  norm_pix_loss: bool
  mask_mode_a: str = "unstructured"


def reconstruct(target: np.ndarray, pred: np.ndarray, mask: np.ndarray,
                norm_pix_loss: bool) -> np.ndarray:
  """Patches [L, P]: `target` where visible, `pred` where removed (mask 1), un-normalized
  with each target patch's mean and unbiased variance when `norm_pix_loss`."""
  target, pred = np.asarray(target, np.float64), np.asarray(pred, np.float64)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    pred = pred * np.sqrt(var + NORM_PIX_EPS) + mean
  mask = np.asarray(mask, bool)[:, None]
  return np.where(mask, pred, target).astype(np.float32)


def _pixels(patches: np.ndarray, grid: tuple[int, int], patch_size: int) -> np.ndarray:
  """[L, P] patches -> [rows * p, cols * p, C] (losses.unpatchify of one clip)."""
  return np.asarray(losses.unpatchify(patches[None], grid, patch_size))[0]


@functools.lru_cache(maxsize=8)
def _inpaint_fn(config: models.ModelConfig) -> Any:
  """The model's `inpaint`, jitted once per config."""
  model = models.CAVMAE(config)
  return jax.jit(lambda params, audio, image, key: model.apply(
      {"params": params}, audio, image, rngs={"mask": key}, method="inpaint"))


def inpaint(model_config: models.ModelConfig, params: Any, audio: np.ndarray, image: np.ndarray,
            *, video_id: str = "", mask_ratio_a: float = 0.75, mask_ratio_v: float = 0.75,
            seed: int = 0) -> Inpainting:
  """Masks and reconstructs one clip (audio [T, F], image [H, W, 3], model-normalized)."""
  config = dataclasses.replace(models.ModelConfig.from_config(model_config),
                               mask_ratio_a=mask_ratio_a, mask_ratio_v=mask_ratio_v)
  config.validate()
  seeds.check("seed", seed)
  if config.modalities != "audiovisual":
    raise ValueError(f"inpainting pictures need an audio-visual model, not modalities="
                     f"{config.modalities!r}")
  out = _inpaint_fn(config)(params, np.asarray(audio, np.float32)[None],
                            np.asarray(image, np.float32)[None], jax.random.key(seed))
  out = jax.tree.map(lambda x: np.asarray(x)[0] if np.ndim(x) else float(x), out)
  p = config.patch_size
  audio_image = np.swapaxes(np.asarray(audio, np.float32), 0, 1)[None, ..., None]  # [1, F, T, 1]
  targets = {"a": np.asarray(losses.patchify(audio_image, p))[0],
             "v": np.asarray(losses.patchify(np.asarray(image, np.float32)[None], p))[0]}
  grids = {"a": config.audio_grid, "v": config.image_grid}
  pictures, masks = {}, {}
  for name in ("a", "v"):
    mask = out[f"mask_{name}"] > 0.5
    pictures[name] = _pixels(reconstruct(targets[name], out[f"pred_{name}"], mask,
                                         config.norm_pix_loss), grids[name], p)
    masks[name] = _pixels(np.repeat(mask[:, None], p * p, axis=1), grids[name], p)[..., 0] > 0.5
  return Inpainting(
      video_id=video_id, audio=np.asarray(audio, np.float32),
      image=np.asarray(image, np.float32), audio_mask=masks["a"].T,
      image_mask=masks["v"], audio_reconstruction=pictures["a"][..., 0].T,
      image_reconstruction=pictures["v"],
      # The mean over no removed patch is 0 / 0: no loss, rather than NaN.
      loss_a=out["loss_mae_a"] if masks["a"].any() else None,
      loss_v=out["loss_mae_v"] if masks["v"].any() else None,
      mask_ratio_a=mask_ratio_a, mask_ratio_v=mask_ratio_v, seed=seed,
      norm_pix_loss=config.norm_pix_loss, mask_mode_a=config.mask_mode_a)


def _show_image(axes: Any, image: np.ndarray, mask: np.ndarray | None, title: str) -> None:
  rgb = np.clip(image * IMAGENET_STD + IMAGENET_MEAN, 0.0, 1.0)
  if mask is not None:
    rgb = np.where(mask[..., None], 0.5, rgb)
  axes.imshow(rgb)
  axes.set_title(title, fontsize=9)
  axes.set_xlabel("pixel")
  axes.set_ylabel("pixel")


def _show_spectrogram(axes: Any, fbank: np.ndarray, mask: np.ndarray | None, title: str,
                      limits: tuple[float, float]) -> Any:
  import matplotlib  # pylint: disable=g-import-not-at-top
  values = np.where(mask, np.nan, fbank) if mask is not None else fbank
  cmap = matplotlib.colormaps["magma"].with_extremes(bad="0.6")
  shown = axes.imshow(values.T, origin="lower", aspect="auto", cmap=cmap, vmin=limits[0],
                      vmax=limits[1], interpolation="nearest")
  axes.set_title(title, fontsize=9)
  axes.set_xlabel("time frame (10 ms)")
  axes.set_ylabel("mel bin")
  return shown


def figure(result: Inpainting) -> Any:
  """A matplotlib Figure: spectrograms (top row) and frames (bottom): original, masked, rebuilt."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(15, 7.5), layout="constrained")
  grid = fig.add_gridspec(2, 3, height_ratios=[1, 1.4])
  rebuilt = "reconstruction (visible patches pasted)"
  if result.norm_pix_loss:
    rebuilt += "\nnorm_pix_loss: predictions un-normalized with the target patches' mean/var"
  limits = (float(np.min(result.audio)), float(np.max(result.audio)))
  # What was removed, from the masks: int(L * (1 - ratio)) patches are kept, which on a small
  # grid can be far from the ratio asked for (0.8 of 4 patches keeps none).
  mode = "" if result.mask_mode_a == "unstructured" else f", {result.mask_mode_a} masking"
  titles = ("original", f"masked ({result.audio_mask.mean():.0%} of patches removed{mode})",
            rebuilt)
  for column, (fbank, mask) in enumerate(((result.audio, None), (result.audio, result.audio_mask),
                                          (result.audio_reconstruction, None))):
    shown = _show_spectrogram(fig.add_subplot(grid[0, column]), fbank, mask,
                              f"spectrogram: {titles[column]}", limits)
  fig.colorbar(shown, ax=fig.axes, shrink=0.6, label="normalized log-mel")
  titles = ("original", f"masked ({result.image_mask.mean():.0%} of patches removed)", rebuilt)
  for column, (image, mask) in enumerate(((result.image, None), (result.image, result.image_mask),
                                          (result.image_reconstruction, None))):
    _show_image(fig.add_subplot(grid[1, column]), image, mask, f"frame: {titles[column]}")
  fig.suptitle(f"clip {result.video_id or '?'}: mask seed {result.seed}; reconstruction "
               f"{losses_text(result)}")
  return fig


def losses_text(result: Inpainting) -> str:
  """'MSE on removed patches: audio 0.1234, video 0.5678' (a modality with none removed: 'no
  patch removed')."""
  space = " (normalized-patch space)" if result.norm_pix_loss else ""
  parts = [f"{name} {loss:.4f}" if loss is not None else f"{name}: no patch removed"
           for name, loss in (("audio", result.loss_a), ("video", result.loss_v))]
  return f"MSE on removed patches{space}: {', '.join(parts)}"


def save_figure(result: Inpainting, path: str) -> None:
  """Writes the picture of `result` as a PNG at `path`: under a temporary name first, so that a
  write the disk refuses names the picture and leaves no half-written PNG."""
  with files.staged_output(path) as staged:
    figure(result).savefig(staged, dpi=100, format="png")


def check_norm_pix_loss(model_config: models.ModelConfig, path: str) -> None:
  """Refuses to picture a model through another `norm_pix_loss` than it was trained with.

  The parameters are the same either way, so nothing else would notice: a model trained on raw
  patches (the original's cav-mae-base-nonorm) read with norm_pix_loss=True has its predictions
  scaled by the target patches' spread and shifted to their means, a plausible-looking picture
  that is not the model's; the reverse shows normalized patches as pixels. The checkpoint's
  stored model config (a workdir's config.json, a params checkpoint's model_config.json) says
  how it was trained (one converted from a .pth: what the converter was given, which the .pth
  does not record); a checkpoint without one is not checked.
  """
  from cav_mae_jax.convert import init_source  # pylint: disable=g-import-not-at-top
  trained = init_source.stored_model_field(path, "norm_pix_loss")
  if trained is not None and bool(trained) != model_config.norm_pix_loss:
    raise ValueError(
        f"{path}: its model config records norm_pix_loss={bool(trained)}, the config has "
        f"{model_config.norm_pix_loss}; inpaint it with "
        f"--config.model.norm_pix_loss={bool(trained)} (a checkpoint converted from a .pth "
        "records what tools/convert.py was given: the .pth does not say; convert "
        "cav-mae-base-nonorm.pth with --config.model.norm_pix_loss=False)")


def record_clip(config: Any, *, directory: str = "", index: int | None = None,
                video_id: str | None = None) -> tuple[str, np.ndarray, np.ndarray]:
  """(id, audio, image) of a records clip by id or by position in data order (shard by shard)."""
  if (index is None) == (video_id is None):
    raise ValueError("choose the clip by index or by id (one of them)")
  if index is not None and index < 0:
    raise ValueError(f"clip index {index}: must be >= 0")
  batch_size = jax.process_count() * 8
  seen = 0
  wanted = None if video_id is None else [video_id]
  for batch in clips.record_batches(config, batch_size, directory=directory, video_ids=wanted):
    for row in np.flatnonzero(batch["valid"]):
      if video_id is not None or seen == index:
        return str(batch["video_id"][row]), batch["audio"][row], batch["image"][row]
      seen += 1
  raise ValueError(f"clip index {index}: the records hold only {seen} clips")
