"""Command lines are for people: a bad input to a tool prints one line `error: ...`, exits 2.

Each tool runs as a user would run it (a subprocess from another working directory) with a
missing file, folder or a bad flag value; no traceback, no library log lines.
"""

import os
import re
import subprocess
import sys

import pytest

import blocked_imports
import multihost_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/pretrain.py:tiny"  # resolved from any working directory

CASES = {
    "train_missing_records": ("train.py", [TINY, "--workdir=w", "--config.data.train_dir=/no/records"],
                              "config.data.train_dir"),
    "train_missing_config_file": ("train.py", ["--config=configs/nope.py", "--workdir=w"],
                                  "configs/nope.py"),
    "train_config_is_a_directory": ("train.py", ["--config=configs", "--workdir=w"],
                                    "configs: a directory, not a config file"),
    "train_config_without_get_config": ("train.py", ["--config=cav_mae_jax/__init__.py",
                                                     "--workdir=w"],
                                        "__init__.py: the file defines no get_config()"),
    "train_unknown_recipe": ("train.py", ["--config=configs/pretrain.py:bogus", "--workdir=w"],
                             "Error whilst parsing config file: ValueError: config name "
                             "'bogus': unknown recipe"),
    "train_bad_field_value": ("train.py", [TINY, "--workdir=w", "--config.data.freqm=abc"],
                              "freqm"),
    "train_unknown_config_field": ("train.py", [TINY, "--workdir=w",
                                                "--config.optim.learning_rat=1"],
                                   "--config.optim.learning_rat: config.optim has no field "
                                   "'learning_rat' (did you mean learning_rate?"),
    "train_none_for_a_group": ("train.py", [TINY, "--workdir=w", "--config.model=None"],
                               "--config.model=None: config.model is a group of fields"),
    # ml_collections reads the =None override from sys.argv too: "AttributeError: \"'nosuch'\"".
    "train_unknown_field_set_to_none": ("train.py", [TINY, "--workdir=w",
                                                     "--config.model.nosuch=None"],
                                        "--config.model.nosuch: config.model has no field"),
    # A schedule holds every kind's fields; one its kind does not read changed nothing.
    "train_schedule_field_of_another_kind": (
        "train.py", ["--config=configs/finetune.py:tiny", "--workdir=w",
                     "--config.schedule.warmup_epochs=2"],
        "--config.schedule.warmup_epochs: read by schedule kind 'warmup_cosine' only, and this "
        "config's is 'multistep' (--config.schedule.kind=warmup_cosine to use it)"),
    "evaluate_missing_workdir": ("evaluate.py", [TINY, "--workdir=/no/workdir",
                                                 "--config.data.eval_dir=/no/records"],
                                 "config.data.eval_dir"),
    "benchmark_missing_records": ("benchmark.py", [TINY, "--input-only",
                                                   "--config.data.train_dir=/no/records"],
                                  "/no/records"),
    "convert_missing_source": ("convert.py", ["cavmae", "--src=/no/model.pth", "--out=out", TINY],
                               "/no/model.pth"),
    "model_summary_missing_config": ("model_summary.py", ["--config=/no/config.py"],
                                     "/no/config.py"),
    "demo_bad_flag_value": ("demo.py", ["--steps=many"], "steps"),
    "benchmark_torch_for_finetuning": ("benchmark.py", ["--config=configs/finetune.py:tiny",
                                                        "--compare-torch"], "config.task"),
    # A job script that forgot --distributed started N runs that each trained alone.
    "train_process_flags_without_distributed": ("train.py", [TINY, "--workdir=w",
                                                             "--num_processes=2",
                                                             "--process_id=1"],
                                                "need --distributed"),
    "evaluate_process_flags_without_distributed": ("evaluate.py", [TINY, "--params=p",
                                                                   "--process_id=1"],
                                                   "need --distributed (without it every "
                                                   "process would evaluate alone"),
    "extract_features_videos_distributed": ("extract_features.py", [
        TINY, "--params=p", "--videos=v", "--out=o.npz", "--distributed"],
        "--videos decodes its files in one process: leave out --distributed"),
    "retrieval_process_flags_without_distributed": ("retrieval.py", [TINY, "--params=p",
                                                                     "--num_processes=2"],
                                                    "need --distributed"),
    "train_heartbeat_without_distributed": ("train.py", [TINY, "--workdir=w",
                                                         "--heartbeat_timeout_s=10"],
                                            "--heartbeat_timeout_s need --distributed"),
    "evaluate_heartbeat_not_positive": ("evaluate.py", [TINY, "--params=p", "--distributed",
                                                        "--heartbeat_timeout_s=0"],
                                        "heartbeat_timeout_s"),
    # 0 was taken as "not given": on a fine-tuning run the config's epoch replaced it.
    "average_epoch_zero": ("average.py", ["--workdir=w", "--out=o", "--first_epoch=0",
                                          "--last_epoch=2"],
                           "flag --first_epoch=0: epochs count from 1"),
    "inspect_records_negative_top": ("inspect_records.py", ["--records=r", "--top=-1"],
                                     "argument --top: -1: must be >= 0"),
    "preprocess_shard_index_past_num_shards": ("preprocess.py", [
        "--out=o", "--datafile=d.json", "--labels=l.csv", "--shard-index=3", "--num-shards=2"],
        "--shard-index 3: must be < --num-shards 2"),
    # An existing file as --out said only "File exists".
    "preprocess_out_is_a_file": ("preprocess.py", [f"--out={ROOT}/README.md", "--datafile=d.json",
                                                   "--labels=l.csv"],
                                 f"--out {ROOT}/README.md: is a file, not a directory"),
    "benchmark_profile_is_a_file": ("benchmark.py", [TINY, f"--profile={ROOT}/README.md"],
                                    "README.md: is a file, not a folder"),
    # absl's words: "flag --config=None: Flag --config must have a value other than None." and
    # "Unknown command line flag 'config.data.eval_dir'".
    "evaluate_params_without_config": ("evaluate.py", ["--params=p"], "--params needs --config"),
    "train_override_without_config": ("train.py", ["--workdir=w", "--config.data.batch_size=8"],
                                      "--config.data.batch_size: overrides a field of --config, "
                                      "which is not given"),
    "preprocess_negative_workers": ("preprocess.py", ["--out=o", "--datafile=d.json",
                                                      "--labels=l.csv", "--workers=-1"],
                                    "argument --workers: -1: must be >= 0"),
}


