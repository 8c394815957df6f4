"""Fine-tuning and linear probe: the classification evaluator, the probe's frozen encoder, a
run started from a pretraining workdir, epoch-end checkpoints and their average, bad inputs.

Tiny shapes, in-memory clips (no records), cheap XLA compilation.
"""

import json
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from cav_mae_jax import eval as eval_lib
from cav_mae_jax import tasks
from cav_mae_jax.convert import init_source
from cav_mae_jax.convert import state_dict as sd
from cav_mae_jax.eval import classification
from cav_mae_jax.eval import stats
from cav_mae_jax.train import array_input
from cav_mae_jax.train import averaging
from cav_mae_jax.train import checkpoint
from cav_mae_jax.train import mesh as mesh_lib
from cav_mae_jax.train import trainer
from cav_mae_jax.train import validation
from configs import common
from configs import finetune
from configs import pretrain

CLASSES, CLIPS, BATCH = 5, 16, 8


pytestmark = pytest.mark.usefixtures("fast_compilation")  # conftest.py


def _shrink(config):
  m = config.model
  m.embed_dim, m.num_heads, m.encoder_depth, m.modality_specific_depth = 32, 2, 2, 1
  m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads = 16, 1, 2
  m.audio_length, m.image_size = 32, 32
  config.data.batch_size = BATCH
  config.log_every_steps = 1
  with config.unlocked():
    config.evals = ml_collections.ConfigDict()
  return config


def ft_config(arg="tiny", **init):
  config = _shrink(finetune.get_config(f"{arg},classes={CLASSES}"))
  config.total_epochs = 2.0  # 2 steps per epoch of 16 clips
  for key, value in init.items():
    config.init[key] = value
  return config


def clips(seed=0):
  arrays = array_input.random_clips(CLIPS, 32, 128, 32, seed=seed)
  labels = np.eye(CLASSES, dtype=np.float32)[np.arange(CLIPS) % CLASSES]
  return {**arrays, "label": labels}


def train(config, workdir, seed=0):
  inputs = trainer.Inputs(array_input.ArrayInput(clips(seed), BATCH, seed=0), None, CLIPS)
  return trainer.train_and_evaluate(config, str(workdir), inputs)


def init_params(config):
  init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  return jax.tree.map(np.asarray, jax.jit(tasks.get_task(config).init_params)(init_rng))


def _batch_source(data, frames, seen):
  """Evaluation batches of 11 (9 + 7 valid clips, the rest padding), as the data pipeline gives
  them: every frame with `eval_all_frames`, else the middle one."""
  pad = lambda x: np.concatenate([x, np.zeros((11 - len(x),) + x.shape[1:], x.dtype)])

  def batch_source(split, directory, batch_size, **overrides):
    del directory
    seen.append((split, batch_size, overrides))
    image = frames if overrides.get("eval_all_frames") else frames[:, 1]
    return iter([{"audio": pad(data["audio"][i:i + 9]), "image": pad(image[i:i + 9]),
                  "label": pad(data["label"][i:i + 9]),
                  "valid": pad(np.ones(min(9, 16 - i), bool))} for i in (0, 9)])

  return batch_source


def _evaluator(task, mode, all_frames, batch_source, **kwargs):
  mesh = mesh_lib.make_mesh(common.mesh_config(), jax.devices()[:1])
  entry = common.evaluator("classification", every_steps=1, batch_size=11, mode=mode,
                           all_frames=all_frames)
  return classification.ClassificationEvaluator("val", entry, task.predict_fns, mesh,
                                                batch_source, **kwargs)


def _assert_stats(result, scores, labels):
  expected = stats.classification_stats(np.asarray(scores), labels)
  for key, value in expected.items():
    assert result[f"val/{key}"] == pytest.approx(value, abs=1e-6), key


