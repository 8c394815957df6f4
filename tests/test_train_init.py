"""A run starts from every `config.init` source, with the params equal to the converted source.

Each run trains one step whose learning rate is 0 (warmup), so the parameters it checkpoints are
exactly the ones it started from; they must equal the source mapped by the converter's rules.
Sources: (a) a training workdir, (b) params written by tools/convert.py, (c) an original .pth,
(d) ImageNet-MAE weights. Tiny shapes, in-memory clips.
"""

import dataclasses
import os
import re
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from cav_mae_jax import dir_lock
from cav_mae_jax import models
from cav_mae_jax import tasks
from cav_mae_jax.convert import export
from cav_mae_jax.convert import formats
from cav_mae_jax.convert import imagenet_mae
from cav_mae_jax.convert import init_source
from cav_mae_jax.convert import io
from cav_mae_jax.convert import state_dict as sd
from cav_mae_jax.train import array_input
from cav_mae_jax.train import checkpoint
from cav_mae_jax.train import metrics
from cav_mae_jax.train import optim
from cav_mae_jax.train import trainer
from configs import pretrain
from test_convert_imagenet_mae import mae_shapes
from test_convert_layout import Dims

DIMS = Dims(embed_dim=32, num_heads=2, modality_specific_depth=1, encoder_depth=2,
            decoder_embed_dim=16, decoder_depth=1, audio_length=32, image_size=32)


pytestmark = pytest.mark.usefixtures("fast_compilation")  # conftest.py


def tiny_config(**init):
  config = pretrain.get_config("tiny,cosine")
  m = config.model
  m.embed_dim, m.num_heads, m.encoder_depth = DIMS.embed_dim, DIMS.num_heads, DIMS.encoder_depth
  m.modality_specific_depth = DIMS.modality_specific_depth
  m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads = DIMS.decoder_embed_dim, 1, 2
  m.audio_length, m.image_size = DIMS.audio_length, DIMS.image_size
  config.data.batch_size = 8
  config.total_steps = 1
  config.schedule.warmup_epochs = 0.5  # lr(step 0) = 0: the one step leaves params as they are
  config.log_every_steps = 1
  for key, value in init.items():
    config.init[key] = value
  with config.unlocked():
    config.evals = ml_collections.ConfigDict()
  return config


def train(config, workdir):
  clips = array_input.random_clips(16, DIMS.audio_length, 128, DIMS.image_size, seed=0)
  inputs = trainer.Inputs(array_input.ArrayInput(clips, 8, seed=0), None, 16)
  trainer.train_and_evaluate(config, str(workdir), inputs)
  params, step = checkpoint.read_workdir_params(str(workdir))
  assert step == config.total_steps
  return params


def assert_trees_equal(actual, expected):
  flat_a, flat_e = sd.flatten_params(actual), sd.flatten_params(expected)
  assert sorted(flat_a) == sorted(flat_e)
  for path, value in flat_e.items():
    np.testing.assert_array_equal(np.asarray(flat_a[path]), np.asarray(value), err_msg=str(path))


@pytest.fixture(scope="module", name="source")
def fixture_source(tmp_path_factory):
  """A trained workdir (learning rate 1e-3 for 2 steps, so its params are not the init)."""
  workdir = tmp_path_factory.mktemp("source")
  config = tiny_config()
  config.total_steps, config.schedule.warmup_epochs, config.log_every_steps = 2, 0.0, 2
  params = train(config, workdir)
  # The logged lr is the rate of the logged step (step 2 uses schedule(1)), not a window mean.
  schedule = optim.make_schedule(config, steps_per_epoch=2, total_steps=2)
  logged = metrics.read_jsonl(str(workdir / metrics.METRICS_FILE))
  assert [r["step"] for r in logged] == [2]
  assert logged[0]["train/lr"] == pytest.approx(float(schedule(1)), rel=1e-7)
  assert float(schedule(0)) != float(schedule(1))
  return workdir, params