def _run_tool(tool, args, cwd, extra_path=()):
  """Runs tools/<tool> as a user would: from `cwd`, with this checkout (after `extra_path`)."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, extra_path), ROOT]))
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the tools quiet TensorFlow themselves
  return subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("error,status", [
    ("PermissionDeniedError", 2), ("FailedPreconditionError", 2), ("InvalidArgumentError", 1)])
def test_a_file_system_error_of_tensorflow_is_one_line(tmp_path, error, status):
  """A bucket's errors (no permission, no network, not found) printed a traceback: TensorFlow's
  errors subclass no OSError. Others (a bug of a tf.data op) keep theirs."""
  script = tmp_path / "tool.py"
  script.write_text(
      "from cav_mae_jax import cli\n"
      "def main(argv):\n"
      "  import tensorflow as tf\n"
      f"  raise tf.errors.{error}(None, None, '{{{{function_node f}}}} Error executing an HTTP "
      "request: HTTP response code 403 when reading gs://bucket/x [Op:ReadFile]')\n"
      "cli.run(main)\n")
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the tools quiet TensorFlow themselves
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == status, result.stderr[-2000:]
  if status == 2:
    assert result.stderr.splitlines() == ["error: Error executing an HTTP request: HTTP response "
                                          "code 403 when reading gs://bucket/x"]
  else:
    assert "Traceback" in result.stderr


def test_tensorflows_resource_exhausted_is_a_full_disk_or_host_memory():
  # A full disk under TensorBoard's event file printed a traceback (status 1); the same error
  # type says that host memory ran out, a run failure (status 1), not a bad input.
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from cav_mae_jax import cli  # pylint: disable=import-outside-toplevel
  full = cli._storage_error(tf.errors.ResourceExhaustedError(  # pylint: disable=protected-access
      None, None, "{{function_node __wrapped__WriteSummary}} /w/tensorboard/events.out.tfevents"
      ".1.vm.2.v2; No space left on device\n\tCould not flush events file. [Op:WriteSummary]"))
  assert type(full) is OSError and str(full) == (
      "/w/tensorboard/events.out.tfevents.1.vm.2.v2; No space left on device")
  memory = cli._storage_error(tf.errors.ResourceExhaustedError(  # pylint: disable=protected-access
      None, None, "OOM when allocating tensor with shape[1000000000000] and type float"))
  assert type(memory) is MemoryError and isinstance(memory, cli.RUN_FAILURES)


def test_a_config_file_in_a_flagfile_takes_overrides(tmp_path):
  # The check that an override has its config file looked at the command line only.
  (tmp_path / "flags.txt").write_text(f"{TINY.replace('configs/', ROOT + '/configs/')}\n")
  result = _run_tool("model_summary.py", [f"--flagfile={tmp_path / 'flags.txt'}",
                                          "--config.model.audio_length=512"], tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_prints_one_error_line_and_exits_2(case, tmp_path):
  tool, args, named = CASES[case]
  result = _run_tool(tool, args, tmp_path)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
  assert named in lines[0], lines[0]
  assert "Traceback" not in result.stdout + result.stderr


def test_distributed_without_a_coordinator_or_cluster_names_the_flags(tmp_path, monkeypatch):
  """JAX's own 'coordinator_address should be defined.' said nothing of the tool's flags."""
  for name in ("KUBERNETES_SERVICE_HOST", "OMPI_MCA_orte_hnp_uri", "SLURM_JOB_ID"):
    monkeypatch.delenv(name, raising=False)  # a cluster JAX would detect (and join)
  result = _run_tool("train.py", [TINY, "--workdir=w", "--distributed"], tmp_path)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.splitlines()  # JAX's words in the middle: "coordinator_address ..."
  assert len(lines) == 1 and lines[0].startswith("error: --distributed: "), lines
  assert lines[0].endswith("; outside a cluster JAX detects (TPU pod, SLURM, Open MPI, "
                           "Kubernetes) give --coordinator_address, --num_processes and "
                           "--process_id"), lines
  assert not (tmp_path / "w").exists()


def test_a_loss_that_becomes_nan_stops_the_run_with_one_line(tmp_path):
  # Normalized by a near-zero std the fbanks overflow: the NaN guard stops the run. It printed a
  # traceback ending in "The last good checkpoint is step None".
  from test_input import write_records  # pylint: disable=import-outside-toplevel
  train, held_out = (write_records(str(tmp_path / split), [[0]] * 16, num_shards=1)
                     for split in ("train", "eval"))
  result = _run_tool("train.py", [
      TINY, f"--workdir={tmp_path / 'run'}", "--config.total_steps=2",
      "--config.model.embed_dim=32", "--config.model.encoder_depth=2",  # a smaller step to build
      "--config.model.modality_specific_depth=1", "--config.model.image_size=32",
      "--config.tensorboard=False", "--config.data.fbank_std=1e-30",
      f"--config.data.train_dir={train}", f"--config.data.eval_dir={held_out}"], tmp_path)
  assert result.returncode == 1, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-3000:]
  line = lines[0]
  assert re.fullmatch(r"error: Non-finite loss nan at step \d; stopping\. No checkpoint was "
                      r"saved before it\.", line), line


@pytest.mark.parametrize("tool, args, named", [
    ("train.py", ["--config=configs/nope.py", "--workdir=w"], "configs/nope.py"),
    ("train.py", [TINY, "--workdir=w", "--config.data.freqm=abc"], "freqm"),
    ("train.py", [TINY, "--workdir=w", "--config.data.fremq=48"], "freqm?"),
    ("train.py", [TINY, "--workdir=w", "--workers=2"], "workers"),
    ("preprocess.py", ["--out=o", "--workers=two"], "--workers"),
    ("preprocess.py", ["--out=o"], "--datafile and --labels are required"),
    # No fbank frame: every clip was quarantined later, as audio_too_short.
    ("make_synthetic.py", ["--out=o", "--duration=0.001"], "argument --duration: 0.001: must "
     "be >= 0.025"),
    # Read by writing only: a merge took its inputs from the sidecars and said nothing.
    ("preprocess.py", ["--merge-index", "--out=o", "--strict"], "--strict applies to writing "
     "records, not to --merge-index"),
    ("preprocess.py", ["--merge-index", "--out=o", "--num-shards=3"], "--num-shards applies"),
    # A bucket as --out made a local folder 'gs:' and failed at each shard's end.
    ("preprocess.py", ["--out=gs://bucket/records", "--datafile=d.json", "--labels=l.csv"],
     "--out gs://bucket/records: must be a local directory"),
    ("inspect_records.py", ["--records=r", "--top=ten"], "--top"),
    # A mistyped input path, too (tools that load a model check them before importing).
    ("train.py", [TINY, "--workdir=w", "--config.data.train_dir=/no/records"],
     "config.data.train_dir: /no/records"),
    ("evaluate.py", [TINY, "--workdir=/no/workdir"], "--workdir: /no/workdir"),
    ("retrieval.py", [TINY, "--params=p", "--records=/no/records"], "--records: /no/records"),
    ("extract_features.py", [TINY, "--params=p", "--videos=/no/videos", "--out=f.npz"],
     "--videos: /no/videos"),
    ("inpaint.py", [TINY, "--params=p", "--mask_ratio_a=1.5", "--out=x.png"],
     "--mask_ratio_a=1.5"),
    ("inpaint.py", [TINY, "--params=p", "--config.data.eval_dir=/no/eval", "--out=x.png"],
     "config.data.eval_dir: /no/eval"),
    # Nonsense that was accepted (an empty --evals ran nothing; --step meant nothing with
    # --params) or was answered only after the import (--index), or without the flag's name.
    ("evaluate.py", [TINY, "--params=p", "--evals="], "flag --evals=[]: name evaluators of "
     "config.evals"),
    ("evaluate.py", [TINY, "--params=p", "--step=3"], "--step picks one of the checkpoints of "
     "--workdir; --params names a single one"),
    # ... and so in every tool with the model flags (these refused it after TensorFlow's import).
    ("retrieval.py", [TINY, "--params=p", "--step=3"], "--step picks one of the checkpoints of "
     "--workdir; --params names a single one"),
    ("inpaint.py", [TINY, "--params=p", "--step=3", "--out=x.png"], "--step picks one of the "
     "checkpoints of --workdir; --params names a single one"),
    ("extract_features.py", [TINY, "--params=p", "--step=3", "--out=f.npz"], "--step picks one "
     "of the checkpoints of --workdir; --params names a single one"),
    ("retrieval.py", [TINY, "--params=p", "--batch_size=-4"], "flag --batch_size=-4: must be >= 0"),
    # It was named `batch_size=-4`, not as the flag, after TensorFlow's import.
    ("extract_features.py", [TINY, "--params=p", "--batch_size=-4", "--out=f.npz"],
     "flag --batch_size=-4: must be >= 0 (0: config.data.batch_size)"),
    ("inpaint.py", [TINY, "--params=p", "--index=-1", "--out=x.png"],
     "flag --index=-1: must be >= 0"),
    # Seeds JAX's PRNG key cuts to 32 bits (-1 drew seed 4294967295's masks, 2**32 seed 0's).
    ("inpaint.py", [TINY, "--params=p", "--seed=-1", "--out=x.png"],
     "flag --seed=-1: must be in [0, 4294967295]"),
    ("convert.py", ["imagenet-mae", TINY, "--src=p", "--out=o", "--seed=4294967296"],
     "flag --seed=4294967296: must be in [0, 4294967295]"),
    # The trainer's checks of the config alone (these came after the import).
    ("train.py", [TINY, "--workdir=w", "--config.model.attention_impl=cudnn",
                  "--config.model.dtype=bfloat16"],
     "config.model.attention_impl='cudnn': cuDNN's attention runs on NVIDIA GPUs, and this "
     "run's devices are cpu; use 'xla'"),
    # An epoch recipe run for a number of steps: the None reached the config (else the error
    # would be "set exactly one of total_steps / total_epochs").
    ("train.py", ["--config=configs/finetune.py:tiny", "--workdir=w",
                  "--config.total_epochs=None", "--config.total_steps=0"],
     "config.total_steps=0: must be positive"),
    ("train.py", [TINY, "--workdir=w", "--config.init.source=cavmae",
                  "--config.init.path=/no/model.pth"], "config.init.path='/no/model.pth'"),
    # The fields of config.data (DataConfig lived in a module that imports TensorFlow).
    ("train.py", [TINY, "--workdir=w", "--config.data.mixup=2"],
     "config.data.mixup=2.0: is a probability: must be in [0, 1]"),
    ("train.py", ["--config=configs/finetune.py:tiny", "--workdir=w",
                  "--config.data.label_smooth=1.5"], "config.data.label_smooth=1.5: must be in "),
    ("inspect_records.py", ["--records=r", "--split=test", "--tfds-data-dir=/x"],
     "--split and --tfds-data-dir: apply to --tfds only, not to --records"),
    ("inspect_records.py", ["--records=r", f"--png-dir={os.path.join(ROOT, 'README.md')}"],
     "README.md: a file, not a folder for the PNGs"),
])
def test_bad_flag_or_config_is_answered_before_tensorflow_is_imported(tool, args, named,
                                                                      tmp_path):
  """TensorFlow's import takes seconds; a typo in a flag or a config value need not wait for it."""
  line = _error_line_without_tensorflow(tool, args, tmp_path)
  assert line.startswith("error: ") and named in line, line


