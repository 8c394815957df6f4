"""Bad pretraining configs fail before any tracing or compilation, naming the field."""

import os
import re

import jax
import pytest

from cav_mae_jax import eval as eval_lib
from cav_mae_jax import tasks
from cav_mae_jax.data import records
from cav_mae_jax.train import array_input
from cav_mae_jax.train import optim
from cav_mae_jax.train import trainer
from cav_mae_jax.train import validation
from cav_mae_jax.data import config as data_config
from configs import common as config_common
from configs import finetune as finetune_config
from configs import pretrain as pretrain_config


def _write_index(directory, fbank_shape=(1024, 128)):
  """A records directory of index.json and a shard of zeros (validation reads only the index,
  and checks that the shard is there and as large as its records' framing at least)."""
  os.makedirs(directory, exist_ok=True)
  index = records.RecordIndex(
      shards=(records.ShardInfo(file="records-00000-of-00001.tfrecord", num_examples=16),),
      num_examples=16, num_classes=1, label_counts=(16,), fbank_mean=-5.0, fbank_std=4.0,
      fbank_stats_count=10, store_waveform=False, fbank_shape=tuple(fbank_shape))
  records.write_index(records.index_path(directory), index)
  with open(os.path.join(directory, index.shards[0].file), "wb") as f:
    f.write(bytes(records.TFRECORD_FRAMING_BYTES * 16))
  return directory


@pytest.fixture(name="config")
def fixture_config(tmp_path):
  config = pretrain_config.get_config("tiny")
  config.data.train_dir = _write_index(str(tmp_path / "train"))
  config.data.eval_dir = _write_index(str(tmp_path / "eval"))
  return config


def test_valid_config_passes(config):
  model = validation.validate_config(config, num_devices=8)
  assert model.embed_dim == config.model.embed_dim


@pytest.mark.parametrize("kind", ["warmup_cosine", "multistep"])
def test_the_schedule_kind_switches_from_the_command_line(config, kind):
  # --config.schedule.kind=warmup_cosine on a multistep recipe was a KeyError traceback
  # ('warmup_epochs'): a schedule holds the fields of every kind, with their defaults.
  config.schedule.kind = kind
  validation.validate_config(config, num_devices=8)
  schedule = optim.make_schedule(config, steps_per_epoch=10, total_steps=100)
  rates = [float(schedule(step)) for step in (0, 50, 99)]
  assert (rates[0] == 0.0) == (kind == "warmup_cosine"), rates


def test_a_warmup_longer_than_the_run_is_refused(config):
  """An epoch recipe run for a number of steps (the base cosine recipe's one-epoch warmup is 7773
  steps on AudioSet-2M, a run of 2000 steps) warmed up all along: the rate never reached its
  peak and never decayed, and nothing said so. A warmup that ends with the run is kept."""
  config.schedule.kind, config.schedule.warmup_epochs = "warmup_cosine", 1.0
  optim.check_schedule(config, steps_per_epoch=7773, total_steps=7773)
  with pytest.raises(ValueError, match=re.escape(
      "config.schedule.warmup_epochs=1.0: 7773 warmup steps (7773 an epoch), and the run has "
      "2000: the learning rate would not reach config.optim.learning_rate=")):
    optim.check_schedule(config, steps_per_epoch=7773, total_steps=2000)
  config.schedule.kind = "multistep"  # no warmup: its fields are another kind's
  optim.check_schedule(config, steps_per_epoch=7773, total_steps=2000)


def _set(config, path, value):
  node = config
  *parents, leaf = path.split(".")
  for parent in parents:
    node = node[parent]
  node[leaf] = value


