"""A TFDS-built dataset is an input like a records directory: same batches, a pretraining run.

The same synthetic clips are written twice: by the `cav_mae_clips` builder under Beam's
DirectRunner and by tools/preprocess.py's `prepare.prepare_records`. TFDS shuffles the
examples of a split by key, so the tool's datafile lists the clips in TFDS's order: both then
hold the same clips in the same order in one shard file, and the input pipeline must yield the
same batches from either (training with a fixed seed, plain and balanced, and an eval pass).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cav_mae_jax.data import dataset
from cav_mae_jax.data import input as input_lib
from cav_mae_jax.data import prepare
from cav_mae_jax.data import records
from cav_mae_jax.data import splits
from cav_mae_jax.data import synthetic
from cav_mae_jax.data import tfds_builder
from configs import pretrain
import test_prepare

TFDS_NAME = "cav_mae_clips/datafile"
NUM_TRAIN, NUM_EVAL, NUM_CLASSES = 16, 10, 4


def _video_ids(split: splits.Split) -> list[str]:
  """The clips of a split in file order."""
  ids = []
  for path in split.files:
    for serialized in tf.data.TFRecordDataset(path):
      ids.append(split.parse(serialized)[records.VIDEO_ID].numpy().decode())
  return ids


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
  """The same clips as a TFDS dataset (Beam build) and as records directories."""
  beam = pytest.importorskip("apache_beam", reason="the Beam build needs apache-beam")
  root = tmp_path_factory.mktemp("tfds_input")
  made = {split: synthetic.generate_dataset(
      str(root / "clips"), count, num_classes=NUM_CLASSES, seed=seed, duration_s=2.0,
      width=64, height=48, split_name=split)
          for split, count, seed in (("train", NUM_TRAIN, 0), ("eval", NUM_EVAL, 1))}
  manual = root / "manual"
  manual.mkdir()
  shutil.copy(made["train"]["datafile"], manual / "train.json")
  shutil.copy(made["eval"]["datafile"], manual / "test.json")
  shutil.copy(made["train"]["labels_csv"], manual / tfds_builder.LABELS_CSV)
  data_dir = str(root / "tfds")
  options = beam.options.pipeline_options.PipelineOptions(flags=["--runner=DirectRunner"])
  tfds_builder.builder("datafile", data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual),
                                                   beam_options=options))
  dirs = {"tfds_data_dir": data_dir}
  for split, tfds_split in (("train", "train"), ("eval", "test")):
    tfds_clips = splits.open_tfds_split(TFDS_NAME, tfds_split, data_dir)
    assert len(tfds_clips.files) == 1  # tiny: one shard, so one order to match
    order = _video_ids(tfds_clips)
    with open(made[split]["datafile"]) as f:
      rows = {row["video_id"]: row for row in json.load(f)["data"]}
    datafile = str(root / f"{split}_in_tfds_order.json")
    with open(datafile, "w") as f:
      json.dump({"data": [rows[video_id] for video_id in order]}, f)
    dirs[split] = str(root / "records" / split)
    prepare.prepare_records(datafile, made[split]["labels_csv"], dirs[split], num_workers=0,
                            examples_per_shard=64, progress=False, strict=True)
    assert _video_ids(splits.open_records_split(dirs[split], "records")) == order
  return dirs


def make_config(sources: dict[str, str], tfds: bool, **data) -> ml_collections.ConfigDict:
  """The tiny pretraining config (small widths, 1024 fbank frames) on one of the sources."""
  config = pretrain.get_config("tiny")
  m = config.model
  m.embed_dim, m.num_heads, m.encoder_depth, m.modality_specific_depth = 32, 2, 2, 1
  m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads = 16, 1, 2
  m.image_size = 32
  config.data.batch_size = 8
  config.data.shuffle_buffer = 8
  config.data.prefetch = 1
  config.evals.val.batch_size = 8  # the losses evaluator needs a full batch of the 10 test clips
  if tfds:
    config.data.tfds_name = TFDS_NAME
    config.data.tfds_data_dir = sources["tfds_data_dir"]
  else:
    config.data.train_dir, config.data.eval_dir = sources["train"], sources["eval"]
  for key, value in data.items():
    config.data[key] = value
  return config


def assert_same_batches(want: list[dict], got: list[dict], exact: bool = True) -> None:
  assert len(want) == len(got) > 0
  for want_batch, got_batch in zip(want, got):
    assert want_batch.keys() == got_batch.keys()
    for key, value in want_batch.items():
      assert got_batch[key].dtype == value.dtype, key
      if exact:
        np.testing.assert_array_equal(got_batch[key], value, err_msg=key)
      else:
        np.testing.assert_allclose(got_batch[key], value, rtol=1e-5, atol=1e-5, err_msg=key)


def _pipelines(sources, split, **kwargs):
  overrides = kwargs.pop("data", {})
  return [input_lib.InputPipeline(make_config(sources, tfds, **overrides), split,
                                  process_index=0, process_count=1, **kwargs)
          for tfds in (False, True)]


def test_tfds_labels_are_read_alone(sources):
  """Balanced sampling reads every training record's labels at start; from TFDS only the labels
  are deserialized (the whole example's fbank list cost most of that read)."""
  split = splits.open_tfds_split(TFDS_NAME, "train", sources["tfds_data_dir"])
  for serialized in tf.data.TFRecordDataset(split.files):
    np.testing.assert_array_equal(split.parse_labels(serialized),
                                  split.parse(serialized)[records.LABELS])
    assert split.parse_labels(serialized).dtype == tf.int64


def test_the_builder_writes_each_shard_layout(sources, monkeypatch):
  """Each shard of a TFDS build (here under Beam) gets a sidecar listing its records' sizes and
  classes, so balanced sampling and mixup find a host's records without reading the split at
  every start (it was read, labels parsed, at every start)."""
  for tfds_split in ("train", "test"):
    split = splits.open_tfds_split(TFDS_NAME, tfds_split, sources["tfds_data_dir"])
    counts = test_prepare.assert_layouts_match(split)

  def unread(*unused_args):
    raise AssertionError("a shard was read for its layout")

  monkeypatch.setattr(dataset, "_read_sizes_and_weights", unread)
  dataset.HostRecords.scan(split.files, counts, split.index.label_counts, split.parse_labels)


@pytest.mark.parametrize("balanced", [False, True])
def test_training_batches_are_the_same_from_both_sources(sources, balanced):
  records_input, tfds_input = _pipelines(sources, "train", seed=7, batch_size=4,
                                         data=dict(balanced_sampling=balanced))
  assert records_input.split_files.index.label_counts == tfds_input.split_files.index.label_counts
  want = [next(records_input) for _ in range(6)]  # 24 clips: over an epoch boundary
  got = [next(tfds_input) for _ in range(6)]
  assert want[0]["audio"].dtype == np.float32  # TFDS stores float16: float32 in the batch
  assert_same_batches(want, got)
  assert np.std(want[0]["audio"]) > 0.5  # normalized fbanks with noise, not zeros


def test_eval_pass_is_the_same_from_both_sources(sources):
  records_input, tfds_input = _pipelines(sources, "eval", batch_size=4)
  want, got = list(records_input), list(tfds_input)
  assert len(want) == 3 and want[-1]["valid"].tolist() == [True, True, False, False]
  assert_same_batches(want, got)


def test_index_statistics_from_the_builder(sources):
  records_input, tfds_input = _pipelines(sources, "eval", batch_size=4,
                                         data=dict(fbank_stats="index"))
  train_records = records.open_records_dir(sources["train"])
  train_tfds = input_lib.open_split(make_config(sources, tfds=True), "train").index
  for index in (train_records, train_tfds):
    assert index.num_examples == NUM_TRAIN and sum(index.label_counts) == NUM_TRAIN
  assert train_tfds.label_counts == train_records.label_counts
  assert train_tfds.fbank_stats_count == train_records.fbank_stats_count
  assert train_tfds.fbank_mean == pytest.approx(train_records.fbank_mean, rel=1e-12)
  assert train_tfds.fbank_std == pytest.approx(train_records.fbank_std, rel=1e-12)
  for pipeline, index in ((records_input, train_records), (tfds_input, train_tfds)):
    normalization = pipeline.fbank_normalization
    assert (normalization.mean, normalization.std) == (index.fbank_mean, index.fbank_std)
  assert "TFDS split 'train'" in tfds_input.fbank_normalization.origin
  # The sums differ only in order: the same batches up to float rounding.
  assert_same_batches(list(records_input), list(tfds_input), exact=False)


def test_run_data_check_reads_tfds_and_names_the_field(sources, caplog):
  config = make_config(sources, tfds=True)
  input_lib.check_data_sources(config)
  config.data.tfds_eval_split = "validation"
  with pytest.raises(ValueError, match=r"config\.data\.tfds_eval_split='validation'.*test"):
    input_lib.check_data_sources(config)
  config.data.tfds_eval_split = "test[:50%]"  # TFDS's slicing: said so (was "has splits")
  with pytest.raises(ValueError, match=r"tfds_eval_split='test\[:50%\]': .* has splits "
                     r"\['test', 'train'\]; name a whole split: .* a slice or sum of splits"):
    input_lib.check_data_sources(config)
  config.data.tfds_eval_split = "train"
  with caplog.at_level("WARNING", logger=dataset.logger.name):
    input_lib.check_data_sources(config)
  assert "the eval split is the training clips (TFDS split 'train'" in caplog.text
  with pytest.raises(ValueError, match=r"process 1 of 2 gets no training examples \(1 shard "
                     r"files\); write more shards \(a TFDS build: .*num_shards=N\)"):
    input_lib.check_data_sources(make_config(sources, tfds=True), process_count=2)
  config = make_config(sources, tfds=True)
  config.data.tfds_name = TFDS_NAME + ":9.0.0"  # a version never built
  with pytest.raises(ValueError, match=r"^config\.data\.tfds_name='cav_mae_clips/datafile:9\.0\.0'"
                     r": Dataset cav_mae_clips cannot be loaded at version 9\.0\.0, only: "
                     r"1\.4\.0\.$"):  # TFDS raised an AssertionError (a traceback)
    input_lib.check_data_sources(config)
  config = make_config(sources, tfds=True)
  config.model.audio_length = 512
  with pytest.raises(ValueError, match=r"config\.model\.audio_length=512.*1024-frame"):
    input_lib.check_data_sources(config)


def test_pretraining_steps_from_tfds(sources, tmp_path):
  from cav_mae_jax.train import metrics  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import trainer  # pylint: disable=g-import-not-at-top
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    config = make_config(sources, tfds=True)
    config.total_steps = 3
    config.log_every_steps = 1
    config.checkpoint.every_steps = 0
    with config.unlocked():
      del config.evals["retrieval"]
    config.evals.val.update(every_steps=3, at_start=False, batch_size=8)
    # What trainer.records_inputs builds (its train_examples from input_lib.open_split).
    inputs = trainer.Inputs(
        train=input_lib.InputPipeline(config, "train", seed=config.seed), eval_batches=None,
        train_examples=input_lib.open_split(config, "train").index.num_examples)
    assert inputs.train_examples == NUM_TRAIN
    result = trainer.train_and_evaluate(config, str(tmp_path / "run"), inputs)
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
  logged = metrics.read_jsonl(str(tmp_path / "run" / metrics.METRICS_FILE))
  assert [r["step"] for r in logged if "train/loss" in r] == [1, 2, 3]
  evaluated = [r for r in logged if "val/loss" in r]  # the TFDS test split, through evals
  assert [r["step"] for r in evaluated] == [3] and np.isfinite(evaluated[0]["val/loss"])
  assert np.isfinite(result["loss"])


def test_inspect_tool_reads_tfds_as_records(sources, tmp_path, capsys):
  tool = test_prepare.load_tool("inspect_records")
  reports = [tool.inspect(split, str(tmp_path / str(i)), num_images=1) for i, split in enumerate(
      (splits.open_records_split(sources["train"], "records"),
       splits.open_tfds_split(TFDS_NAME, "train", sources["tfds_data_dir"])))]
  for report in reports:
    del report["source"], report["shards"], report["pngs"]
  for key in ("fbank_mean", "fbank_std"):  # sums in another order (Beam's combine)
    assert reports[1].pop(key) == pytest.approx(reports[0].pop(key), rel=1e-12)
  assert reports[0] == reports[1]
  assert reports[1]["num_examples"] == NUM_TRAIN
  assert tool.main(["--tfds", TFDS_NAME, "--tfds-data-dir", sources["tfds_data_dir"],
                    "--split", "test", "--png-dir", str(tmp_path / "png")]) == 0
  assert f"TFDS split 'test' of {sources['tfds_data_dir']}" in capsys.readouterr().out
  assert len(os.listdir(tmp_path / "png")) == 8  # 4 clips, 2 PNGs each