@pytest.mark.parametrize("tool, args, flag", [
    # The demo ran in the working directory (and cleared ./run and ./records of a demo there).
    ("demo.py", ["--workdir="], "flag --workdir="),
    ("train.py", [TINY, "--workdir="], "flag --workdir="),  # "workdir : cannot make ..." at 7 s
    ("extract_features.py", [TINY, "--params=p", "--out="], "flag --out="),
    ("evaluate.py", [TINY, "--params="], "flag --params="),
    ("inspect_records.py", ["--records="], "argument --records"),  # a traceback
    ("preprocess.py", ["--datafile=d.json", "--labels=l.csv", "--out="], "argument --out"),
    ("make_synthetic.py", ["--out="], "argument --out"),  # wrote the clips here
])
def test_an_empty_path_is_refused_before_anything_is_made(tool, args, flag, tmp_path):
  line = _error_line_without_tensorflow(tool, args, tmp_path)
  assert line == f"error: {flag}: must not be empty (a path)"
  assert os.listdir(tmp_path) == ["tripwire"]


def test_a_warning_is_one_line_as_the_tools_other_lines(tmp_path):
  """The project's warnings (an eval split that is the training split, epochs to average that a
  run never reaches) came as absl log records: 'W1206 23:54:30.236534 1399... trainer.py:224]'."""
  script = tmp_path / "tool.py"
  script.write_text(
      "import logging\n"
      "from cav_mae_jax import cli\n"
      "def main(argv):\n"
      "  logging.getLogger('cav_mae_jax.data.dataset').warning('config.data: %s', 'uneven')\n"
      "  logging.getLogger('cav_mae_jax.train').info('not shown')\n"
      "cli.run(main, uses_tensorflow=False)\n")
  env = dict(os.environ, PYTHONPATH=ROOT)
  for args, expected in (([], ["warning: config.data: uneven"]), (["--verbosity=1"], None)):
    result = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300, check=True)
    lines = result.stderr.splitlines()
    if expected is not None:
      assert lines == expected, result.stderr
    else:  # asked for the library logs: absl's records, with their source lines
      assert any(re.match(r"W\d{4} .*tool\.py:\d+\] config\.data: uneven", l) for l in lines)


