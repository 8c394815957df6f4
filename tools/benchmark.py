r"""Throughput of the train step (in-memory batches, no TensorFlow) and of the input pipeline.

  python tools/benchmark.py --config configs/pretrain.py:base            # JAX train step
  python tools/benchmark.py --config configs/pretrain.py:base --compare-torch
  python tools/benchmark.py --config configs/pretrain.py:base --cost-analysis --batch_size 12
  python tools/benchmark.py --config configs/pretrain.py:tiny --input-only \
      --config.data.train_dir=/data/records/train

The train-step benchmark reports samples/s, step time, peak device memory and MFU after warm-up
steps (`cav_mae_jax/train/benchmark.py`); `--compare-torch` also times the PyTorch reference of
the original trained as the original (fp16 autocast + GradScaler on CUDA) and prints the ratio.
`--cost-analysis` only compiles the step for one device (no parameters are materialized; a CPU
is enough) and prints XLA's FLOPs per sample against the analytic model FLOPs.
`--input-only` times the tf.data pipeline alone from records, per wall second and per CPU
second (one fully used core).
"""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from cav_mae_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and arg.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation included).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default config.data.batch_size).")
_COMPARE_TORCH = flags.DEFINE_bool("compare-torch", False, "Also time the torch reference.")
_COST_ANALYSIS = flags.DEFINE_bool("cost-analysis", False,
                                   "Print XLA's FLOPs of the compiled step vs the model FLOPs.")
_INPUT_ONLY = flags.DEFINE_bool("input-only", False, "Time only the tf.data pipeline.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  if _INPUT_ONLY.value:
    cli.import_tensorflow_quietly()
    from cav_mae_jax.data import input as input_lib  # pylint: disable=g-import-not-at-top
    samples_per_s = input_lib.benchmark_input(config, _STEPS.value, warmup_batches=_WARMUP.value)
    cores = len(os.sched_getaffinity(0))
    print(f"input pipeline: {samples_per_s:.1f} samples/s on {cores} cores = "
          f"{samples_per_s / cores:.1f} samples/s per core")
    return
  from cav_mae_jax.train import benchmark  # pylint: disable=g-import-not-at-top
  batch_size = _BATCH.value or config.data.batch_size
  if _COST_ANALYSIS.value:
    results = benchmark.compiled_step_cost(config, batch_size)
    print(f"compiled train step, batch {batch_size}, {config.model.dtype}: "
          f"XLA {results['xla_gflop_per_sample_step']:.1f} GFLOP/sample vs model "
          f"{results['model_gflop_per_sample_step']:.1f} "
          f"(x{results['xla_over_model_flops']:.3f})")
    return
  results = benchmark.benchmark_train_step(config, batch_size, _STEPS.value, _WARMUP.value)
  if _COMPARE_TORCH.value:
    results.update(benchmark.benchmark_torch(config, batch_size, _STEPS.value, _WARMUP.value))
    results["jax_over_torch_samples_per_s"] = (results["jax/samples_per_s"] /
                                               results["torch/samples_per_s"])
  for key, value in results.items():
    print(f"{key:34s} {value:.4g}")


if __name__ == "__main__":
  cli.run(main, uses_tensorflow=False)
