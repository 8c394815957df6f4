"""Config sections shared by every task: init, data, optim, schedule, mesh, checkpoint, evals.

Every field any code reads lives here with its default and can be overridden with
`--config.<path>=<value>`; each section is checked in one place before anything is compiled
(`cav_mae_jax.train.validation`).
"""

from __future__ import annotations

import ml_collections

AUDIOSET_FBANK_MEAN = -5.081
AUDIOSET_FBANK_STD = 4.4849


def option(options: dict[str, str], key: str, kind: type, default=None):
  """The value of config option `key` ('recipe,key=value') as `kind`, else `default`; a value
  that is not one raises ValueError naming the option (int('abc') named nothing)."""
  if key not in options:
    return default
  try:
    return kind(options[key])
  except ValueError:
    raise ValueError(f"config option {key}={options[key]!r}: must be "
                     f"{'an integer' if kind is int else 'a number'}.") from None


def init_config() -> ml_collections.ConfigDict:
  """`config.init`: where a fresh run's parameters come from (resuming ignores it).

  source: ''              random initialization (config.seed)
          'workdir'       a training workdir's checkpoint (`step`: 0 = the latest)
          'params'        a params checkpoint written by tools/convert.py
          'cavmae'        an original CAV-MAE .pth (pretraining or fine-tuning layout)
          'imagenet_mae'  ImageNet-MAE weights (facebookresearch/mae .pth/.safetensors/.npz)
  Every source is mapped with the converter's strict key accounting; the report is printed
  and written to the workdir (init_report.txt).
  """
  init = ml_collections.ConfigDict()
  init.source = ""
  init.path = ""
  init.step = 0
  init.new_head = False          # a new classification head (another class count, or none)
  init.audio_pos_resize = ""     # '', 'trim', 'interpolate' or 'sincos': another audio length
  init.allow_unexpected = False  # ignore source arrays the target model has no place for
  return init


def data_config(batch_size: int, *, noise: bool, noise_on_device: bool,
                shuffle_buffer: int) -> ml_collections.ConfigDict:
  """`config.data`: where the clips are and the input pipeline (fields: cav_mae_jax/data/config.py).

  Each split ('train', 'eval') reads its records directory (`train_dir`, `eval_dir`:
  tools/preprocess.py output) when set, else the TFDS split `tfds_train_split` /
  `tfds_eval_split` of the dataset `tfds_name` ('cav_mae_clips/<config>[:<version>]', built
  by cav_mae_jax/data/tfds_builder.py) in `tfds_data_dir` ('' = TFDS's default); e.g.
  `--config.data.tfds_name=cav_mae_clips/audioset_csv --config.data.tfds_data_dir=/data/tfds`.
  fbank normalization: `fbank_stats='fixed'` uses `fbank_mean`/`fbank_std` (AudioSet's, as the
  original recipes); `fbank_stats='index'` uses the training split's own statistics (its
  index.json, or the TFDS builder's metadata) for every split.
  """
  data = ml_collections.ConfigDict()
  data.train_dir = ""
  data.eval_dir = ""
  data.tfds_name = ""
  data.tfds_data_dir = ""
  data.tfds_train_split = "train"
  data.tfds_eval_split = "test"
  data.batch_size = batch_size
  data.shuffle_buffer = shuffle_buffer
  data.exact_shuffle = False  # True: a fresh permutation of the clips every epoch
  data.eval_frame = 5
  data.eval_all_frames = False
  data.noise = noise
  data.noise_on_device = noise_on_device
  data.freqm = 0
  data.timem = 0
  data.mixup = 0.0
  data.mixup_on = "waveform"
  data.label_smooth = 0.0
  data.balanced_sampling = False
  data.fbank_stats = "fixed"  # or 'index': the training split's own mean/std
  data.fbank_mean = AUDIOSET_FBANK_MEAN
  data.fbank_std = AUDIOSET_FBANK_STD
  data.prefetch = 2
  data.reads_in_flight = 64  # balanced draws and mixup partners read at their offsets
  return data


def optim_config(learning_rate: float) -> ml_collections.ConfigDict:
  """`config.optim`: the original's Adam with coupled L2 (torch Adam(weight_decay=...))."""
  optim = ml_collections.ConfigDict()
  optim.learning_rate = learning_rate
  optim.b1 = 0.95
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.weight_decay = 5e-7
  optim.grad_clip_norm = 0.0  # 0 = off (the original does not clip)
  return optim


def multistep_schedule(first_decay_epoch: int, decay_every_epochs: int,
                       decay_factor: float = 0.5) -> ml_collections.ConfigDict:
  """`config.schedule` of torch MultiStepLR(range(first, 1000, every), gamma) stepped per epoch."""
  return _schedule("multistep", first_decay_epoch=first_decay_epoch,
                   decay_every_epochs=decay_every_epochs, decay_factor=decay_factor)


def cosine_schedule(warmup_epochs: float = 1.0) -> ml_collections.ConfigDict:
  """`config.schedule`: linear warmup then cosine decay to zero."""
  return _schedule("warmup_cosine", warmup_epochs=warmup_epochs)


def _schedule(kind: str, *, first_decay_epoch: int = 10, decay_every_epochs: int = 5,
              decay_factor: float = 0.5, warmup_epochs: float = 1.0,
              final_lr_fraction: float = 0.0) -> ml_collections.ConfigDict:
  """`config.schedule`: its `kind` and the fields of every kind, so that
  `--config.schedule.kind=warmup_cosine` on a multistep recipe finds its fields (with their
  defaults, each overridable); a kind reads only its own (the tools refuse an override of
  another kind's field, which would change nothing)."""
  schedule = ml_collections.ConfigDict()
  schedule.kind = kind
  schedule.first_decay_epoch = first_decay_epoch  # multistep: whole epochs, as MultiStepLR's
  schedule.decay_every_epochs = decay_every_epochs
  schedule.decay_factor = decay_factor
  schedule.warmup_epochs = warmup_epochs  # warmup_cosine
  schedule.final_lr_fraction = final_lr_fraction
  return schedule


def mesh_config() -> ml_collections.ConfigDict:
  """`config.mesh`: data-parallel over every device, parameters not sharded."""
  mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1: all devices not used by the other axis
  mesh.fsdp = 1
  return mesh


def checkpoint_config(every_steps: int) -> ml_collections.ConfigDict:
  """`config.checkpoint`: orbax saves every `every_steps` (0 = off) and at the end, the newest
  `keep` kept; with `every_epoch` also one at every epoch end, whose params are all kept apart
  (weight averaging)."""
  checkpoint = ml_collections.ConfigDict()
  checkpoint.every_steps = every_steps
  checkpoint.every_epoch = False
  checkpoint.keep = 3
  checkpoint.async_save = True
  return checkpoint


def evaluator(type_name: str, *, every_steps: int, batch_size: int, split: str = "eval",
              every_epochs: float = 0.0, at_start: bool = False,
              **fields) -> ml_collections.ConfigDict:
  """One `config.evals.<name>` entry (cav_mae_jax/eval/common.py lists the fields)."""
  return ml_collections.ConfigDict(dict(type=type_name, split=split, dir="",
                                        every_steps=every_steps, every_epochs=every_epochs,
                                        at_start=at_start, batch_size=batch_size, **fields))