def test_a_warning_of_a_multi_process_run_names_its_process(tmp_path):
  script = tmp_path / "tool.py"
  script.write_text(
      "import logging\n"
      "import jax\n"
      "from cav_mae_jax import cli\n"
      "def main(argv):\n"
      "  logging.getLogger('cav_mae_jax.train').warning('before')\n"
      "  jax.distributed.initialize(f'localhost:{argv[2]}', 2, int(argv[1]))\n"
      "  logging.getLogger('cav_mae_jax.train').warning('after')\n"
      "cli.run(main, uses_tensorflow=False)\n")
  port = multihost_worker.free_port()
  results = multihost_worker.run_processes(str(script), [[i, port] for i in range(2)],
                                           multihost_worker.process_env(1))
  for i, result in enumerate(results):
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.splitlines() == ["warning: before", f"warning: process {i} of 2: after"]


@pytest.mark.parametrize("log_level", [None, "0"])
def test_tensorflow_is_told_to_leave_the_gpus_to_jax(tmp_path, log_level):
  """A CUDA build of TensorFlow (pip's `tensorflow[and-cuda]`, not the requirements' -cpu) claims
  the GPUs' memory when its runtime starts, which JAX's devices need: the tools hide them from
  it before `main`, quiet or not (a `tensorflow` here records the calls)."""
  fake = tmp_path / "fake" / "tensorflow"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text(
      "import types\n"
      "config = types.SimpleNamespace(set_visible_devices=lambda devices, kind: "
      "print('visible', kind, devices))\n")
  script = tmp_path / "tool.py"
  script.write_text("from cav_mae_jax import cli\n"
                    "cli.run(lambda argv: print('main'))\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), ROOT]))
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  if log_level is not None:  # a user who asked for TensorFlow's own lines
    env["TF_CPP_MIN_LOG_LEVEL"] = log_level
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=True)
  assert result.stdout.splitlines() == ["visible GPU []", "main"], result.stderr[-2000:]