BAD_CASES = [
    # (field to set, bad value, field named in the error, extra kwargs to validate_config)
    ("data.batch_size", 12, "config.data.batch_size", {}),             # not divisible by 8
    ("mesh.data", 3, "config.mesh", {}),                               # 3 x 1 != 8 devices
    ("mesh.fsdp", 3, "config.mesh", {}),                               # -1 x 3 cannot cover 8
    ("model.mask_ratio_a", 1.0, "config.model.mask_ratio_a", {}),
    ("model.mask_ratio_v", 1.5, "config.model.mask_ratio_v", {}),
    ("model.mask_mode_a", "diagonal", "config.model.mask_mode_a", {}),
    ("model.audio_length", 1000, "config.model.audio_length", {}),    # not a multiple of 16
    ("data.train_dir", "/nonexistent/records", "config.data.train_dir", {}),
    ("data.eval_dir", "/nonexistent/eval", "config.data.eval_dir", {}),
    ("optim.learning_rate", -1e-4, "config.optim.learning_rate", {}),
    ("model.contrast_group_size", 3, "config.model.contrast_group_size", {}),  # 16 % 3
    ("evals.val.batch_size", 20, "config.evals.val.batch_size", {}),
    ("evals.retrieval.max_clips", 1, "config.evals.retrieval.max_clips", {}),
    ("evals.val.split", "test", "config.evals.val.split", {}),
    ("evals.retrieval.dir", "/nonexistent/eval", "config.evals.retrieval.dir", {}),
    ("evals.val.type", "mAP", "config.evals.val.type", {}),
    ("task", "segmentation", "config.task", {}),
    ("init.source", "torch", "config.init.source", {}),
    ("init.path", "", "config.init.path", {"init.source": "cavmae"}),
    ("init.path", "/nonexistent/model.pth", "config.init.path", {"init.source": "cavmae"}),
    ("data.freqm", -1, "config.data.freqm", {}),
    ("data.mixup_on", "audio", "config.data.mixup_on", {}),
    ("data.reads_in_flight", 0, "config.data.reads_in_flight", {}),
    ("schedule.kind", "linear", "config.schedule.kind", {}),
    ("total_steps", 0, "config.total_steps", {}),
    ("tensorboard", None, "config.tensorboard", {}),
    ("data.batch_size", 8, "config.data.batch_size", {"num_processes": 16, "num_devices": 8}),
    # `--config.<field>=None` on a field that needs a value stopped with a TypeError traceback
    # where the field was first used (seed: a message that did not name it).
    ("optim.learning_rate", None, "config.optim.learning_rate=None: needs a value", {}),
    ("seed", None, "config.seed=None: needs a value", {}),
    ("data.shuffle_buffer", None, "config.data.shuffle_buffer=None", {}),
    ("task", "finetune", "config.task='finetune' needs the config.finetune section", {}),
    # NaN passed `x <= 0` checks: it compiled and stopped at a NaN loss, or meant 'off'.
    ("model.temperature", float("nan"), "config.model.temperature", {}),
    ("optim.weight_decay", float("nan"), "config.optim.weight_decay", {}),
    ("optim.grad_clip_norm", float("inf"), "config.optim.grad_clip_norm", {}),
    ("schedule.first_decay_epoch", -1, "config.schedule.first_decay_epoch", {}),
    ("data.fbank_mean", float("nan"), "config.data.fbank_mean", {}),
    # Masks that leave the encoder nothing, or the reconstruction loss nothing (0 / 0).
    ("model.mask_ratio_a", 0.999, "config.model.mask_ratio_a=0.999: keeps int", {}),
    ("model.mask_ratio_v", 0.0, "config.model.mask_ratio_v=0.0: removes none", {}),
    # SpecAugment wider than the fbank; a data field the evaluators set themselves.
    ("data.freqm", 1000, "config.data.freqm", {}),
    ("data.timem", 5000, "config.data.timem", {}),
    ("data.eval_all_frames", True, "config.data.eval_all_frames", {}),
    # Where to load weights from, with no source: silently a random init.
    ("init.path", "/tmp", "config.init.path='/tmp': applies only", {}),
    ("init.new_head", True, "config.init.new_head", {}),
    # cuDNN's attention: in bfloat16 only, and on GPUs only (JAX's own errors came at tracing).
    ("model.attention_impl", "cudnn", "config.model.attention_impl", {}),  # tiny is float32
    ("model.attention_impl", "cudnn", "config.model.attention_impl='cudnn': cuDNN's attention "
     "runs on NVIDIA GPUs, and this run's devices are cpu", {"model.dtype": "bfloat16"}),
    # What training needs of its records, checked before the workdir is written (they came
    # from the input pipeline, after config.json and the logs were).
    ("data.mixup_on", "waveform", "config.data.mixup_on='waveform' needs records with "
     "waveforms", {"data.mixup": 0.5}),
    ("data.batch_size", 16, "process 1 of 2 gets no training examples", {"num_processes": 2}),
    # Settings the run would ignore: the user who sets them expects an effect.
    ("model.remat_policy", "attention_only", "config.model.remat_policy='attention_only': "
     "chooses what rematerialization keeps, and config.model.remat is False", {}),
    ("model.ft_mode", "audioonly", "config.model.ft_mode='audioonly': chooses the streams a "
     "fine-tuned classifier uses", {}),
    ("model.learnable_temperature", True, "config.model.learnable_temperature=True: learns the "
     "contrastive loss's temperature, and this model has no contrastive loss",
     {"model.lambda_c": 0.0}),
    # Non-finite values passed `>= 0` checks: a loss weight compiled and stopped at a NaN loss
    # without naming it, an infinite every_epochs failed after the first step, an infinite
    # mlp_ratio and a seed beyond 64 bits were tracebacks, a NaN every_epochs meant 'off'.
    ("model.lambda_c", float("nan"), "config.model.lambda_c=nan: must be finite", {}),
    ("model.lambda_mae", float("inf"), "config.model.lambda_mae=inf: must be finite", {}),
    ("evals.val.every_epochs", float("nan"), "config.evals.val.every_epochs=nan: must be finite",
     {}),
    ("evals.val.every_epochs", float("inf"), "config.evals.val.every_epochs=inf: must be finite",
     {}),
    ("model.mlp_ratio", float("inf"), "config.model.mlp_ratio=inf: must be finite", {}),
    # Finite, but not in float32, where the device computes: the rate became inf (a NaN loss at
    # step 2, not naming it), a weight 1e-300 0.
    ("optim.learning_rate", 1e39, "config.optim.learning_rate=1e", {}),  # (a regex: no '+')
    ("model.lambda_c", 1e-300, "config.model.lambda_c=1e-300: must be 0 or of magnitude in", {}),
    ("seed", 2**70, f"config.seed={2**70}: must fit in 64 bits", {}),
    # A structured mask of no whole column or row: the ablation trained with random masks.
    ("model.mask_mode_a", "time", "config.model.mask_mode_a='time': masks no whole time columns",
     {"model.mask_ratio_a": 0.01}),
    ("model.mask_mode_a", "tf", "config.model.mask_mode_a='tf': masks no whole frequency rows",
     {"model.mask_ratio_a": 0.1}),
    # Read at once: 10**9 took all of the host's memory and the kernel killed the run.
    ("data.reads_in_flight", 10**9, "config.data.reads_in_flight=1000000000: must be at most "
     "4096", {}),
    # An ImageNet MAE has no audio position grid to fit: the setting was ignored.
    ("init.audio_pos_resize", "trim", "config.init.audio_pos_resize='trim': fits a CAV-MAE "
     "checkpoint's audio position grid", {"init.source": "imagenet_mae", "init.path": "/tmp"}),
    # Seeds JAX's PRNG key cuts to 32 bits: -1 drew seed 4294967295's numbers, 2**32 seed 0's.
    ("seed", -1, "config.seed=-1: must be in", {}),
    ("seed", 2**32, f"config.seed={2**32}: must be in", {}),
    ("evals.val.mask_seed", -1, "config.evals.val.mask_seed=-1: must be in", {}),
    # An MLP of no hidden units (a ZeroDivisionError traceback in the initializer).
    ("model.mlp_ratio", 0.001, "config.model.mlp_ratio=0.001: gives an MLP of no hidden units",
     {}),
    ("data.label_smooth", 0.1, "config.data.label_smooth=0.1: smooths the training labels, "
     "and config.task='pretrain' trains on none", {}),
    ("data.tfds_data_dir", "/data/tfds", "config.data.tfds_data_dir='/data/tfds': applies to a "
     "TFDS dataset, and config.data.tfds_name is ''", {}),
    ("data.tfds_train_split", "bogus", "config.data.tfds_train_split='bogus': applies to", {}),
    ("init.new_head", True, "config.init.new_head=True: makes a new classification head, and a "
     "pretraining model has none", {"init.source": "workdir", "init.path": "/tmp"}),
    # Read by no split (both have a records directory): a bogus name trained as if unset.
    ("data.tfds_name", "bogus", "config.data.tfds_name='bogus': names the TFDS dataset of the "
     "splits without a records directory, and both have one", {}),
    ("model.num_classes", 3, "config.model.num_classes=3: sizes a fine-tuned classifier's head, "
     "and a pretraining model has none", {}),
    # Ignored with a random init, as the other fields of loading are refused.
    ("init.allow_unexpected", True, "config.init.allow_unexpected=True: applies only", {}),
    # Ignored too: a params or .pth file has one set of weights.
    ("init.step", 7, "config.init.step=7: picks a checkpoint of a training workdir", {
        "init.source": "params", "init.path": "/tmp"}),
    # No other clip in a contrastive group: loss_c was 0 and c_acc 1 at every step.
    ("model.contrast_group_size", 1, "config.model.contrast_group_size=1: leaves each clip "
     "alone in its contrastive group", {}),
    ("data.batch_size", 1, "config.data.batch_size=1: is the contrastive group", {
        "model.contrast_group_size": 0, "num_devices": 1}),
    ("model.lambda_c", 0.0, "config.model.lambda_c=0.0: lambda_mae and lambda_c are both 0: "
     "nothing to train", {"model.lambda_mae": 0.0}),
]


