"""The one-command demo: synthetic clips -> records -> tiny CAV-MAE pretraining -> fine-tuning.

1. writes a synthetic audio-visual dataset (sound and picture of each class co-vary; train and
   held-out splits, real MP4 files), 2. preprocesses both splits into records (fbank + frames),
3. pretrains the tiny model, evaluating the held-out split at initialization and at the end,
4. fine-tunes it on the synthetic classes, and the same model from random initialization with
   the same budget, 5. reports losses, audio<->visual retrieval R@1/5/10 in both directions
   against chance, and held-out accuracy / mAP of both fine-tuned models (the pretrained one
   also with the video or the audio missing), and writes a loss-curve PNG. `tools/demo.py` is
   its command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import time

import ml_collections

from cav_mae_jax.train import metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class DemoOptions:
  """What the demo builds and trains (tools/demo.py's flags)."""
  workdir: str
  train_clips: int = 128
  eval_clips: int = 32
  classes: int = 8
  clip_seconds: float = 4.0
  steps: int = 300
  config: str = "tiny,lambda_c=1.0,cosine"
  learning_rate: float = 1e-3
  workers: int = 2
  finetune_steps: int = 64


def make_records(options: DemoOptions, split: str, num_clips: int, seed: int) -> str:
  """Generates `num_clips` synthetic clips of `split` and preprocesses them; returns the dir."""
  from cav_mae_jax.data import prepare, records, synthetic  # pylint: disable=g-import-not-at-top
  out_dir = os.path.join(options.workdir, "records", split)
  if os.path.isfile(records.index_path(out_dir)):
    return out_dir  # already prepared by an earlier run
  info = synthetic.generate_dataset(
      os.path.join(options.workdir, "synthetic"), num_clips, num_classes=options.classes,
      seed=seed, duration_s=options.clip_seconds, split_name=split, num_workers=options.workers)
  prepare.prepare_records(info["datafile"], info["labels_csv"], out_dir, num_workers=0,
                          progress=False, strict=True)
  return out_dir


def plot_losses(records: list[dict], path: str, chance: float) -> None:
  """Writes the train loss curves and held-out retrieval R@1 to a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  train = [r for r in records if "train/loss" in r]
  evals = [r for r in records if "val/loss" in r]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for key in ("loss", "loss_mae_a", "loss_mae_v", "loss_c"):
    axes[0].plot([r["step"] for r in train], [r[f"train/{key}"] for r in train], label=key)
  axes[0].plot([r["step"] for r in evals], [r["val/loss"] for r in evals], "ko--",
               label="held-out loss")
  axes[0].set_xlabel("step")
  axes[0].set_title("pretraining losses (tiny CAV-MAE, synthetic clips)")
  axes[0].legend()
  for direction in ("a2v", "v2a"):
    axes[1].plot([r["step"] for r in evals], [r[f"retrieval/{direction}/r@1"] for r in evals],
                 "o-", label=f"{direction} R@1")
  axes[1].axhline(chance, color="gray", ls=":", label="chance")
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
           f"{'':26s}{'init (step 0)':>16s}{'after step ' + str(last['step']):>18s}"]
  for key in ("val/loss", "val/loss_mae_a", "val/loss_mae_v", "val/loss_c", "val/c_acc"):
    lines.append(f"{key:26s}{first[key]:16.4f}{last[key]:18.4f}")
  for direction in ("a2v", "v2a"):
    for metric in ("r@1", "r@5", "r@10", "median_rank"):
      key = f"retrieval/{direction}/{metric}"
      lines.append(f"{key:26s}{first[key]:16.2f}{last[key]:18.2f}")
  lines.append(f"train loss: first logged {train[0]['train/loss']:.4f} -> last "
               f"{train[-1]['train/loss']:.4f}")
  ratio = last["retrieval/a2v/r@1"] / (100 / clips)
  lines.append(f"held-out audio->visual R@1 = {last['retrieval/a2v/r@1']:.2f}% = {ratio:.1f}x "
               f"chance (init {first['retrieval/a2v/r@1']:.2f}%)")
  lines.append("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()))
  return "\n".join(lines)


def finetune(options: DemoOptions, train_dir: str, eval_dir: str, pretrained: str | None,
             workdir: str) -> dict[str, float]:
  """Fine-tunes the tiny model (from `pretrained`'s workdir, or random init); held-out metrics.

  Evaluators: all modalities, and (with a pretrained start) the video or the audio missing.
  """
  from cav_mae_jax.train import trainer  # pylint: disable=g-import-not-at-top
  from configs import common, finetune as finetune_configs  # pylint: disable=g-import-not-at-top
  config = finetune_configs.get_config(f"tiny,classes={options.classes}")
  config.data.train_dir, config.data.eval_dir = train_dir, eval_dir
  config.total_epochs, config.total_steps = None, options.finetune_steps
  config.checkpoint.every_epoch = False
  if pretrained:
    config.init.source, config.init.path = "workdir", pretrained
  modes = {"val": ""}
  if pretrained:
    modes.update(audio_only="missingaudioonly", video_only="missingvideoonly")
  with config.unlocked():
    config.evals = ml_collections.ConfigDict({
        name: common.evaluator("classification", every_steps=0, batch_size=16, mode=mode,
                               all_frames=False) for name, mode in modes.items()})
  if os.path.isdir(workdir):
    shutil.rmtree(workdir)
  with contextlib.redirect_stdout(io.StringIO()):  # the init report is in the workdir
    return trainer.train_and_evaluate(config, workdir)


def finetune_report(results: dict[str, dict[str, float]], clips: int) -> list[str]:
  """Report lines comparing the fine-tuned models."""
  lines = [f"fine-tuning on the synthetic classes ({clips} held-out clips): "
           f"{'accuracy':>10s}{'mAP':>8s}"]
  for label, summary, prefix in (
      ("from the pretrained model", results["pretrained"], "val"),
      ("  audio only (video missing)", results["pretrained"], "audio_only"),
      ("  video only (audio missing)", results["pretrained"], "video_only"),
      ("from random initialization", results["random"], "val")):
    lines.append(f"  {label:52s}{100 * summary[f'{prefix}/accuracy']:9.1f}%"
                 f"{summary[f'{prefix}/mAP']:8.3f}")
  return lines


def prepare_demo_records(options: DemoOptions) -> tuple[str, str]:
  """The demo's train and held-out records directories, generated unless already there."""
  train_dir = make_records(options, "train", options.train_clips, seed=0)
  eval_dir = make_records(options, "eval", options.eval_clips, seed=1)
  return train_dir, eval_dir


def demo_config(options: DemoOptions, train_dir: str, eval_dir: str) -> ml_collections.ConfigDict:
  """The demo's training config: `options.config` with its steps, rate and records."""
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config(options.config)
  config.data.train_dir, config.data.eval_dir = train_dir, eval_dir
  config.total_steps = options.steps
  config.optim.learning_rate = options.learning_rate
  config.checkpoint.every_steps = options.steps
  for entry in config.evals.values():
    entry.every_steps = options.steps
    entry.batch_size = config.data.batch_size
  return config


def run_demo(options: DemoOptions) -> str:
  """Runs the whole demo in `options.workdir`; returns the report (also printed as it goes)."""
  seconds = {}
  start = time.time()
  print(f"[1/4] synthetic clips and records in {options.workdir} ...", flush=True)
  train_dir, eval_dir = prepare_demo_records(options)
  seconds["data"] = time.time() - start

  from cav_mae_jax.train import trainer  # pylint: disable=g-import-not-at-top
  config = demo_config(options, train_dir, eval_dir)
  run_dir = os.path.join(options.workdir, "run")
  if os.path.isdir(run_dir):
    shutil.rmtree(run_dir)  # the report compares init and the end of one fresh run
  print(f"[2/4] pretraining {options.steps} steps on CPU ({options.config}) ...", flush=True)
  start = time.time()
  trainer.train_and_evaluate(config, run_dir)
  seconds["pretraining + evals"] = time.time() - start

  print(f"[3/4] fine-tuning {options.finetune_steps} steps from the pretrained model and from "
        "random initialization ...", flush=True)
  start = time.time()
  finetuned = {
      "pretrained": finetune(options, train_dir, eval_dir, run_dir,
                             os.path.join(options.workdir, "finetune")),
      "random": finetune(options, train_dir, eval_dir, None,
                         os.path.join(options.workdir, "finetune_random_init"))}
  seconds["fine-tuning x2"] = time.time() - start

  records = metrics_lib.read_jsonl(os.path.join(run_dir, metrics_lib.METRICS_FILE))
  png = os.path.join(options.workdir, "loss_curve.png")
  plot_losses(records, png, chance=100.0 / options.eval_clips)
  text = "\n".join([report(records, seconds),
                    *finetune_report(finetuned, options.eval_clips)])
  print("[4/4] report\n" + text)
  print(f"loss curve: {png}\nmetrics: {os.path.join(run_dir, metrics_lib.METRICS_FILE)}")
  return text