def _error_line_without_tensorflow(tool, args, cwd):
  """The one error line of tools/<tool> run with a `tensorflow` that ends the process when
  imported (it would exit 1 with 'tensorflow is blocked: it was imported')."""
  tripwire = blocked_imports.blocked_packages(cwd / "tripwire", ["tensorflow"], "it was imported",
                                             exception="SystemExit")
  result = _run_tool(tool, args, cwd, extra_path=[tripwire])
  assert result.returncode == 2, result.stderr[-2000:]
  line, = result.stderr.strip().splitlines()
  return line


@pytest.mark.parametrize("args, default", [
    (["--records=r"], os.path.join("r", "inspect")),
    (["--tfds=cav_mae_clips/datafile"], "inspect_cav_mae_clips_datafile_train"),
])
def test_inspect_records_default_png_folder_that_is_a_file_is_named(args, default, tmp_path):
  """The OS's '[Errno 17] File exists: ...' came after TensorFlow's import and the split's index,
  and did not say that it was the PNG folder."""
  (tmp_path / "r").mkdir()
  (tmp_path / default).write_text("not a folder")
  line = _error_line_without_tensorflow("inspect_records.py", args, tmp_path)
  assert line == (f"error: {default} (the default --png-dir): a file, not a folder for the PNGs; "
                  "give --png-dir another folder")