@pytest.mark.parametrize("path,value,field,kwargs", BAD_CASES,
                         ids=[f"{c[0]}={c[1]}" for c in BAD_CASES])
def test_bad_config_names_the_field(config, path, value, field, kwargs):
  for other_path, other_value in [(k, v) for k, v in kwargs.items() if "." in k]:
    _set(config, other_path, other_value)
  kwargs = {"num_devices": 8, **{k: v for k, v in kwargs.items() if "." not in k}}
  _set(config, path, value)
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    validation.validate_config(config, **kwargs)


def test_unset_duration_is_allowed_and_nan_epochs_named(config):
  config.total_steps, config.total_epochs = None, 2.0
  validation.validate_config(config, num_devices=8)
  config.total_epochs = float("nan")  # was "cannot convert float NaN to integer"
  with pytest.raises(ValueError, match=r"config\.total_epochs=nan: must be finite"):
    validation.validate_config(config, num_devices=8)


def test_cav_keeps_every_token_and_finetuning_has_no_contrast_groups(config):
  config.model.lambda_mae, config.model.mask_ratio_a, config.model.mask_ratio_v = 0.0, 0.0, 0.0
  validation.validate_config(config, num_devices=8)  # contrastive only: nothing to reconstruct
  finetuning = finetune_config.get_config("tiny")
  finetuning.model.contrast_group_size = 5  # fine-tuning has no contrastive loss to group:
  # a recorded run's config is evaluated without the pretraining batch checks; training with
  # it is refused (test_pretraining_settings_a_finetuning_run_would_ignore_are_refused).
  validation.validate_config(finetuning, num_devices=8, check_data=False, training=False)