def run_init_params(config):
  """The random init the run would use for what the source lacks (config.seed's init key)."""
  init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  return jax.tree.map(np.asarray, jax.jit(tasks.get_task(config).init_params)(init_rng))


def test_a_workdir_with_a_damaged_checkpoint_is_an_error_naming_it(source, tmp_path):
  workdir, _ = source
  damaged = tmp_path / "damaged"
  shutil.copytree(workdir, damaged)
  state = damaged / checkpoint.CHECKPOINT_DIR / "2" / "state"
  (state / "_METADATA").write_text("garbage")
  with pytest.raises(checkpoint.CheckpointReadError,
                     match=f"^{re.escape(str(state))}: the checkpoint cannot be read"):
    checkpoint.read_workdir_params(str(damaged))


def _flip_byte(path, fraction=0.5):
  data = bytearray(path.read_bytes())
  data[int(len(data) * fraction)] ^= 0x10
  path.write_bytes(bytes(data))


# A damaged OCDBT manifest fails loudly inside orbax, whose threads then call into its closed
# event loop: library noise, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_parameter_data_is_refused_not_used(source, tmp_path):
  # orbax stores no checksums: a flipped bit inside an array's data used to come back as other
  # parameter values without a word. Every data file of the checkpoint is damaged in turn.
  workdir, params = source
  state = workdir / checkpoint.CHECKPOINT_DIR / "2" / "state"
  data_files = sorted(p.relative_to(state) for p in state.rglob("*")
                      if p.is_file() and p.parent.name == "d")
  assert data_files
  caught_by_digest = []
  # The data are compressed and orbax packs them differently from run to run, so a byte flip
  # may also be caught by a decompressor or the OCDBT b-tree's CRC: other places are tried in
  # turn until the checksums have caught one (the middle byte alone missed in a suite run).
  for fraction in (0.5, 0.25, 0.75, 0.125, 0.875):
    for i, name in enumerate(data_files):
      damaged = tmp_path / f"damaged_{fraction}_{i}"
      shutil.copytree(workdir, damaged)
      _flip_byte(damaged / checkpoint.CHECKPOINT_DIR / "2" / "state" / name, fraction)
      try:
        restored, _ = checkpoint.read_workdir_params(str(damaged))
      except checkpoint.CheckpointReadError as e:
        if "differ from what was saved" in str(e):
          caught_by_digest.append(damaged)
        continue
      assert_trees_equal(restored, params)  # a file the params do not use
    if caught_by_digest:
      break
  assert caught_by_digest, data_files
  # Resuming refuses such a checkpoint too (the trainer's restore checks the same digest).
  config = tiny_config()
  config.total_steps, config.schedule.warmup_epochs, config.log_every_steps = 4, 0.0, 2
  with pytest.raises(checkpoint.CheckpointReadError, match="differ from what was saved"):
    train(config, caught_by_digest[0])


def test_random_init_step_keeps_params(tmp_path):
  config = tiny_config()
  assert_trees_equal(train(config, tmp_path / "run"), run_init_params(config))


def test_from_training_workdir(source, tmp_path):
  workdir, params = source
  started = train(tiny_config(source="workdir", path=str(workdir)), tmp_path / "run")
  assert_trees_equal(started, params)
  report = (tmp_path / "run" / init_source.REPORT_FILE).read_text()
  assert f"initialized from workdir {workdir}" in report and "mapped: " in report


def test_from_converted_params(source, tmp_path):
  _, params = source
  io.save_params(tmp_path / "params", params)
  assert_trees_equal(train(tiny_config(source="params", path=str(tmp_path / "params")),
                           tmp_path / "run"), params)


