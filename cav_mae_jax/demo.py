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
import json
import math
import os
import re
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


# The demo's two splits: the option giving each one's clip count, and its generation seed.
_SPLITS = {"train": ("train_clips", 0), "eval": ("eval_clips", 1)}


def records_dir(options: DemoOptions, split: str) -> str:
  """Where the demo's records of `split` ('train' or 'eval') are."""
  return os.path.join(options.workdir, "records", split)


def _manifest_path(options: DemoOptions, split: str) -> str:
  return os.path.join(options.workdir, "records", f"{split}_made_with.json")


def _made_with(options: DemoOptions, split: str) -> dict[str, float]:
  """The options the records of `split` are made from (written beside them)."""
  count_option, seed = _SPLITS[split]
  return {count_option: getattr(options, count_option), "classes": options.classes,
          "clip_seconds": options.clip_seconds, "seed": seed}


def stale_records(options: DemoOptions, split: str) -> str | None:
  """Why the records of `split` an earlier run left do not fit `options` (e.g. its clip count);
  '' when they do, None when there are none (or only a partial set)."""
  from cav_mae_jax.data import records  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(records.index_path(records_dir(options, split))):
    return None
  try:
    with open(_manifest_path(options, split)) as f:
      made_with = json.load(f)
  except (OSError, ValueError):
    return "made by an earlier version of the demo, with unknown options"
  wanted = _made_with(options, split)
  changed = [f"--{k}={made_with.get(k)}" for k in wanted
             if k != "seed" and made_with.get(k) != wanted[k]]
  return f"made with {', '.join(changed)}" if changed else ""


def make_records(options: DemoOptions, split: str) -> str:
  """Generates the synthetic clips of `split` and preprocesses them; returns the records dir.

  Records an earlier run made with the same options are reused; records made with other
  options (clip count, classes, clip length) are replaced, and the demo says so.
  """
  from cav_mae_jax.data import prepare, synthetic  # pylint: disable=g-import-not-at-top
  out_dir = records_dir(options, split)
  stale = stale_records(options, split)
  if stale == "":
    return out_dir  # made by an earlier run with these options
  if stale:
    print(f"      the {split} records in {out_dir} were {stale}: making new ones", flush=True)
  synthetic_dir = os.path.join(options.workdir, "synthetic")
  for directory in (out_dir, os.path.join(synthetic_dir, "video", split)):
    if os.path.isdir(directory):
      shutil.rmtree(directory)
  made_with = _made_with(options, split)
  count_option, seed = _SPLITS[split]
  info = synthetic.generate_dataset(
      synthetic_dir, made_with[count_option], num_classes=options.classes, seed=seed,
      duration_s=options.clip_seconds, split_name=split, num_workers=options.workers)
  prepare.prepare_records(info["datafile"], info["labels_csv"], out_dir, num_workers=0,
                          progress=False, strict=True)
  with open(_manifest_path(options, split), "w") as f:
    json.dump(made_with, f)
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


def finetune_config(options: DemoOptions, train_dir: str, eval_dir: str,
                    pretrained: str | None) -> ml_collections.ConfigDict:
  """The fine-tuning config: the tiny model (the encoder of `options.config`) on the synthetic
  classes for `finetune_steps` steps, from `pretrained`'s workdir (also evaluated with the video
  or the audio missing) or random init.
  """
  from configs import common, finetune as finetune_configs  # pylint: disable=g-import-not-at-top
  config = finetune_configs.get_config(f"tiny,classes={options.classes}")
  config.data.train_dir, config.data.eval_dir = train_dir, eval_dir
  pretraining = demo_config(options, train_dir, eval_dir).model
  for name in _ENCODER_FIELDS:  # the pretrained encoder (vanilla_avmae: no modality blocks)
    config.model[name] = pretraining[name]
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
  return config


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """One training run; SIGTERM ends the whole program (after the run saved its step), where
  the run alone would stop and the next stage go on."""
  from cav_mae_jax import cli  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import trainer  # pylint: disable=g-import-not-at-top
  try:
    return trainer.train_and_evaluate(config, workdir, raise_on_preemption=True)
  except trainer.Preempted:
    raise cli.Terminated() from None


def finetune(options: DemoOptions, train_dir: str, eval_dir: str, pretrained: str | None,
             workdir: str) -> dict[str, float]:
  """Fine-tunes the tiny model (from `pretrained`'s workdir, or random init); held-out metrics.

  Evaluators: all modalities, and (with a pretrained start) the video or the audio missing.
  """
  config = finetune_config(options, train_dir, eval_dir, pretrained)
  if os.path.isdir(workdir):
    shutil.rmtree(workdir)
  with contextlib.redirect_stdout(io.StringIO()):  # the init report is in the workdir
    return train(config, workdir)


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
  """The demo's train and held-out records directories, made unless an earlier run made them
  with the same options."""
  return make_records(options, "train"), make_records(options, "eval")


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


# The config fields that demo flags set (demo_config, finetune_config), as regular expressions:
# a value that validation rejects there is reported under the flag the user typed.
_FLAG_FIELDS = {
    "pretraining": {r"total_steps": "steps", r"checkpoint\.every_steps": "steps",
                    r"evals\.\w+\.every_steps": "steps", r"optim\.learning_rate": "learning_rate"},
    "fine-tuning": {r"total_steps": "finetune_steps", r"model\.num_classes": "classes"},
}


# The model fields that make the encoder a fine-tuning run loads from the pretraining run: the
# demo's fine-tuning model takes them from its pretraining config.
_ENCODER_FIELDS = ("modalities", "modality_specific_depth", "encoder_depth", "embed_dim",
                   "num_heads", "mlp_ratio", "patch_size", "num_mel_bins")