def test_a_run_without_records_takes_specaugment_masks_beyond_its_input():
  """SpecAugment's mask sizes are bounded by the model's input for the input pipeline alone: the
  train-step benchmark of a shorter fine-tuning model (in-memory batches) was refused."""
  config = finetune_config.get_config("tiny")
  config.model.audio_length = 32  # the recipe's time mask is 48
  validation.validate_config(config, num_devices=8, check_data=False)
  with pytest.raises(ValueError, match=r"^config\.data\.timem=48: must be in \[0, 32\] \(the "
                     r"model's fbank frames\)"):
    data_config.DataConfig.from_config(config)


def test_the_groups_of_a_model_without_contrast_must_divide_the_batch(config):
  """AV-MAE's reconstruction loss is summed over the groups too: a group size that does not
  divide the batch passed here and stopped the run at its first step."""
  config.model.lambda_c, config.model.contrast_group_size = 0.0, 3  # batch 16
  with pytest.raises(ValueError, match=r"^config\.model\.contrast_group_size=3: must divide "
                     r"config\.data\.batch_size=16"):
    validation.validate_config(config, num_devices=8)


def test_pretraining_loss_checks_leave_other_configs_alone(config):
  # Fine-tuning uses neither pretraining loss weight: both 0 was refused as "nothing to train".
  finetuning = finetune_config.get_config("tiny")
  finetuning.model.lambda_mae = finetuning.model.lambda_c = 0.0
  validation.validate_config(finetuning, num_devices=8, check_data=False)
  # Without the contrastive loss, a group (or batch) of one clip is a reconstruction like any.
  config.model.lambda_c, config.model.contrast_group_size = 0.0, 1
  validation.validate_config(config, num_devices=8)