def test_a_learned_temperature_goes_on_from_our_checkpoint(source, tmp_path):
  # The original has no temperature parameter, so the mapping through its layout keeps the
  # target's at init; from our own checkpoint the learned value is taken instead.
  _, params = source
  learned = {**params, "log_temperature": np.asarray(np.log(0.09), np.float32)}
  io.save_params(tmp_path / "params", learned)
  config = tiny_config(source="params", path=str(tmp_path / "params"))
  config.model.learnable_temperature = True
  assert_trees_equal(train(config, tmp_path / "run"), learned)
  report = (tmp_path / "run" / init_source.REPORT_FILE).read_text()
  assert "log_temperature" not in report.split("kept at init")[-1]

  # A source without one (a fixed temperature) leaves the target's at its init value, and says so.
  io.save_params(tmp_path / "fixed", params)
  loaded, report = init_source.load_init_params(
      tiny_config(source="params", path=str(tmp_path / "fixed")).init, config.model,
      finetune=False, init_params={**params, "log_temperature": np.float32(np.log(0.05))})
  assert float(loaded["log_temperature"]) == np.float32(np.log(0.05))
  assert report.kept_init == {"log_temperature": "not in the original model"}

  # A target without one drops the source's, in the report's notes.
  _, report = init_source.load_init_params(
      tiny_config(source="params", path=str(tmp_path / "params")).init,
      tiny_config().model, finetune=False, init_params=params)
  assert any(note.startswith("log_temperature") and "left out" in note for note in report.notes)


def test_from_original_pth(source, tmp_path):
  pytest.importorskip("torch", reason="writing a .pth needs torch")
  _, params = source
  state_dict, _ = export.to_original_state_dict(params, module_prefix=True)
  formats.write_state_dict(str(tmp_path / "audio_model.pth"), state_dict)
  config = tiny_config(source="cavmae", path=str(tmp_path / "audio_model.pth"))
  assert_trees_equal(train(config, tmp_path / "run"), params)


def test_from_imagenet_mae(tmp_path):
  rng = np.random.default_rng(3)
  mae = {k: rng.standard_normal(s).astype(np.float32)
         for k, s in mae_shapes(DIMS, decoder=False).items()}
  np.savez(tmp_path / "mae.npz", **mae)
  config = tiny_config(source="imagenet_mae", path=str(tmp_path / "mae.npz"))
  expected, report = imagenet_mae.imagenet_mae_to_params(mae, run_init_params(config))
  assert report.kept_init  # the decoder keeps its init values: MAE has none here
  assert_trees_equal(train(config, tmp_path / "run"), expected)


def test_a_source_that_does_not_fit_fails_before_the_input_pipeline(source, tmp_path,
                                                                    monkeypatch):
  from test_config_validation import _write_index  # pylint: disable=import-outside-toplevel
  workdir, _ = source
  config = tiny_config(source="workdir", path=str(workdir))
  config.model.encoder_depth, config.model.modality_specific_depth = 3, 2
  config.data.train_dir = _write_index(str(tmp_path / "records"), (DIMS.audio_length, 128))

  def built(_):
    raise AssertionError("the input pipeline was built before the starting weights were read")

  monkeypatch.setattr(trainer, "records_inputs", built)
  with pytest.raises(sd.ParamsMismatchError, match=rf"config.init.path={workdir}: .*blocks_"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))


def test_a_resumed_run_does_not_read_its_starting_weights_again(source, tmp_path, monkeypatch):
  workdir, _ = source
  config = tiny_config(source="workdir", path=str(workdir))
  assert checkpoint.latest_saved_step(str(tmp_path / "run")) is None
  train(config, tmp_path / "run")
  assert checkpoint.latest_saved_step(str(tmp_path / "run")) == 1

  def read(*args, **kwargs):
    raise AssertionError("a resumed run read its starting weights")

  monkeypatch.setattr(init_source, "load_init_params", read)
  config.total_steps = 2
  train(config, tmp_path / "run")


