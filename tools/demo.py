r"""The one-command demo: synthetic clips -> records -> tiny CAV-MAE pretraining on CPU -> report.

  python tools/demo.py --workdir /tmp/cav_mae_demo

1. writes a synthetic audio-visual dataset (sound and picture of each class co-vary; train and
   held-out splits, real MP4 files), 2. preprocesses both splits into records (fbank + frames),
3. pretrains the tiny model on CPU, evaluating the held-out split at initialization and at the
end, 4. prints a report (losses; audio<->visual retrieval R@1/5/10 both directions, at init and
after training, against chance) and writes a loss-curve PNG.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/cav_mae_demo", "Everything is written here.")
_TRAIN_CLIPS = flags.DEFINE_integer("train_clips", 128, "Synthetic training clips.")
_EVAL_CLIPS = flags.DEFINE_integer("eval_clips", 32, "Held-out clips for evaluation.")
_CLASSES = flags.DEFINE_integer("classes", 8, "Synthetic classes.")
_CLIP_SECONDS = flags.DEFINE_float("clip_seconds", 4.0, "Clip duration (fbanks are padded to "
                                   "1024 frames, as the original does for short clips).")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps.")
_CONFIG_ARG = flags.DEFINE_string("config", "tiny,lambda_c=1.0,cosine",
                                  "Argument of configs/pretrain.py.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Processes writing the synthetic clips.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(arg: str):
  """configs/pretrain.py's get_config(arg)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("pretrain_config",
                                                os.path.join(ROOT, "configs", "pretrain.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def make_records(workdir: str, split: str, num_clips: int, seed: int) -> str:
  """Generates `num_clips` synthetic clips of `split` and preprocesses them; returns the dir."""
  from cav_mae_jax.data import prepare, synthetic  # pylint: disable=g-import-not-at-top
  out_dir = os.path.join(workdir, "records", split)
  if os.path.isfile(os.path.join(out_dir, "index.json")):
    return out_dir  # already prepared by an earlier run
  info = synthetic.generate_dataset(
      os.path.join(workdir, "synthetic"), num_clips, num_classes=_CLASSES.value, seed=seed,
      duration_s=_CLIP_SECONDS.value, split_name=split, num_workers=_WORKERS.value)
  prepare.prepare_records(info["datafile"], info["labels_csv"], out_dir, num_workers=0,
                          progress=False, strict=True)
  return out_dir


def plot_losses(records: list[dict], path: str) -> None:
  """Writes the train loss curves (total, audio MAE, visual MAE, contrastive) to a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  train = [r for r in records if "train/loss" in r]
  evals = [r for r in records if "eval/loss" in r]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for key in ("loss", "loss_mae_a", "loss_mae_v", "loss_c"):
    axes[0].plot([r["step"] for r in train], [r[f"train/{key}"] for r in train], label=key)
  axes[0].plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "ko--",
               label="held-out loss")
  axes[0].set_xlabel("step")
  axes[0].set_title("pretraining losses (tiny CAV-MAE, synthetic clips)")
  axes[0].legend()
  for direction in ("a2v", "v2a"):
    axes[1].plot([r["step"] for r in evals], [r[f"retrieval/{direction}/r@1"] for r in evals],
                 "o-", label=f"{direction} R@1")
  axes[1].axhline(100.0 / _EVAL_CLIPS.value, color="gray", ls=":", label="chance")
  axes[1].set_xlabel("step")
  axes[1].set_ylabel("%")
  axes[1].set_title("held-out retrieval")
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def report(records: list[dict], seconds: dict[str, float]) -> str:
  """The text report: losses and retrieval at init and after training."""
  evals = [r for r in records if "retrieval/a2v/r@1" in r]
  train = [r for r in records if "train/loss" in r]
  first, last = evals[0], evals[-1]
  clips = int(last["retrieval/num_clips"])
  lines = [f"CAV-MAE demo: tiny model, {clips} held-out clips (chance R@1 = {100 / clips:.2f}%)",
           f"{'':24s}{'init (step 0)':>16s}{'after step ' + str(last['step']):>18s}"]
  for key in ("eval/loss", "eval/loss_mae_a", "eval/loss_mae_v", "eval/loss_c", "eval/c_acc"):
    lines.append(f"{key:24s}{first[key]:16.4f}{last[key]:18.4f}")
  for direction in ("a2v", "v2a"):
    for metric in ("r@1", "r@5", "r@10", "median_rank"):
      key = f"retrieval/{direction}/{metric}"
      lines.append(f"{key:24s}{first[key]:16.2f}{last[key]:18.2f}")
  lines.append(f"train loss: first logged {train[0]['train/loss']:.4f} -> last "
               f"{train[-1]['train/loss']:.4f}")
  ratio = last["retrieval/a2v/r@1"] / (100 / clips)
  lines.append(f"held-out audio->visual R@1 = {last['retrieval/a2v/r@1']:.2f}% = {ratio:.1f}x "
               f"chance (init {first['retrieval/a2v/r@1']:.2f}%)")
  lines.append("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()))
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  logging.getLogger().setLevel(logging.WARNING)
  workdir = _WORKDIR.value
  seconds = {}
  start = time.time()
  print(f"[1/3] synthetic clips and records in {workdir} ...", flush=True)
  train_dir = make_records(workdir, "train", _TRAIN_CLIPS.value, seed=0)
  eval_dir = make_records(workdir, "eval", _EVAL_CLIPS.value, seed=1)
  seconds["data"] = time.time() - start

  from cav_mae_jax.train import metrics, trainer  # pylint: disable=g-import-not-at-top
  config = load_config(_CONFIG_ARG.value)
  config.data.train_dir, config.data.eval_dir = train_dir, eval_dir
  config.total_steps = _STEPS.value
  config.optim.learning_rate = _LEARNING_RATE.value
  config.eval.every_steps = _STEPS.value
  config.eval.batch_size = config.data.batch_size
  config.checkpoint.every_steps = _STEPS.value
  run_dir = os.path.join(workdir, "run")
  if os.path.isdir(run_dir):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(run_dir)  # the report compares init and the end of one fresh run
  print(f"[2/3] pretraining {_STEPS.value} steps on CPU ({_CONFIG_ARG.value}) ...", flush=True)
  start = time.time()
  trainer.train_and_evaluate(config, run_dir)
  seconds["training + evals"] = time.time() - start

  records = metrics.read_jsonl(os.path.join(run_dir, metrics.METRICS_FILE))
  png = os.path.join(workdir, "loss_curve.png")
  plot_losses(records, png)
  print("[3/3] report\n" + report(records, seconds))
  print(f"loss curve: {png}\nmetrics: {os.path.join(run_dir, metrics.METRICS_FILE)}")


if __name__ == "__main__":
  app.run(main)