@pytest.mark.parametrize("field,value", [("contrast_group_size", 3),
                                         ("contrast_bidirectional", True),
                                         ("mask_mode_a", "time")])
def test_pretraining_settings_a_finetuning_run_would_ignore_are_refused(field, value):
  finetuning = finetune_config.get_config("tiny")
  finetuning.model[field] = value
  with pytest.raises(ValueError, match="^" + re.escape(
      f"config.model.{field}={value!r}: ") + ".*config.task='finetune' has no contrastive loss"):
    validation.validate_config(finetuning, num_devices=8, check_data=False)
  # A run that recorded such a config is still evaluated.
  validation.validate_config(finetuning, num_devices=8, check_data=False, training=False)


def test_settings_with_an_effect_pass_and_finetuning_learns_no_temperature(config):
  config.model.remat, config.model.remat_policy = True, "attention_only"
  config.model.learnable_temperature = True  # with the contrastive loss of the tiny recipe
  validation.validate_config(config, num_devices=8)
  finetuning = finetune_config.get_config("tiny,mode=audioonly")
  validation.validate_config(finetuning, num_devices=8, check_data=False)
  finetuning.model.learnable_temperature = True
  with pytest.raises(ValueError, match=r"^config\.model\.learnable_temperature=True: learns "
                     r"the contrastive loss's temperature, which only pretraining has"):
    validation.validate_config(finetuning, num_devices=8, check_data=False)


def test_cudnn_attention_passes_for_gpus(config):
  config.model.attention_impl, config.model.dtype = "cudnn", "bfloat16"
  validation.validate_config(config, num_devices=8, platforms={"gpu"})
  with pytest.raises(ValueError, match="devices are cpu, gpu"):
    validation.validate_config(config, num_devices=8, platforms={"gpu", "cpu"})


def test_records_fbank_shape_must_match_model(config, tmp_path):
  config.data.train_dir = _write_index(str(tmp_path / "short"), fbank_shape=(512, 128))
  with pytest.raises(ValueError, match=r"config\.model\.audio_length.*512-frame"):
    validation.validate_config(config, num_devices=8)
  config.data.train_dir = _write_index(str(tmp_path / "narrow"), fbank_shape=(1024, 64))
  with pytest.raises(ValueError, match=r"config\.model\.num_mel_bins.*64 mel bins"):
    validation.validate_config(config, num_devices=8)


