"""The feature tools as a user runs them: retrieval, extract_features and inpaint.

Bad input prints one line `error: ...` and exits 2; a good run on tiny records and a tiny params
checkpoint prints its table, writes its .npz or PNG. Subprocesses from another working directory,
8 fake CPU devices (inherited from conftest).
"""

import dataclasses
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from cav_mae_jax import tasks
from cav_mae_jax.convert import io
from cav_mae_jax.eval import features
from cav_mae_jax.train import array_input
from cav_mae_jax.train import trainer
from configs import workdir as workdir_config
import blocked_imports
from test_features import (  # pylint: disable=unused-import
    NUM_CLIPS, RECORD_ORDER, fixture_records_dir, tiny_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=configs/pretrain.py:tiny", "--config.model.embed_dim=32",
        "--config.model.num_heads=2", "--config.model.encoder_depth=2",
        "--config.model.modality_specific_depth=1", "--config.model.decoder_embed_dim=16",
        "--config.model.decoder_depth=1", "--config.model.decoder_num_heads=2",
        "--config.model.image_size=32", "--config.data.batch_size=8"]


def run_tool(tool, args, cwd, first_on_path=None):
  """Runs tools/<tool> from `cwd` (`first_on_path`: a folder put before this checkout)."""
  path = os.pathsep.join(([first_on_path] if first_on_path else []) + [ROOT])
  env = dict(os.environ, PYTHONPATH=path, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the tools quiet TensorFlow themselves
  return subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module", name="without_tensorflow")
def fixture_without_tensorflow(tmp_path_factory):
  """A folder whose `tensorflow` fails to import: first on a tool's path, a bad input must be
  answered before TensorFlow's import."""
  return blocked_imports.blocked_packages(tmp_path_factory.mktemp("without_tensorflow"),
                                          ["tensorflow"], "answer before importing it")


@pytest.fixture(scope="module", name="params_dir")
def fixture_params_dir(tmp_path_factory):
  config = tiny_config()
  params = jax.jit(tasks.get_task(config).init_params)(jax.random.key(0))
  path = str(tmp_path_factory.mktemp("ckpt") / "params")
  io.save_params(path, jax.tree.map(np.asarray, params),
                 model_config=dataclasses.asdict(tasks.get_task(config).model_config))
  return path


CASES = {
    "retrieval_missing_records": ("retrieval.py", ["--params=p", "--records=/no/records"],
                                  "/no/records"),
    "retrieval_missing_subset": ("retrieval.py", ["--params=p", "--records={records}",
                                                  "--subset=/no/subset.txt"], "/no/subset.txt"),
    "retrieval_missing_params": ("retrieval.py", ["--params=/no/params", "--records={records}"],
                                 "/no/params"),
    # orbax's words were "Metadata file (named _METADATA) does not exist at ...".
    "retrieval_params_is_records": ("retrieval.py", ["--params={records}", "--records={records}"],
                                    "--params: {records}: neither a training workdir (no "
                                    "checkpoints/ inside) nor a params checkpoint"),
    "extract_missing_videos": ("extract_features.py", ["--params=p", "--videos=/no/videos",
                                                       "--out=f.npz"], "/no/videos"),
    "extract_strict_missing_video": ("extract_features.py",
                                     ["--params={params}", "--videos=list.txt", "--out=f.npz",
                                      "--strict"], "missing.mp4: missing_file"),
    "extract_every_video_quarantined": ("extract_features.py",
                                        ["--params={params}", "--videos=list.txt", "--out=f.npz"],
                                        "all 1 were quarantined (missing_file: 1); see "
                                        "f.npz.quarantine.jsonl"),
    "retrieval_subset_not_in_records": ("retrieval.py", ["--params={params}",
                                                         "--records={records}",
                                                         "--subset=list.txt"],
                                        "no clip of records directory "),
    "retrieval_damaged_shard": ("retrieval.py", ["--params={params}", "--records={damaged}"],
                                "is damaged: corrupted record at"),
    "evaluate_params_of_another_size": ("evaluate.py", ["--params={params}",
                                                        "--config.model.embed_dim=64",
                                                        "--config.data.eval_dir={records}",
                                                        "--config.evals.val=None"],
                                        "the checkpoint's model config has embed_dim=32 where "
                                        "the config has 64; shape mismatch for"),
    "extract_existing_out": ("extract_features.py", ["--params={params}", "--records={records}",
                                                     "--out=exists.npz"],
                             "exists.npz: output already exists (--overwrite"),
    # Named as retrieval names it: the flag the user set (it said `batch_size=4`).
    "extract_batch_size_not_divisible": ("extract_features.py", ["--params={params}",
                                                                "--records={records}",
                                                                "--batch_size=4", "--out=f.npz"],
                                         "error: --batch_size=4: must be positive and divisible "
                                         "by the number of devices (8)"),
    "extract_subset_with_videos": ("extract_features.py", ["--params={params}",
                                                           "--videos=list.txt",
                                                           "--subset=list.txt", "--out=f.npz"],
                                   "--subset selects clips of records; with --videos"),
    # An earlier run's quarantine list was emptied (before the model loaded, too).
    "extract_existing_quarantine": ("extract_features.py", ["--params={params}",
                                                            "--videos=list.txt", "--out=f.npz",
                                                            "--quarantine=exists.npz"],
                                    "exists.npz: output already exists (--overwrite"),
    # Read by --videos alone: with records they promised a check that never ran.
    "extract_strict_with_records": ("extract_features.py", ["--params={params}",
                                                            "--records={records}", "--strict",
                                                            "--out=f.npz"],
                                    "--quarantine and --strict apply to --videos"),
    "inpaint_missing_records": ("inpaint.py", ["--params=p", "--records=/no/records",
                                               "--out=x.png"], "/no/records"),
    "inpaint_bad_mask_ratio": ("inpaint.py", ["--params=p", "--mask_ratio_a=1.5",
                                              "--out=x.png"], "--mask_ratio_a=1.5"),
    # --out is checked before the model loads: not a .png (matplotlib wrote 'x.png' for '--out=x'
    # and the tool said 'wrote x'), or an existing file (it was overwritten).
    "inpaint_out_not_png": ("inpaint.py", ["--params={params}", "--records={records}",
                                           "--out=picture"], "flag --out=picture: must name a .png file"),
    "inpaint_existing_out": ("inpaint.py", ["--params={params}", "--records={records}",
                                            "--out=exists.png"],
                             "exists.png: output already exists (--overwrite"),
    # Same parameters either way: a raw-pixel model (the original's cav-mae-base-nonorm) read
    # with the default norm_pix_loss=True was pictured through the wrong un-normalization.
    "inpaint_norm_pix_loss_not_the_models": ("inpaint.py", [
        "--params={params}", "--records={records}", "--config.model.norm_pix_loss=False",
        "--out=x.png"], "records norm_pix_loss=True, the config has False; inpaint it "
                        "with --config.model.norm_pix_loss=True"),
}


@pytest.fixture(scope="module", name="damaged_dir")
def fixture_damaged_dir(records_dir, tmp_path_factory):
  """records_dir with one byte flipped inside its first shard's records (a checksum error)."""
  damaged = tmp_path_factory.mktemp("damaged")
  names = sorted(os.listdir(records_dir))
  first_shard = next(name for name in names if name.endswith(".tfrecord"))
  for name in names:
    data = bytearray(open(os.path.join(records_dir, name), "rb").read())
    if name == first_shard:
      data[len(data) // 2] ^= 0xFF
    (damaged / name).write_bytes(bytes(data))
  return str(damaged)


# Answered before TensorFlow's import: an --out that exists.
BEFORE_TENSORFLOW = ("extract_existing_out", "extract_existing_quarantine",
                     "extract_strict_with_records", "inpaint_existing_out")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_prints_one_error_line_and_exits_2(case, records_dir, params_dir, damaged_dir,
                                                     tmp_path, without_tensorflow):
  tool, args, named = CASES[case]
  (tmp_path / "list.txt").write_text("missing.mp4\n")
  (tmp_path / "exists.npz").write_bytes(b"features of an earlier run")
  (tmp_path / "exists.png").write_bytes(b"a picture of an earlier run")
  paths = dict(records=records_dir, params=params_dir, damaged=damaged_dir)
  args, named = [a.format(**paths) for a in args], named.format(**paths)
  result = run_tool(tool, TINY + args, tmp_path,
                    first_on_path=without_tensorflow if case in BEFORE_TENSORFLOW else None)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
  assert named in lines[0], lines[0]
  assert "Traceback" not in result.stdout + result.stderr


def test_retrieval_prints_both_directions(records_dir, params_dir, tmp_path):
  (tmp_path / "subset.txt").write_text("\n".join(RECORD_ORDER[:5]) + "\n")
  result = run_tool("retrieval.py", TINY + [f"--params={params_dir}", f"--records={records_dir}",
                                            "--subset=subset.txt"], tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert "5 clips" in lines[0]
  assert lines[1].split() == ["direction", "R@1", "R@5", "R@10", "median", "rank"]
  assert [line.split()[0] for line in lines[2:]] == ["audio->video", "video->audio"]
  assert all(float(line.split()[3]) == 100.0 for line in lines[2:])  # R@10 of 5 clips


def test_extract_features_writes_npz(records_dir, params_dir, tmp_path):
  result = run_tool("extract_features.py", TINY + [f"--params={params_dir}",
                                                   f"--records={records_dir}", "--out=f.npz"],
                    tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  with np.load(tmp_path / "f.npz") as data:
    assert list(data["ids"]) == RECORD_ORDER
    assert {k: data[k].shape for k in ("audio", "video", "joint")} == {
        k: (NUM_CLIPS, 32) for k in ("audio", "video", "joint")}


@pytest.fixture(scope="module", name="trained_workdir")
def fixture_trained_workdir(records_dir, tmp_path_factory):
  """A tiny pretraining workdir (1 step on random clips) whose config names records_dir as its
  eval_dir, and the config it ran."""
  config = tiny_config(eval_dir=records_dir)
  config.total_steps, config.log_every_steps, config.tensorboard = 1, 1, False
  config.evals = ml_collections.ConfigDict()
  m = config.model
  clips = array_input.random_clips(8, m.audio_length, m.num_mel_bins, m.image_size, seed=0)
  workdir = str(tmp_path_factory.mktemp("run"))
  trainer.train_and_evaluate(config, workdir, trainer.Inputs(array_input.ArrayInput(clips, 8),
                                                             None, 8))
  return workdir, config


def test_a_workdir_is_read_with_the_config_its_run_recorded(trained_workdir, tmp_path):
  """--workdir without --config reads the run's config.json (configs/workdir.py), so that the
  model, data and normalization settings are the run's (the tools needed --config repeated)."""
  workdir, config = trained_workdir
  result = run_tool("extract_features.py", [f"--workdir={workdir}", "--out=f.npz"], tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  loaded = features.load(config, workdir=workdir)
  expected_ids, expected = features.extract_embeddings(
      loaded, features.clip_batches(config, 8, records_dir=config.data.eval_dir))
  with np.load(tmp_path / "f.npz") as data:
    assert list(data["ids"]) == list(expected_ids) == RECORD_ORDER
    for name in ("audio", "video", "joint"):
      np.testing.assert_array_equal(data[name], expected[name], err_msg=name)
  # The recorded config is the run's, overridable as any config file, a field the run left
  # unset (None in config.json) included.
  recorded = workdir_config.get_config(workdir)
  assert recorded.to_dict() == config.to_dict()
  assert recorded.get_type("total_epochs") is float
  recorded.total_epochs = 2.0  # a None field with its placeholder's type
  with pytest.raises(TypeError):
    recorded.total_epochs = "two"


@pytest.mark.parametrize("make, named", [
    (lambda tmp: str(tmp / "none"), "--workdir {}: no such directory"),
    (lambda tmp: str(tmp), "--workdir {}: no config.json (not a training workdir"),
])
def test_a_workdir_without_a_recorded_config_needs_config(make, named, tmp_path):
  workdir = make(tmp_path)
  result = run_tool("extract_features.py", [f"--workdir={workdir}", "--out=f.npz"], tmp_path)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
  assert lines[0].startswith("error: " + named.format(workdir)), lines[0]


def test_inpaint_writes_png(records_dir, params_dir, tmp_path):
  result = run_tool("inpaint.py", TINY + [f"--params={params_dir}", f"--records={records_dir}",
                                          "--clip_id=clip4", "--seed=2", "--out=x.png"], tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "clip clip4" in result.stdout and "normalized-patch space" in result.stdout
  assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def _files(path):
  """{relative path: bytes} of every file under `path`."""
  return {os.path.relpath(os.path.join(root, name), path):
          open(os.path.join(root, name), "rb").read()
          for root, _, names in os.walk(path) for name in names}


def test_overwrite_never_deletes_a_directory_or_an_input(records_dir, params_dir, tmp_path,
                                                         without_tensorflow):
  """--overwrite replaced whatever --out named: a folder (`--out /tmp` deleted /tmp and wrote
  the .npz in its place) or the records being read; --quarantine emptied the --videos list.
  Each is refused before TensorFlow's import (in seconds, not after the model loaded)."""
  (tmp_path / "folder").mkdir()
  (tmp_path / "folder" / "keep.txt").write_text("someone's data")
  (tmp_path / "folder.png").mkdir()
  (tmp_path / "list.txt").write_text("missing.mp4\n")
  kept = {path: _files(path) for path in (records_dir, params_dir, str(tmp_path))}
  model = TINY + [f"--params={params_dir}", f"--records={records_dir}", "--overwrite"]
  for tool, args, named in (
      ("extract_features.py", model + ["--out=folder"], "--out folder: a directory, not a file"),
      ("extract_features.py", model + [f"--out={records_dir}/f.npz"],
       f"--out {records_dir}/f.npz: lies inside --records {records_dir}"),
      ("extract_features.py", model + [f"--out={params_dir}"],
       f"--out {params_dir}: is --params {params_dir}"),
      ("inpaint.py", model + ["--out=folder.png"], "--out folder.png: a directory, not a file"),
      ("extract_features.py", TINY + [f"--params={params_dir}", "--videos=list.txt",
                                      "--quarantine=list.txt", "--out=f.npz"],
       "--quarantine list.txt: is --videos list.txt")):
    result = run_tool(tool, args, tmp_path, first_on_path=without_tensorflow)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: ") and named in lines[0], lines[0]
  assert {path: _files(path) for path in kept} == kept
  # A file by a file: replaced.
  (tmp_path / "f.npz").write_bytes(b"features of an earlier run")
  result = run_tool("extract_features.py", model + ["--out=f.npz"], tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  with np.load(tmp_path / "f.npz") as data:
    assert list(data["ids"]) == RECORD_ORDER