def test_classification_evaluator_scores_every_clip_once():
  config = ft_config()  # cross-entropy
  task = tasks.get_task(config)
  params = init_params(config)
  data = clips(seed=1)
  frames = np.stack([data["image"], data["image"][::-1], -data["image"]], axis=1)  # 3 frames
  logits = lambda f, mode=None: task.predict_fns["logits"](
      params, {"audio": data["audio"], "image": frames[:, f]}, mode)
  seen = []
  batch_source = _batch_source(data, frames, seen)

  # All frames: the mean of every frame's softmax, as the original's multi-frame ensemble.
  result = dict(_evaluator(task, "", True, batch_source).run(params))
  assert seen.pop() == ("eval", 11, {"eval_all_frames": True})
  assert result["val/num_clips"] == CLIPS
  _assert_stats(result, np.mean([jax.nn.softmax(logits(f), -1) for f in range(3)], 0),
                data["label"])
  # And every frame's mAP and accuracy of its logits, as the original prints them.
  for f in range(3):
    expected = stats.classification_stats(np.asarray(logits(f)), data["label"])
    assert result[f"val/frame{f}/mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert result[f"val/frame{f}/accuracy"] == expected["accuracy"]
  assert "val/frame3/mAP" not in result and "val/loss" not in result

  # One frame: the logits, as the original's per-epoch validation. Softmax would rank the clips
  # of a class differently here, which moves mAP.
  result = dict(_evaluator(task, "", False, batch_source).run(params))
  assert seen.pop() == ("eval", 11, {"eval_all_frames": False})
  _assert_stats(result, logits(1), data["label"])
  assert not [key for key in result if "frame" in key]
  # The evaluator's scores are the logits function's, compiled, to the bit (one forward gives
  # the logits, the probabilities and the losses).
  evaluator = _evaluator(task, "", False, batch_source)
  compiled = jax.jit(task.predict_fns["logits"])
  np.testing.assert_array_equal(
      evaluator.predictions(params)["scores"],
      np.concatenate([np.asarray(compiled(params, b))[b["valid"]]
                      for b in batch_source("eval", "", 11)]))
  # The held-out loss: cross-entropy against the labels, averaged over the clips (float64 here).
  shifted = np.asarray(logits(1), np.float64)
  shifted -= shifted.max(axis=1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  expected_loss = np.mean(-np.sum(data["label"] * log_softmax, axis=1))
  assert result["val/loss"] == pytest.approx(expected_loss, rel=1e-6)
  softmax_map = stats.classification_stats(np.asarray(jax.nn.softmax(logits(1), -1)),
                                           data["label"])["mAP"]
  assert result["val/mAP"] != pytest.approx(softmax_map, abs=1e-6)

  # An audio-only mode needs no frame loop: one pass on logits, without loading every frame.
  result = dict(_evaluator(task, "missingaudioonly", True, batch_source).run(params))
  assert seen.pop() == ("eval", 11, {"eval_all_frames": False})
  _assert_stats(result, logits(1, "missingaudioonly"), data["label"])

  # An empty split is an error naming the evaluator.
  empty = lambda *a, **k: iter([{**next(batch_source("eval", "", 11)), "valid": np.zeros(11, bool)}])
  with pytest.raises(ValueError, match="evaluator 'val'.*no clips"):
    dict(_evaluator(task, "", True, empty).run(params))


def test_an_audio_only_model_is_scored_in_one_pass():
  """The model's own ft_mode counts for mode='': an audio-only model is not run 10 times."""
  config = ft_config("tiny,mode=audioonly")
  task = tasks.get_task(config)
  params = init_params(config)
  data = clips(seed=2)
  frames = np.stack([data["image"]] * 3, axis=1)
  seen = []
  evaluator, = eval_lib.build_evaluators(
      _with_val(config, all_frames=True), task.predict_fns,
      mesh_lib.make_mesh(common.mesh_config(), jax.devices()[:1]),
      _batch_source(data, frames, seen))
  result = dict(evaluator.run(params))
  assert seen == [("eval", 11, {"eval_all_frames": False})]
  _assert_stats(result, task.predict_fns["logits"](params, {"audio": data["audio"]}),
                data["label"])


def _full_batches(data):
  """A batch source of `data` in full batches of BATCH valid clips (any split, any size)."""
  return lambda *args, **kwargs: iter(
      [{**{k: v[i:i + BATCH] for k, v in data.items()}, "valid": np.ones(BATCH, bool)}
       for i in range(0, CLIPS, BATCH)])


def _with_val(config, **fields):
  with config.unlocked():
    config.evals.val = common.evaluator("classification", every_steps=1, batch_size=11,
                                        mode="", all_frames=False)
  config.evals.val.update(fields)
  return config


def test_probe_leaves_the_encoder_bit_identical(tmp_path, capsys):
  config = ft_config("tiny,probe")
  config.total_epochs, config.optim.learning_rate = 1.0, 1e-2
  train(config, tmp_path)
  # No init source: said once, as the original's fine-tuning script does.
  notes = [l for l in capsys.readouterr().out.splitlines() if l.startswith("note:")]
  assert notes == ["note: probe starts from random weights (config.init.source is ''); the "
                   "paper's start is a pretrained model: --config.init.source=workdir|params|"
                   "cavmae --config.init.path=..."]
  before = sd.flatten_params(init_params(config))
  after = sd.flatten_params(checkpoint.read_workdir_params(str(tmp_path))[0])
  for path, value in before.items():
    if path[0].startswith("mlp_head"):
      continue
    np.testing.assert_array_equal(after[path], value, err_msg=str(path))
  assert not np.array_equal(after[("mlp_head_1", "kernel")], before[("mlp_head_1", "kernel")])
  # No optimizer state for the encoder: Adam's moments cover the head only.
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  state = ocp.StandardCheckpointer().restore(str(tmp_path / "checkpoints" / "2" / "state"))
  moments = sum(np.size(x) for x in jax.tree.leaves(state["state"]["opt_state"]))
  head = sum(np.size(v) for p, v in before.items() if p[0].startswith("mlp_head"))
  assert head * 2 <= moments <= head * 2 + 16  # mu and nu of the head (+ step counters)


def test_finetune_from_pretraining_then_average_epochs(tmp_path, capsys):
  pretrained = tmp_path / "pretrain"
  config = _shrink(pretrain.get_config("tiny"))
  config.model.contrast_group_size, config.total_steps = 0, 1
  inputs = trainer.Inputs(array_input.ArrayInput(clips(), BATCH, seed=0), None, CLIPS)
  trainer.train_and_evaluate(config, str(pretrained), inputs)

  config = ft_config(source="workdir", path=str(pretrained))
  config.checkpoint.every_epoch = True
  capsys.readouterr()
  train(config, tmp_path / "ft")
  assert "note:" not in capsys.readouterr().out  # a pretrained start needs no note
  report = (tmp_path / "ft" / init_source.REPORT_FILE).read_text()
  assert "new classification head" in report and "decoder, not part of the target" in report
  assert checkpoint.saved_steps(str(tmp_path / "ft")) == [2, 4]  # both epoch ends kept
  averaged, steps = averaging.average_workdir(str(tmp_path / "ft"), 1, 2)
  assert steps == [2, 4]
  first = checkpoint.read_workdir_params(str(tmp_path / "ft"), 2)[0]
  second = checkpoint.read_workdir_params(str(tmp_path / "ft"), 4)[0]
  for (path, a), b, m in zip(sd.flatten_params(first).items(),
                             sd.flatten_params(second).values(),
                             sd.flatten_params(averaged).values()):
    expected = ((a.astype(np.float64) + b) / 2).astype(np.float32)
    np.testing.assert_array_equal(m, expected, err_msg=str(path))
  with pytest.raises(FileNotFoundError, match=r"epoch\(s\) 3 \(2 steps per epoch"):
    averaging.average_workdir(str(tmp_path / "ft"), 2, 3)
  # A mistyped last epoch is one range (it listed every epoch, 24 GB for 10**12).
  with pytest.raises(FileNotFoundError, match=r"epoch\(s\) 3-1000000000000 \("):
    averaging.average_workdir(str(tmp_path / "ft"), 1, 10**12)

  # Another class count: refused unless a new head is asked for.
  other = ft_config(source="workdir", path=str(tmp_path / "ft"))
  other.model.num_classes = CLASSES + 2
  with pytest.raises(sd.ParamsMismatchError, match="mlp_head_1"):
    init_source.load_init_params(other.init, other.model, finetune=True,
                                 init_params=init_params(other))
  other.init.new_head = True
  params, _ = init_source.load_init_params(other.init, other.model, finetune=True,
                                           init_params=init_params(other))
  assert params["mlp_head_1"]["kernel"].shape == (32, CLASSES + 2)


@pytest.mark.parametrize("arg, field", [("tiny,mode=stereo", "mode='stereo'"),
                                        ("tiny,heads=3", "heads=3"),
                                        ("huge", "'huge'")])
def test_bad_finetune_config_arg(arg, field):
  with pytest.raises(ValueError, match=field):
    finetune.get_config(arg)


def test_bad_finetune_fields_name_the_field():
  config = ft_config()
  config.finetune.loss = "hinge"
  with pytest.raises(ValueError, match=r"config\.finetune\.loss"):
    validation.validate_config(config, 8, check_data=False)
  config = _shrink(finetune.get_config("tiny"))
  with config.unlocked():
    config.evals.val = common.evaluator("classification", every_steps=1, batch_size=8,
                                        mode="stereo", all_frames=False)
  with pytest.raises(ValueError, match=r"config\.evals\.val\.mode"):
    validation.validate_config(config, 8, check_data=False)


def test_one_class_under_cross_entropy_is_refused():
  """The softmax of one class is 1: loss 0, accuracy 1, no gradient; it trained nothing."""
  config = finetune.get_config("tiny,classes=1")
  assert config.finetune.loss == "ce"
  with pytest.raises(ValueError, match=r"^config\.model\.num_classes=1: with "
                     r"config\.finetune\.loss='ce' .* use --config\.finetune\.loss=bce"):
    validation.validate_config(config, 8, check_data=False)
  config.finetune.loss = "bce"
  validation.validate_config(config, 8, check_data=False)


def test_the_tasks_that_read_labels_get_their_class_count_checked():
  from cav_mae_jax import tasks  # pylint: disable=import-outside-toplevel
  assert [tasks.uses_labels(get_config(arg)) for get_config, arg in [
      (finetune.get_config, "tiny"), (finetune.get_config, "tiny,probe"),
      (pretrain.get_config, "tiny")]] == [True, True, False]


def test_evaluating_a_checkpoint_in_another_ft_mode_is_refused(tmp_path):
  """Every ft_mode has the same parameters: an audio-only model scored as multimodal would run
  its untrained joint-stream norms and give silently wrong numbers."""
  from cav_mae_jax.convert import io  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import evaluate  # pylint: disable=import-outside-toplevel
  audio_only = ft_config("tiny,mode=audioonly")
  path = str(tmp_path / "params")
  io.save_params(path, init_params(audio_only), model_config=audio_only.model.to_dict())
  data = clips(seed=3)
  source = _full_batches(data)
  with pytest.raises(ValueError, match="fine-tuned with config.model.ft_mode='audioonly', the "
                                       "config has 'multimodal'"):
    evaluate.evaluate(_with_val(ft_config(), batch_size=BATCH), params_path=path,
                      batch_source=source)
  _, results = evaluate.evaluate(_with_val(audio_only, batch_size=BATCH), params_path=path,
                                 batch_source=source)
  assert results["val/num_clips"] == CLIPS
  # Another mode on purpose: the evaluator's own mode.
  _, results = evaluate.evaluate(_with_val(audio_only, batch_size=BATCH, mode="multimodal"),
                                 params_path=path, batch_source=source)
  assert results["val/num_clips"] == CLIPS


def test_evaluating_a_workdir_with_another_fbank_normalization_is_refused(tmp_path):
  """A run's fbanks were normalized one way; a config that normalizes otherwise (e.g. a
  recipe's AudioSet numbers for a fbank_stats='index' run) would shift its inputs silently."""
  from cav_mae_jax.eval import features  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import evaluate  # pylint: disable=import-outside-toplevel
  config = ft_config()
  config.total_epochs = 0.5
  config.data.fbank_stats = "index"
  train(config, tmp_path)
  data = clips(seed=4)
  source = _full_batches(data)
  other = _with_val(ft_config(), batch_size=BATCH)  # fbank_stats='fixed', AudioSet's numbers
  with pytest.raises(ValueError, match="the run normalized fbanks with fbank_stats='index', "
                                       "the config with fbank_stats='fixed'.*"
                                       "--config.data.fbank_stats=index"):
    evaluate.evaluate(other, workdir=str(tmp_path), batch_source=source)
  with pytest.raises(ValueError, match="fbank_stats='index'"):
    features.load(other, workdir=str(tmp_path))
  other.data.fbank_stats = "index"
  _, results = evaluate.evaluate(other, workdir=str(tmp_path), batch_source=source)
  assert results["val/num_clips"] == CLIPS
  # Other fixed numbers than the run's are refused too, naming them.
  config.data.fbank_stats, other.data.fbank_stats = "fixed", "fixed"
  train(config, tmp_path / "fixed")
  other.data.fbank_mean = -4.0
  with pytest.raises(ValueError, match="fbank_mean=-5.081, fbank_std=4.4849"):
    evaluate.evaluate(other, workdir=str(tmp_path / "fixed"), batch_source=source)


def test_params_checkpoints_record_and_check_the_runs_fbank_normalization(tmp_path):
  """tools/average.py and the eval export record how the run normalized its fbanks, so that
  a params checkpoint scored under another normalization is refused as a workdir is (it was
  scored with whatever the evaluating config said, silently)."""
  from cav_mae_jax.convert import io  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.convert import pipelines  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import evaluate  # pylint: disable=import-outside-toplevel
  from test_tools_cli import _run_tool  # pylint: disable=import-outside-toplevel
  config = ft_config()
  config.total_epochs = 1.0
  config.checkpoint.every_epoch = True
  config.data.fbank_mean, config.data.fbank_std = -4.0, 3.0
  train(config, tmp_path / "run")
  pipelines.checkpoint_to_eval_export(tmp_path / "run", tmp_path / "export", dtype="float32")
  result = _run_tool("average.py", ["--workdir", str(tmp_path / "run"), "--out",
                                    str(tmp_path / "avg"), "--first_epoch=1", "--last_epoch=1"],
                     tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  # --overwrite replaces the average (a params checkpoint), never what it reads: with --out the
  # workdir, the run's checkpoints, metrics and config were replaced by the averaged params.
  run_files = {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()}
  run = str(tmp_path / "run")
  result = _run_tool("average.py", ["--workdir", run, "--out", run, "--overwrite",
                                    "--first_epoch=1", "--last_epoch=1"], tmp_path)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip() == (f"error: --out {run}: is --workdir {run}, which this command "
                                   "reads; write the output elsewhere")
  result = _run_tool("average.py", ["--workdir", run, "--out", str(tmp_path / "avg"),
                                    "--overwrite", "--first_epoch=1", "--last_epoch=1"], tmp_path)
  assert result.returncode == 0 and result.stdout.startswith("averaged epochs 1-1"), result.stderr
  assert {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*"))
          if p.is_file()} == run_files
  data = clips(seed=4)
  source = _full_batches(data)
  for name in ("export", "avg"):
    path = str(tmp_path / name)
    assert io.load_fbank_normalization(path) == {"fbank_stats": "fixed", "fbank_mean": -4.0,
                                                 "fbank_std": 3.0}
    other = _with_val(ft_config(), batch_size=BATCH)  # AudioSet's numbers
    with pytest.raises(ValueError, match="fbank_mean=-4.0, fbank_std=3.0.*"
                                         "fbank_mean=-5.081, fbank_std=4.4849"):
      evaluate.evaluate(other, params_path=path, batch_source=source)
    other.data.fbank_mean, other.data.fbank_std = -4.0, 3.0
    _, results = evaluate.evaluate(other, params_path=path, batch_source=source)
    assert results["val/num_clips"] == CLIPS


def test_evaluating_a_workdir_records_apart_from_the_runs_series(tmp_path):
  """tools/evaluate.py on a workdir under other evaluator settings (here the README's
  missing-modality evaluation) appended its numbers under the run's own names at the run's
  last step, so the run's final val/mAP became the audio-only one (and a finished run reported
  it as its result)."""
  from cav_mae_jax.train import evaluate  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  from cav_mae_jax.train import run_config  # pylint: disable=import-outside-toplevel
  config = _with_val(ft_config(), batch_size=BATCH, every_steps=0)
  config.total_epochs = 0.5
  data = clips(seed=4)
  source = _full_batches(data)
  inputs = trainer.Inputs(array_input.ArrayInput(clips(), BATCH, seed=0), source, CLIPS)
  trainer.train_and_evaluate(config, str(tmp_path), inputs)
  runs = metrics_lib.last_scalars(str(tmp_path))
  own_mode, config.evals.val.mode = config.evals.val.mode, "missingaudioonly"
  step, results = evaluate.evaluate(config, workdir=str(tmp_path), batch_source=source)
  assert results["val/mAP"] != runs["val/mAP"]
  after = metrics_lib.last_scalars(str(tmp_path))
  assert after["val/mAP"] == runs["val/mAP"]
  # Apart from evaluations with the run's own settings too: rows of several evaluations (mode,
  # all frames, another set of clips) were all "evaluate/val/*" at the same step.
  assert after["evaluate/val@mode=missingaudioonly/mAP"] == results["val/mAP"]
  assert "evaluate/val/mAP" not in after
  config.evals.val.mode = own_mode
  config.evals.val.batch_size = 2 * BATCH  # how it runs, not what it measures
  _, own = evaluate.evaluate(config, workdir=str(tmp_path), batch_source=source)
  assert metrics_lib.last_scalars(str(tmp_path))["evaluate/val/mAP"] == own["val/mAP"]
  config.evals.val.batch_size = BATCH
  assert trainer.train_and_evaluate(config, str(tmp_path), inputs)["val/mAP"] == runs["val/mAP"]
  assert step == 1
  recorded = run_config.read_run_config(str(tmp_path))
  config.data.eval_dir, config.evals.val.all_frames = "/data/records/train/", True
  assert evaluate.record_names(config, recorded, ["val"]) == {
      "val": "evaluate/val@eval_dir=train,all_frames=True"}
  recorded.data.eval_dir = "/data/records/eval"
  config.data.eval_dir, config.evals.val.all_frames = "/data/records/eval/", False  # the same
  assert evaluate.record_names(config, recorded, ["val"]) == {"val": "evaluate/val"}
  config.data.tfds_data_dir = "/data/tfds_vgg"  # other clips: a series apart (it was not)
  assert evaluate.record_names(config, recorded, ["val"]) == {
      "val": "evaluate/val@tfds_data_dir=tfds_vgg"}
  config.data.tfds_data_dir = recorded.data.tfds_data_dir
  with config.unlocked():
    config.evals.other = config.evals.val
  assert evaluate.record_names(config, recorded, ["other"]) == {"other": "evaluate/other@added"}


def test_an_evaluation_the_interrupted_run_did_not_log_runs_when_it_resumes(tmp_path):
  """A run saves a step's checkpoint, then evaluates: killed in between, the resumed run went on
  without that evaluation, and a finished run's final one was never written ('finished:
  nothing to do')."""
  from cav_mae_jax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  config = _with_val(ft_config(), batch_size=BATCH, every_steps=0)  # at the last step only
  config.total_epochs = 0.5
  source = _full_batches(clips(seed=4))
  inputs = trainer.Inputs(array_input.ArrayInput(clips(), BATCH, seed=0), source, CLIPS)
  first = trainer.train_and_evaluate(config, str(tmp_path), inputs)
  path = tmp_path / metrics_lib.METRICS_FILE
  lines = path.read_text().splitlines(keepends=True)
  final = [line for line in lines if '"val/mAP"' in line]
  assert len(final) == 1
  path.write_text("".join(line for line in lines if line not in final))  # killed while evaluating
  assert not metrics_lib.evaluation_logged(str(tmp_path), int(json.loads(final[0])["step"]))
  again = trainer.train_and_evaluate(config, str(tmp_path), inputs)
  assert again["val/mAP"] == first["val/mAP"]
  assert [line for line in path.read_text().splitlines(keepends=True)
          if '"val/mAP"' in line] == final
  # Logged now: the next call has nothing to do and evaluates nothing.
  assert trainer.train_and_evaluate(config, str(tmp_path), inputs)["val/mAP"] == first["val/mAP"]
  assert path.read_text().count('"val/mAP"') == 1
  # tools/evaluate.py's record at that step is not the run's evaluation.
  step = int(json.loads(final[0])["step"])
  path.write_text("".join(line for line in lines if line not in final)
                  + json.dumps({"step": step, "evaluate/val/mAP": 0.5}) + "\n")
  assert not metrics_lib.evaluation_logged(str(tmp_path), step)


def test_training_rows_after_a_resume_off_the_logging_cadence_are_an_uninterrupted_runs(
    tmp_path):
  # A resume from a checkpoint between two rows started its next row's window at the
  # checkpoint: that row averaged fewer steps than the uninterrupted run's (train/loss 1.8992
  # vs 2.0097 in an audit), and a SIGTERM stop logged an extra row at the stop.
  from cav_mae_jax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  config = ft_config()  # 4 steps
  config.log_every_steps, config.checkpoint.every_steps, config.checkpoint.keep = 2, 1, 10

  def rows(workdir):
    return [{k: v for k, v in json.loads(line).items() if k.startswith("train/")
             and k not in ("train/step_time_s", "train/samples_per_s")} | {"step": json.loads(
                 line)["step"]} for line in (workdir / "metrics.jsonl").read_text().splitlines()
            if '"train/loss"' in line]

  straight = tmp_path / "straight"
  train(config, straight)
  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")  # killed after checkpoint 3, between the rows
  train(config, resumed)
  assert [row["step"] for row in rows(straight)] == [2, 4]
  assert rows(resumed) == rows(straight)
  assert metrics_lib.read_log_window(str(straight), 3)[0] == 2  # step 3: not logged at 2


def test_a_resume_with_other_training_clips_is_refused(tmp_path):
  # It re-planned the epochs (epoch-end checkpoints, schedule, input position) without a word;
  # tools/average.py then misread the epoch checkpoints.
  config = ft_config()
  config.total_epochs = 0.5
  source = _full_batches(clips(seed=4))
  trainer.train_and_evaluate(config, str(tmp_path), trainer.Inputs(
      array_input.ArrayInput(clips(), BATCH, seed=0), source, CLIPS))
  config.total_epochs = 1.0
  with pytest.raises(ValueError, match=rf"workdir {tmp_path}: the run has \d+ steps per epoch, "
                     rf"this config \d+ \({CLIPS // 2} training clips\)"):
    trainer.train_and_evaluate(config, str(tmp_path), trainer.Inputs(
        array_input.ArrayInput(clips(), BATCH, seed=0), source, CLIPS // 2))


def test_a_resume_where_no_evaluation_is_due_says_none_is_missing(tmp_path, capsys):
  # Every resume at a step where no evaluator was due said "the interrupted run saved it but
  # did not log its evaluation" and then evaluated nothing.
  config = _with_val(ft_config(), batch_size=BATCH, every_steps=0)  # at the last step only
  config.total_epochs = 0.5
  source = _full_batches(clips(seed=4))
  inputs = trainer.Inputs(array_input.ArrayInput(clips(), BATCH, seed=0), source, CLIPS)
  trainer.train_and_evaluate(config, str(tmp_path), inputs)
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                          if '"val/mAP"' not in line))  # as if killed before evaluating
  config.total_epochs = 1.0  # going on: the saved step is no longer the last, nothing is due
  capsys.readouterr()
  trainer.train_and_evaluate(config, str(tmp_path), inputs)
  assert "did not log its evaluation" not in capsys.readouterr().out