def test_unknown_config_name_and_option():
  with pytest.raises(ValueError, match="config name 'huge'"):
    pretrain_config.get_config("huge")
  with pytest.raises(ValueError, match="config option 'maskratio'"):
    pretrain_config.get_config("base,maskratio=0.5")
  # A value of the wrong type named no option: "invalid literal for int() with base 10: 'abc'".
  with pytest.raises(ValueError, match=r"^config option mask_ratio='abc': must be a number\.$"):
    pretrain_config.get_config("base,mask_ratio=abc")
  with pytest.raises(ValueError, match=r"^config option classes='4\.5': must be an integer\.$"):
    finetune_config.get_config("tiny,classes=4.5")
  with pytest.raises(ValueError, match="config option 'bidirectional'"):
    pretrain_config.get_config("base,bidirectional")


@pytest.mark.parametrize("arg, message", [
    # Each was trained as the variant, the option dropped without a word (lambda_c 0).
    ("base,vanilla_avmae,lambda_c=0.1", "config option lambda_c=0.1: vanilla_avmae has no "
     "contrastive loss (it sets lambda_c=0)"),
    ("base,lambda_c=0.1,avmae", "config option lambda_c=0.1: avmae has no contrastive loss"),
    ("base,symmetric,audio_mae", "config option symmetric: audio_mae has no contrastive loss"),
    ("base,cav,avmae", "config options avmae, cav: each is a model variant of its own; choose "
     "one."),
])
def test_ablation_options_that_contradict_each_other_are_refused(arg, message):
  with pytest.raises(ValueError, match="^" + re.escape(message)):
    pretrain_config.get_config(arg)
  assert pretrain_config.get_config("base,avmae,lambda_c=0").model.lambda_c == 0  # agrees


def test_a_bidirectional_contrast_without_contrast_is_refused(config):
  config.model.lambda_c, config.model.contrast_bidirectional = 0.0, True
  with pytest.raises(ValueError, match=r"^config\.model\.contrast_bidirectional=True: makes the "
                     r"contrastive loss bidirectional, and this model has no contrastive loss"):
    validation.validate_config(config, num_devices=8)
  validation.validate_config(config, num_devices=8, training=False)  # a recorded run's config


def test_trainer_fails_before_compiling(config, monkeypatch):
  # The trainer validates first: a bad field raises before any jit function is built.
  def no_jit(*args, **kwargs):
    raise AssertionError("jax.jit called before validation failed")
  monkeypatch.setattr(jax, "jit", no_jit)
  config.model.mask_mode_a = "diagonal"
  with pytest.raises(ValueError, match=r"config\.model\.mask_mode_a"):
    trainer.train_and_evaluate(config, "/nonexistent/workdir")


@pytest.mark.parametrize("arg,expected", [
    ("base", dict(embed_dim=768, contrast_group_size=12, dtype="bfloat16")),
    ("scale++", dict(contrast_group_size=64)),
    ("base,mask_ratio=0.85,mask_mode=time", dict(mask_ratio_a=0.85, mask_ratio_v=0.85,
                                                 mask_mode_a="time")),
    ("base,lambda_c=0.1,symmetric", dict(lambda_c=0.1, contrast_bidirectional=True)),
    ("base,vanilla_avmae", dict(modality_specific_depth=0, lambda_c=0.0)),
    ("base,avmae", dict(modality_specific_depth=11, lambda_c=0.0)),
    ("base,cav", dict(lambda_mae=0.0, lambda_c=0.01)),
    ("base,audio_mae", dict(modalities="audio", modality_specific_depth=0, lambda_c=0.0)),
    ("base,visual_mae", dict(modalities="visual", modality_specific_depth=0, lambda_c=0.0)),
    ("vgg", dict(embed_dim=768)),
])
def test_recipes_and_ablations(arg, expected):
  config = pretrain_config.get_config(arg)
  for key, value in expected.items():
    assert config.model[key] == value, key
  recipe = arg.split(",")[0]
  lr, batch = {"base": (5e-5, 48), "scale++": (2e-4, 256), "vgg": (1e-4, 120)}[recipe]
  assert (config.optim.learning_rate, config.data.batch_size) == (lr, batch)
  assert config.total_epochs == 25 and config.total_steps is None
  validation.validate_config(config, num_devices=4, check_data=False)
  with pytest.raises(AttributeError):  # locked: a typo cannot add a dead key
    config.optim.learnin_rate = 1.0