def test_preprocess_help_lists_the_reason_codes_and_which_audio_a_datafile_gives(tmp_path):
  # `no_labels` and --allow-unlabeled are new; that a video's own audio is used and `wav` not
  # read was said nowhere (the original always reads `wav`).
  result = _run_tool("preprocess.py", ["--help"], tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  text = " ".join(result.stdout.split())
  for fragment in ("Reason codes: missing_file,", "no_labels (an entry with no label",
                   "--allow-unlabeled", "duplicate_id", "worker_crashed",
                   "when video_path names a video, its own audio is used and wav is not read"):
    assert fragment in text, fragment
  # The list is written by hand (the help does not import the decoder): every code the code
  # can write is in it.
  from cav_mae_jax.data import clips, decode, shards  # pylint: disable=import-outside-toplevel
  codes = (*decode.REASONS, clips.UNKNOWN_LABEL, clips.AUDIO_TOO_SHORT, clips.DUPLICATE_ID,
           clips.NO_LABELS, shards.WORKER_CRASHED)
  assert [code for code in codes if code not in text] == []


# Small enough that the demo would build its data in seconds if a bad value got past the check.
_SMALL_DEMO = ["--train_clips=16", "--eval_clips=16", "--clip_seconds=0.1", "--workers=1"]


@pytest.mark.parametrize("tool, args, named", [
    ("demo.py", [*_SMALL_DEMO, "--steps=-1"], "--steps=-1: config.total_steps=-1: must be "),
    ("demo.py", [*_SMALL_DEMO, "--eval_clips=4"],
     "--eval_clips=4 (pretraining): config.evals.val.batch_size=16: the losses evaluator"),
    ("noise_sweep.py", ["--steps=-1"], "--steps=-1: config.total_steps=-1: must be positive"),
    ("noise_sweep.py", ["--seeds=a,b"], "--seeds"),
    # A repeated seed read its run back twice, counted twice in the means and spreads.
    ("noise_sweep.py", ["--seeds=0,1,0"], "flag --seeds=['0', '1', '0']: must be one or more "
     "different integers"),
    ("noise_sweep.py", ["--seeds=0,-1"], "flag --seeds=['0', '-1']: must be one or more "
     "different integers in [0, 4294967295]"),
    ("noise_sweep.py", ["--placements=gpu"], "--placements"),
])
def test_demo_bad_option_is_refused_before_anything_is_built_or_deleted(tool, args, named,
                                                                         tmp_path):
  """One line, exit 2, and the workdir as it was: no clips or records made, no earlier run gone.
  (Which flag each bad value is reported under: tests/test_demo.py, without subprocesses.)"""
  workdir = tmp_path / "demo"
  earlier = ["run", "finetune", "finetune_random_init", "noise_sweep"]  # a finished demo's runs
  for name in earlier:
    (workdir / name).mkdir(parents=True)
    (workdir / name / "metrics.jsonl").write_text("{}\n")
  result = _run_tool(tool, [f"--workdir={workdir}", *args], tmp_path)
  assert result.returncode == 2, result.stderr[-2000:]
  line, = result.stderr.strip().splitlines()
  assert line.startswith("error: ") and named in line, line
  assert not result.stdout  # not even "[1/4] synthetic clips and records ..."
  assert sorted(os.listdir(workdir)) == sorted(earlier)  # no synthetic/ or records/
  assert all((workdir / name / "metrics.jsonl").read_text() == "{}\n" for name in earlier)


@pytest.mark.parametrize("text, message", [
    ("nan", "nan: must be a finite number"), ("inf", "inf: must be a finite number"),
    ("0", "0: must be > 0"), ("x", "invalid float value: 'x'")])
def test_number_flags_refuse_what_is_not_a_finite_number_in_range(text, message):
  # NaN passed every comparison (make_synthetic.py --duration=nan then failed converting it),
  # inf overflowed into a traceback.
  import argparse  # pylint: disable=import-outside-toplevel
  from cav_mae_jax import cli  # pylint: disable=import-outside-toplevel
  with pytest.raises(argparse.ArgumentTypeError, match=f"^{re.escape(message)}$"):
    cli.number_type(float, 0, inclusive=False)(text)
  assert cli.number_type(float, 0, inclusive=False)("0.5") == 0.5


def test_a_config_file_that_fails_or_returns_no_configdict_is_named(tmp_path):
  # Its import error named no file; a get_config returning something else gave a traceback.
  (tmp_path / "five.py").write_text("def get_config():\n  return 5\n")
  (tmp_path / "imports.py").write_text("import nosuchmod\n\n\ndef get_config():\n  return 5\n")
  for name, message in [
      ("five.py", "five.py: get_config() returned an object of type int, not a "
                  "ml_collections.ConfigDict"),
      ("imports.py", "imports.py: ModuleNotFoundError: No module named 'nosuchmod'")]:
    result = _run_tool("model_summary.py", [f"--config={tmp_path / name}"], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"error: --config={tmp_path}/") and lines[0].endswith(message)


def test_tensorflow_is_imported_without_keras():
  """TensorFlow's import loaded all of Keras, and with it scikit-learn and SciPy's statistics
  (librosa's dependencies), 2.3 of its 7 seconds; the tools import it without them, and leave
  `tf.keras` to load Keras where something asks for it."""
  code = ("import sys\n"
          "from cav_mae_jax import cli\n"
          "cli.import_tensorflow()\n"
          "print(sorted(m for m in ('tensorflow', 'keras', 'sklearn') if m in sys.modules),\n"
          "      [m for m in ('keras.src.optimizers', 'tf_keras.src.optimizers')\n"
          "       if m in sys.modules])\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=ROOT), timeout=300, check=True)
  assert done.stdout == "['tensorflow'] []\n", done.stdout + done.stderr[-2000:]