def test_a_path_of_another_kind_is_named_with_its_field_or_flag(source, tmp_path):
  """orbax's words for a directory that is no params checkpoint (a records directory, a workdir
  given as --params) were "Metadata file (named _METADATA) does not exist at <path>"."""
  from cav_mae_jax.train import evaluate  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  workdir, params = source
  other = tmp_path / "records"
  other.mkdir()
  neither = (f"{other}: neither a training workdir (no checkpoints/ inside) nor a params "
             "checkpoint (no orbax _METADATA file inside)")
  for kind in ("workdir", "params"):
    config = tiny_config(source=kind, path=str(other))
    with pytest.raises(FileNotFoundError, match=re.escape(f"config.init.path={neither}")):
      init_source.load_init_params(config.init, config.model, finetune=False,
                                   init_params=params)
  # The field at fault is named: a step the workdir lacks, a file that is no state dict.
  config = tiny_config(source="workdir", path=str(workdir), step=999)
  with pytest.raises(FileNotFoundError, match=r"^config\.init\.step=999: .*no checkpoint of "
                     r"step 999 \(have \[2\]\)"):
    init_source.load_init_params(config.init, config.model, finetune=False, init_params=params)
  text = tmp_path / "notes.pth"
  text.write_text("not weights\n")
  for kind in ("cavmae", "imagenet_mae"):
    config = tiny_config(source=kind, path=str(text))
    with pytest.raises(ValueError, match="^" + re.escape(f"config.init.path={text}: not a "
                                                         "PyTorch")):
      init_source.load_init_params(config.init, config.model, finetune=False,
                                   init_params=params)
  io.save_params(tmp_path / "params", params)
  config = tiny_config()
  task, mesh = tasks.get_task(config), mesh_lib.make_mesh(config.mesh)
  for where, message in [
      (dict(params_path=str(other)), f"--params: {neither}"),
      (dict(params_path=str(workdir)), f"--params: {workdir} is a training workdir, not a "
       f"params checkpoint; give it as --workdir={workdir}"),
      (dict(workdir=str(tmp_path / "params")), f"--workdir: {tmp_path / 'params'} is a params "
       f"checkpoint, not a training workdir; give it as --params={tmp_path / 'params'}"),
      (dict(workdir=str(other)), f"--workdir: {other}: not a training workdir"),
  ]:
    with pytest.raises(FileNotFoundError, match="^" + re.escape(message)):
      evaluate.load_params(task, mesh, **where)
  with pytest.raises(ValueError, match=r"^--step=2: picks one of the checkpoints of --workdir"):
    evaluate.load_params(task, mesh, step=2, params_path=str(tmp_path / "params"))
  evaluate.load_params(task, mesh, params_path=str(tmp_path / "params"))  # the right kinds
  evaluate.load_params(task, mesh, workdir=str(workdir), step=2)


def test_wrong_architecture_names_the_parameters(source, tmp_path):
  workdir, _ = source
  config = tiny_config(source="workdir", path=str(workdir))
  config.model.encoder_depth, config.model.modality_specific_depth = 3, 2
  with pytest.raises(sd.ParamsMismatchError, match=rf"config.init.path={workdir}: .*blocks_"):
    train(config, tmp_path / "run")
  # The run made its workdir and failed before writing anything: no empty workdir is left.
  assert not os.path.exists(tmp_path / "run")
  # A workdir that was there before stays, as do one's files.
  for existing in ([], ["notes.txt"]):
    (tmp_path / "mine").mkdir()
    for name in existing:
      (tmp_path / "mine" / name).write_text("kept")
    with pytest.raises(sd.ParamsMismatchError):
      train(config, tmp_path / "mine")
    assert sorted(os.listdir(tmp_path / "mine")) == sorted(existing + [dir_lock.LOCK_FILE])
    shutil.rmtree(tmp_path / "mine")


def test_another_head_count_is_refused_naming_the_field(source, tmp_path):
  """qkv is embed x 3*embed for any head count: the parameters would load and silently compute
  another model."""
  workdir, _ = source
  config = tiny_config(source="workdir", path=str(workdir))
  config.model.num_heads = DIMS.num_heads // 2
  with pytest.raises(ValueError, match=rf"config.model.num_heads={DIMS.num_heads // 2}: "
                     rf"{workdir} was trained with num_heads={DIMS.num_heads}"):
    train(config, tmp_path / "run")
  config = tiny_config(source="workdir", path=str(workdir))
  config.model.decoder_num_heads = 1  # the decoder is loaded too (a pretraining target)
  with pytest.raises(ValueError, match="config.model.decoder_num_heads=1: .* decoder_num_heads=2"):
    train(config, tmp_path / "run2")