@pytest.mark.parametrize("variant", pretrain_config.VARIANTS)
def test_every_variant_can_feed_its_evaluators(variant):
  """Each preset's evaluators get working predict functions from its task (shapes only, nothing
  compiled). A single-modality MAE has no retrieval: its audio_mae preset crashed at step 0."""
  config = pretrain_config.get_config(f"tiny,{variant}")
  task = tasks.get_task(config)
  eval_lib.validate_evals(config, task.predict_fns, num_devices=1, num_processes=1)
  params = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  m = config.model
  clips = array_input.random_clips(2, m.audio_length, m.num_mel_bins, m.image_size)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in clips.items()}
  for entry in config.evals.values():
    for needed in eval_lib.EVALUATOR_TYPES[entry.type][2]:
      extra = (jax.random.PRNGKey(1),) if needed == "losses" else ()
      jax.eval_shape(task.predict_fns[needed], params, batch, *extra)
  assert ("retrieval" in config.evals) == (m.modalities == "audiovisual")


@pytest.mark.parametrize("encoder", ["audio_mae", "visual_mae"])
def test_retrieval_of_a_single_modality_finetuned_model_is_refused_saying_why(encoder):
  """The fine-tuning task had a 'features' function for every model: a retrieval evaluator of
  an audio-only model passed and failed when it ran ('NoneType' object has no attribute 'mean')."""
  config = finetune_config.get_config(f"tiny,encoder={encoder}")
  with config.unlocked():
    config.evals.retrieval = config_common.evaluator("retrieval", every_steps=10, batch_size=4,
                                                     max_clips=1725)
  task = tasks.get_task(config)
  with pytest.raises(ValueError, match=re.escape(
      "config.evals.retrieval.type='retrieval': a single-modality model (config.model.modalities="
      f"{config.model.modalities!r}) has no audio-visual retrieval")):
    eval_lib.validate_evals(config, task.predict_fns, num_devices=1, num_processes=1)
  audiovisual = tasks.get_task(finetune_config.get_config("tiny,mode=audioonly"))
  assert "features" in audiovisual.predict_fns  # both streams are there to rank


@pytest.mark.parametrize("arg,mode,problem", [
    ("tiny,encoder=audio_mae", "videoonly", "mode 'videoonly' needs a modality that "
     "config.model.modalities='audio' does not have"),
    ("tiny,encoder=visual_mae", "missingaudioonly", "mode 'missingaudioonly' needs a modality"),
    ("tiny,encoder=audio_mae,mode=audioonly", "multimodal", "mode 'multimodal' pools through "
     "LayerNorms (norm) that a modalities='audio' model fine-tuned with ft_mode='audioonly' "
     "does not have"),
])
def test_a_classification_mode_the_model_cannot_run_is_refused_before_training(arg, mode,
                                                                               problem):
  """It passed the checks and failed when the evaluator first ran: after the first epoch of a
  fine-tuning run (or a checkpoint's loading), and without naming the field."""
  config = finetune_config.get_config(arg)
  config.evals.val.mode = mode
  with pytest.raises(ValueError, match=re.escape(f"config.evals.val.mode={mode!r}: {problem}")):
    validation.validate_config(config, num_devices=1, check_data=False)
  for fine in ("", "audioonly" if "audio_mae" in arg else "videoonly"):
    config.evals.val.mode = fine  # the model's own mode
    validation.validate_config(config, num_devices=1, check_data=False)


