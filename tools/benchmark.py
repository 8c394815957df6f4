r"""Throughput of the CAV-MAE pretraining step (and of the input pipeline).

  python tools/benchmark.py --config configs/pretrain.py:base            # JAX train step
  python tools/benchmark.py --config configs/pretrain.py:base --compare-torch
  python tools/benchmark.py --config configs/pretrain.py:tiny --input-only \
      --config.data.train_dir=/data/records/train

The train-step benchmark runs on in-memory random batches (no TensorFlow is imported) and
reports samples/s, step time, peak device memory and MFU (model FLOPs from
`cav_mae_jax.train.flops` over the chip's dense bf16 peak) after warm-up steps.
`--compare-torch` times the PyTorch reference model (tests/torch_reference.py) of the same size,
batch and device, trained as the original: Adam(betas 0.95/0.999, weight_decay 5e-7) under fp16
autocast with a GradScaler on CUDA (bf16 autocast on CPU when the config computes in bf16).
`--input-only` times the tf.data pipeline alone from records and reports samples/s per core.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and arg.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation included).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default config.data.batch_size).")
_COMPARE_TORCH = flags.DEFINE_bool("compare-torch", False, "Also time the torch reference.")
_INPUT_ONLY = flags.DEFINE_bool("input-only", False, "Time only the tf.data pipeline.")
flags.mark_flags_as_required(["config"])


def benchmark_jax(config, batch_size: int, steps: int, warmup: int) -> dict[str, float]:
  """Times the sharded jit train step on random in-memory batches."""
  import jax  # pylint: disable=g-import-not-at-top
  from cav_mae_jax import models  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import array_input, flops  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import optim  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import validation  # pylint: disable=g-import-not-at-top

  with config.unlocked():
    config.data.batch_size = config.eval.batch_size = batch_size
  model_config = validation.validate_config(config, jax.device_count(), jax.process_count(),
                                            check_data=False)
  mesh = mesh_lib.make_mesh(config.mesh)
  model = models.CAVMAE(config=model_config)
  trainable = models.trainable_mask(step_lib.abstract_params(model, model_config), model_config)
  schedule = optim.make_schedule(config, steps_per_epoch=1000, total_steps=100_000)
  tx = optim.make_optimizer(config.optim, schedule, trainable)
  state, shardings = step_lib.create_train_state(model, model_config, tx, mesh,
                                                 jax.random.PRNGKey(0))
  train_step = step_lib.make_train_step(
      model, tx, schedule, trainable, mesh, shardings,
      audio_noise=config.data.noise and config.data.get("noise_on_device", False))
  clips = array_input.random_clips(batch_size, model_config.audio_length,
                                   model_config.num_mel_bins, model_config.image_size)
  batch = mesh_lib.global_batch(clips, mesh)
  rng = jax.device_put(jax.random.PRNGKey(1), mesh_lib.replicated(mesh))

  compile_start = time.perf_counter()
  for _ in range(warmup):
    state, metrics = train_step(state, batch, rng)
  jax.block_until_ready(metrics)
  warmup_s = time.perf_counter() - compile_start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = train_step(state, batch, rng)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - start) / steps

  device = jax.devices()[0]
  samples_per_s = batch_size / step_s
  result = {"jax/step_time_s": step_s, "jax/samples_per_s": samples_per_s,
            "jax/warmup_s": warmup_s, "jax/loss": float(metrics["loss"])}
  memory = device.memory_stats() or {}
  if "peak_bytes_in_use" in memory:
    result["jax/peak_memory_gib"] = memory["peak_bytes_in_use"] / 2**30
  step_flops = flops.pretrain_step_flops(config.model)
  result["model_gflop_per_sample_step"] = step_flops / 1e9
  peak = flops.peak_flops(device.device_kind)
  if peak:
    result["jax/mfu"] = samples_per_s * step_flops / (peak * jax.device_count())
  print(f"device: {jax.device_count()} x {device.device_kind}; batch {batch_size}; "
        f"dtype {model_config.dtype}; mesh {dict(mesh.shape)}")
  return result


def load_torch_reference():
  """tests/torch_reference.py, imported by path (it is not part of the package)."""
  spec = importlib.util.spec_from_file_location("torch_reference",
                                                os.path.join(ROOT, "tests", "torch_reference.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def benchmark_torch(config, batch_size: int, steps: int, warmup: int) -> dict[str, float]:
  """Times the torch reference trained as the original (Adam, autocast, GradScaler)."""
  import torch  # pylint: disable=g-import-not-at-top
  reference = load_torch_reference()
  m = config.model
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  model = reference.CAVMAE(
      img_size=m.image_size, audio_length=m.audio_length, patch_size=m.patch_size,
      embed_dim=m.embed_dim, modality_specific_depth=m.modality_specific_depth,
      num_heads=m.num_heads, decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
      decoder_num_heads=m.decoder_num_heads, mlp_ratio=m.mlp_ratio, norm_pix_loss=m.norm_pix_loss,
      depth=m.encoder_depth, num_mel_bins=m.num_mel_bins, temperature=m.temperature).to(device)
  trainables = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.Adam(trainables, config.optim.learning_rate,
                               weight_decay=config.optim.weight_decay,
                               betas=(config.optim.b1, config.optim.b2))
  if device.type == "cuda":
    autocast_dtype, scaler = torch.float16, torch.amp.GradScaler("cuda")
  else:
    autocast_dtype = torch.bfloat16 if m.dtype == "bfloat16" else None
    scaler = None
  generator = torch.Generator().manual_seed(0)
  audio = torch.randn(batch_size, m.audio_length, m.num_mel_bins, generator=generator).to(device)
  images = torch.randn(batch_size, 3, m.image_size, m.image_size, generator=generator).to(device)

  def step():
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
      loss = model(audio, images, m.mask_ratio_a, m.mask_ratio_v, mae_loss_weight=m.lambda_mae,
                   contrast_loss_weight=m.lambda_c, mask_mode=m.mask_mode_a,
                   bidirect_contrast=m.contrast_bidirectional,
                   contrast_group_size=m.contrast_group_size)[0]
    optimizer.zero_grad()
    if scaler is not None:
      scaler.scale(loss).backward()
      scaler.step(optimizer)
      scaler.update()
    else:
      loss.backward()
      optimizer.step()
    return loss

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  for _ in range(warmup):
    step()
  sync()
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  for _ in range(steps):
    loss = step()
  sync()
  step_s = (time.perf_counter() - start) / steps
  result = {"torch/step_time_s": step_s, "torch/samples_per_s": batch_size / step_s,
            "torch/loss": float(loss.detach())}
  if device.type == "cuda":
    result["torch/peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
  print(f"torch reference on {device}, autocast {autocast_dtype}")
  return result


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  if _INPUT_ONLY.value:
    from cav_mae_jax.data import input as input_lib  # pylint: disable=g-import-not-at-top
    samples_per_s = input_lib.benchmark_input(config, _STEPS.value, warmup_batches=_WARMUP.value)
    cores = len(os.sched_getaffinity(0))
    print(f"input pipeline: {samples_per_s:.1f} samples/s on {cores} cores = "
          f"{samples_per_s / cores:.1f} samples/s per core")
    return
  batch_size = _BATCH.value or config.data.batch_size
  results = benchmark_jax(config, batch_size, _STEPS.value, _WARMUP.value)
  if _COMPARE_TORCH.value:
    results.update(benchmark_torch(config, batch_size, _STEPS.value, _WARMUP.value))
    results["jax_over_torch_samples_per_s"] = (results["jax/samples_per_s"] /
                                               results["torch/samples_per_s"])
  for key, value in results.items():
    print(f"{key:34s} {value:.4g}")


if __name__ == "__main__":
  app.run(main)