def check_options(options: DemoOptions, finetuning: bool = True) -> None:
  """Raises ValueError naming the flag of an option the demo cannot run with; builds nothing.

  Checks the options that are not config fields, then builds the configs the demo will run (the
  pretraining config, and with `finetuning` both fine-tuning configs) and validates them as the
  trainer does (`validation.validate_config`), against the records when an earlier run made
  them with these options, else checking the clip counts of the records to make as the trainer
  and the losses evaluator check them. So a bad value is refused before
  any clip, record or run is made, and before an earlier run is deleted.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.data import dataset, fbank  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import optim, trainer, validation  # pylint: disable=g-import-not-at-top
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  for name in ("train_clips", "eval_clips", "classes", "workers"):
    if getattr(options, name) < 1:
      raise ValueError(f"--{name}={getattr(options, name)}: must be positive")
  min_seconds = fbank.FRAME_LENGTH_MS / 1000  # shorter clips have no fbank frame
  if not (math.isfinite(options.clip_seconds) and options.clip_seconds >= min_seconds):
    raise ValueError(f"--clip_seconds={options.clip_seconds}: must be at least {min_seconds:g} "
                     f"(one {fbank.FRAME_LENGTH_MS:g} ms fbank frame)")
  train_dir, eval_dir = records_dir(options, "train"), records_dir(options, "eval")
  try:
    recipe = pretrain.parse_arg(options.config)[0]
    configs = {"pretraining": [demo_config(options, train_dir, eval_dir)]}
  except ValueError as e:
    raise ValueError(f"--config={options.config!r}: {e}") from None
  if recipe != "tiny":
    raise ValueError(f"--config={options.config!r}: the demo pretrains the tiny model (it "
                     "fine-tunes configs/finetune.py:tiny from it); give the tiny recipe with "
                     "options, e.g. tiny,lambda_c=1.0,cosine")
  if "retrieval" not in configs["pretraining"][0].evals:
    raise ValueError(f"--config={options.config!r}: the demo reports held-out audio<->visual "
                     "retrieval, and this variant has no retrieval evaluator (one modality); "
                     "train it with tools/train.py")
  if finetuning:
    configs["fine-tuning"] = [finetune_config(options, train_dir, eval_dir, pretrained)
                              for pretrained in (os.path.join(options.workdir, "run"), None)]
    # Its init, the pretraining's run, is not made yet: checked as a run from random init.
    configs["fine-tuning"][0].init.source = configs["fine-tuning"][0].init.path = ""
  made = {split: stale_records(options, split) == "" for split in _SPLITS}
  reused = (f"; the demo reuses the records an earlier run made with these options in "
            f"{os.path.join(options.workdir, 'records')}: remove them to make new ones")
  for what, config in ((what, c) for what, group in configs.items() for c in group):
    # The config alone, then (records of an earlier run) the config against the records.
    for check_data in (False, True) if all(made.values()) else (False,):
      try:
        validation.validate_config(config, jax.device_count(), jax.process_count(),
                                   check_data=check_data)
      except ValueError as e:
        raise ValueError(_named_flag(options, what, e) + (reused if check_data else "")) from None
    # Records still to make: the checks of their clip counts that need the data.
    try:
      steps_per_epoch, total_steps = trainer.resolve_total_steps(config, options.train_clips)
      for name, entry in config.evals.items():
        if (not made["eval"] and entry.type == "losses" and entry.split == "eval"
            and not entry.dir):
          dataset.check_full_batches([options.eval_clips], f"config.evals.{name}.batch_size",
                                     entry.batch_size, "the demo's held-out split")
    except ValueError as e:
      flag = "eval_clips" if "config.evals." in str(e) else "train_clips"
      raise ValueError(f"--{flag}={getattr(options, flag)} ({what}): {e}") from None
    try:  # a warmup longer than the run (a cosine schedule's, for a few steps)
      optim.check_schedule(config, steps_per_epoch, total_steps)
    except ValueError as e:
      steps = "finetune_steps" if what == "fine-tuning" else "steps"
      raise ValueError(f"--{steps}={getattr(options, steps)} ({what}): {e}") from None


def _named_flag(options: DemoOptions, what: str, error: ValueError) -> str:
  """`error` of the `what` config, prefixed with the demo flag that set the field it names."""
  match = re.match(r"config\.([\w.]+)", str(error))
  field = match.group(1).rstrip(".") if match else ""
  for pattern, flag in _FLAG_FIELDS[what].items():
    if re.fullmatch(pattern, field):
      return f"--{flag}={getattr(options, flag)}: {error}"
  if what == "pretraining":  # the rest of it is the recipe and options of --config
    return f"--config={options.config!r}: {error}"
  return f"the demo's {what} config: {error}"


def run_demo(options: DemoOptions) -> str:
  """Runs the whole demo in `options.workdir`; returns the report (also printed as it goes).

  Every option is checked first (`check_options`): a bad one raises ValueError before anything
  is built or deleted.
  """
  check_options(options)
  seconds = {}
  start = time.time()
  print(f"[1/4] synthetic clips and records in {options.workdir} ...", flush=True)
  train_dir, eval_dir = prepare_demo_records(options)
  seconds["data"] = time.time() - start

  config = demo_config(options, train_dir, eval_dir)
  run_dir = os.path.join(options.workdir, "run")
  if os.path.isdir(run_dir):
    shutil.rmtree(run_dir)  # the report compares init and the end of one fresh run
  print(f"[2/4] pretraining {options.steps} steps on CPU ({options.config}) ...", flush=True)
  start = time.time()
  train(config, run_dir)
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