def test_another_frequency_grid_is_refused_naming_the_field(source, tmp_path):
  """The audio position table is laid out on the source's frequency x time patch grid: with 64
  mel bins (4 rows of patches, not 8) it was read as another grid, or resized along the wrong
  axis, without a word."""
  workdir, _ = source
  config = tiny_config(source="workdir", path=str(workdir))
  config.model.num_mel_bins = 64
  with pytest.raises(ValueError, match=rf"^config\.model\.num_mel_bins=64: {workdir} was trained "
                     r"on 128 mel bins \(its stored config\), and its audio position table is "
                     r"laid out on 8 rows of frequency patches, this model's on 4"):
    train(config, tmp_path / "run")
  model = models.ModelConfig.from_config(models.model_config("base"))
  init_source.check_architecture("cavmae", "audio_model.pth", model, finetune=True)
  with pytest.raises(ValueError, match=r"num_mel_bins=64: audio_model\.pth was trained on 128 mel "
                     r"bins \(the original's fbank, at embed_dim=768\)"):
    init_source.check_architecture("cavmae", "audio_model.pth",
                                   dataclasses.replace(model, num_mel_bins=64), finetune=True)
  # A file in the original's layout of another width (ours, through convert.py to-torch) says
  # nothing of its mel bins: not checked, as its head counts are not.
  init_source.check_architecture("cavmae", "mine.pth", dataclasses.replace(
      model, embed_dim=64, num_heads=2, num_mel_bins=64), finetune=True)


def test_evaluating_with_another_head_count_is_refused(source):
  """tools/evaluate.py, retrieval.py and extract_features.py read checkpoints by shape only."""
  from cav_mae_jax.train import evaluate  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  workdir, _ = source
  config = tiny_config()
  mesh = mesh_lib.make_mesh(config.mesh)
  evaluate.load_params(tasks.get_task(config), mesh, workdir=str(workdir))  # the same heads
  config.model.num_heads = DIMS.num_heads // 2
  with pytest.raises(ValueError, match=f"{workdir} was trained with num_heads={DIMS.num_heads}"):
    evaluate.load_params(tasks.get_task(config), mesh, workdir=str(workdir))


def test_converting_an_original_checkpoint_checks_its_head_counts(tmp_path, monkeypatch):
  from cav_mae_jax.convert import pipelines  # pylint: disable=import-outside-toplevel
  config = tiny_config().model
  monkeypatch.setitem(init_source.ORIGINAL_HEADS, "num_heads", (config.embed_dim, 1))
  state_dict, _ = export.to_original_state_dict(run_init_params(tiny_config()), module_prefix=True)
  formats.write_state_dict(tmp_path / "original.safetensors", state_dict)
  with pytest.raises(ValueError, match=f"config.model.num_heads={config.num_heads}: .*"
                     "original's architecture"):
    pipelines.cavmae_to_checkpoint(tmp_path / "original.safetensors", tmp_path / "out", config,
                                   finetune=False)
  assert not (tmp_path / "out").exists()


def test_an_original_checkpoint_has_the_originals_head_counts():
  model = models.ModelConfig.from_config(models.model_config("base"))
  init = ("cavmae", "audio_model.pth")
  init_source.check_head_counts(*init, model, finetune=False)  # 12 and 16: the original's
  with pytest.raises(ValueError, match="config.model.num_heads=8: .* num_heads=12 .*--config"
                     ".model.num_heads=12"):
    init_source.check_head_counts(*init, dataclasses.replace(model, num_heads=8), finetune=True)
  init_source.check_head_counts(  # the decoder is not loaded into a fine-tuning model
      *init, dataclasses.replace(model, decoder_num_heads=8), finetune=True)