@pytest.mark.parametrize("modalities", ["audio", "visual"])
def test_retrieval_of_a_single_modality_model_is_refused_saying_why(modalities):
  """--config.model.modalities alone (not the preset) keeps the recipe's retrieval evaluator; the
  error said the task had no 'features' function, not why nor what to do."""
  config = pretrain_config.get_config("tiny")
  config.model.modalities, config.model.lambda_c = modalities, 0.0
  task = tasks.get_task(config)
  with pytest.raises(ValueError, match=re.escape(
      "config.evals.retrieval.type='retrieval': a single-modality model "
      f"(config.model.modalities={modalities!r}) has no audio-visual retrieval; leave it out "
      "with --config.evals.retrieval=None")):
    eval_lib.validate_evals(config, task.predict_fns, num_devices=1, num_processes=1)
  # tools/retrieval.py on such a model: the same reason, before anything is run.
  from cav_mae_jax.eval import features  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="^" + re.escape(
      f"a single-modality model (config.model.modalities={modalities!r}) has no audio-visual "
      "retrieval")):
    features.retrieval(features.Loaded(task, mesh=None, params=None, step=0), batches=[])


def test_scale_plus_recipe():
  config = pretrain_config.get_config("scale+,cosine")
  assert (config.optim.learning_rate, config.data.batch_size) == (1e-4, 120)
  assert config.schedule.kind == "warmup_cosine"


def test_resolve_total_steps(config):
  assert trainer.resolve_total_steps(config, 100) == (6, 300)  # tiny: total_steps=300, batch 16
  config = pretrain_config.get_config("base")
  assert trainer.resolve_total_steps(config, 4800) == (100, 2500)


def test_a_run_shorter_than_its_averaging_range_is_warned_of():
  # Training accepted it and tools/average.py later said "no epoch-end checkpoint of epoch(s)".
  config = finetune_config.get_config("as20k")  # averages epochs 3-15
  assert trainer.averaging_beyond_run(config, steps_per_epoch=10, total_steps=150) == ""
  assert trainer.averaging_beyond_run(config, steps_per_epoch=10, total_steps=45) == (
      "config.finetune.average_last_epoch=15: this run ends after 4 whole epoch(s), so "
      "tools/average.py will not find the checkpoints of epochs 5-15 that it averages by default "
      "(give --first_epoch / --last_epoch then, or set the fields).")
  assert trainer.averaging_beyond_run(pretrain_config.get_config("tiny"), 10, 5) == ""
  config.checkpoint.every_epoch = False  # no epoch-end checkpoints to average (the demo's)
  assert trainer.averaging_beyond_run(config, steps_per_epoch=10, total_steps=45) == ""


@pytest.mark.parametrize("ratio", [float("inf"), float("nan"), 0.0])
def test_model_config_alone_names_a_bad_mlp_ratio(ratio):
  # ModelConfig is also built outside validate_config (a saved model_config.json): inf or NaN
  # was an OverflowError / ValueError of int() that named nothing.
  from cav_mae_jax import models  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"config\.model\.mlp_ratio=.*: must be positive and finite"):
    models.ModelConfig(mlp_ratio=ratio).validate()


def test_fields_refused_in_training_alone_leave_recorded_configs_evaluable(config):
  # An earlier run's recorded config may hold them (they changed nothing then): its evaluation
  # (tools/evaluate.py with the workdir's config and new data paths) is not refused.
  config.data.tfds_name, config.model.num_classes = "cav_mae_clips/datafile", 309
  validation.validate_config(config, num_devices=8, training=False)
  with pytest.raises(ValueError, match=r"^config\.model\.num_classes=309: "):
    validation.validate_config(config, num_devices=8)
  # So are the checks of this kind added later (a seed, a structured mask, an ImageNet init).
  for field, value, extra in (
      ("seed", -1, {}), ("model.mask_mode_a", "freq", {"model.mask_ratio_a": 0.1}),
      ("init.audio_pos_resize", "trim", {"init.source": "imagenet_mae", "init.path": "/tmp"})):
    recorded = pretrain_config.get_config("tiny")
    for path, setting in {field: value, **extra}.items():
      _set(recorded, path, setting)
    validation.validate_config(recorded, num_devices=8, training=False, check_data=False)
    with pytest.raises(ValueError, match=f"^config\\.{field.replace('.', '[.]')}="):
      validation.validate_config(recorded, num_devices=8, check_data=False)
