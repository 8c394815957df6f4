"""Throughput of a task's train step on in-memory batches (no TensorFlow), and of the PyTorch
reference of the original trained the original's way, on the same device.

`benchmark_train_step` times the sharded jit train step after warm-up steps and reports
samples/s, step time, peak device memory and MFU (model FLOPs from `flops` over the chip's dense
bf16 peak). `benchmark_torch` times the torch reference of the same size and batch: Adam(betas
0.95/0.999, weight_decay 5e-7) under fp16 autocast with a GradScaler on CUDA (bf16 autocast on
CPU when the config computes in bf16).
"""

from __future__ import annotations

import importlib.util
import os
import time

import jax
import ml_collections

from cav_mae_jax import tasks
from cav_mae_jax.train import array_input
from cav_mae_jax.train import device_augment
from cav_mae_jax.train import flops
from cav_mae_jax.train import mesh as mesh_lib
from cav_mae_jax.train import optim
from cav_mae_jax.train import step as step_lib
from cav_mae_jax.train import validation


def benchmark_train_step(config: ml_collections.ConfigDict, batch_size: int, steps: int,
                         warmup: int) -> dict[str, float]:
  """Times the sharded jit train step of `config.task` on random in-memory batches."""
  with config.unlocked():
    config.data.batch_size = batch_size
    for entry in config.evals.values():
      entry.batch_size = batch_size
  validation.validate_config(config, jax.device_count(), jax.process_count(), check_data=False)
  task = tasks.get_task(config)
  model_config = task.model_config
  mesh = mesh_lib.make_mesh(config.mesh)
  schedule, tx = optim.for_task(config, task, steps_per_epoch=1000, total_steps=100_000)
  state, shardings = step_lib.create_train_state(task, tx, mesh, jax.random.PRNGKey(0))
  train_step = step_lib.make_train_step(
      task, tx, schedule, mesh, shardings,
      device_augment=device_augment.make_device_augment(config.data))
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
  result["model_gflop_per_sample_step"] = task.step_flops / 1e9
  mfu = flops.mfu(samples_per_s, task.step_flops, device.device_kind, jax.device_count())
  if mfu is not None:
    result["jax/mfu"] = mfu
  print(f"device: {jax.device_count()} x {device.device_kind}; batch {batch_size}; "
        f"dtype {model_config.dtype}; mesh {dict(mesh.shape)}")
  return result


def load_torch_reference():
  """The PyTorch reference of the original model (tests/torch_reference.py of a source checkout).

  It is test code, written from the original's description to check parity, so it is not part
  of the installed package; comparisons with torch need the repository checkout.
  """
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__)))), "tests", "torch_reference.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: the torch reference comes with the repository checkout")
  spec = importlib.util.spec_from_file_location("torch_reference", path)
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
