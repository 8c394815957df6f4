"""File-to-file conversions (cav_mae_jax.convert.pipelines) and the tools/convert.py command line."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from cav_mae_jax import models
from cav_mae_jax.convert import formats
from cav_mae_jax.convert import io
from cav_mae_jax.convert import pipelines
from cav_mae_jax.convert import state_dict as sd
import blocked_imports
import limits
from test_convert_imagenet_mae import mae_shapes
from test_convert_layout import Dims, random_state_dict

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(audio_length=64, image_size=32)
DIMS = Dims(embed_dim=64, num_heads=4, modality_specific_depth=2, encoder_depth=3,
            decoder_embed_dim=32, decoder_depth=1, audio_length=64, image_size=32)
# contrast_group_size > 1 as in the paper recipes: it must not get in the way of building the target.
PRETRAIN = models.model_config("tiny", **SMALL, contrast_group_size=4)
FINETUNE = models.model_config("tiny", **SMALL, num_classes=5, trainable_pos_embed=True,
                               contrast_group_size=4)


def _released(tmp_path, dims=DIMS, name="audio_model.21.safetensors"):
  """A released-style checkpoint file ('module.' keys); safetensors so torch is not needed."""
  state_dict = {"module." + k: v for k, v in random_state_dict(dims, seed=0).items()}
  path = tmp_path / name
  formats.write_state_dict(path, state_dict)
  return path, state_dict


def test_released_pretrained_to_checkpoint_and_back_is_exact(tmp_path):
  src, state_dict = _released(tmp_path)
  report = pipelines.cavmae_to_checkpoint(src, tmp_path / "ckpt", PRETRAIN, finetune=False)
  assert len(report.mapped) == len(state_dict) and not report.unexpected
  assert io.load_model_config(tmp_path / "ckpt")["embed_dim"] == 64
  # What the weights cannot show is recorded from the config, and the report says so.
  assert io.load_model_config(tmp_path / "ckpt")["norm_pix_loss"] == PRETRAIN.norm_pix_loss
  assert [n for n in report.notes if "a .pth does not say" in n] == [
      f"model_config.json records the config's norm_pix_loss={PRETRAIN.norm_pix_loss} and "
      f"mask_mode_a={PRETRAIN.mask_mode_a!r}, which a .pth does not say (tools/inpaint.py pictures "
      "the model by them; cav-mae-base-nonorm.pth was trained with norm_pix_loss=False, the "
      "ablations with their mask mode)"]
  notes = pipelines.checkpoint_to_torch(tmp_path / "ckpt", tmp_path / "back.safetensors",
                                        module_prefix=True)
  assert notes == [f"exported {len(state_dict)} arrays (keys prefixed 'module.', as DataParallel "
                   "saves them)"]
  back = formats.read_state_dict(tmp_path / "back.safetensors")
  assert set(back) == set(state_dict)
  for key, value in state_dict.items():
    assert back[key].tobytes() == value.tobytes(), key


def test_pretrained_to_finetuning_with_new_head_then_eval_export(tmp_path):
  src, state_dict = _released(tmp_path)
  report = pipelines.cavmae_to_checkpoint(src, tmp_path / "ft", FINETUNE, finetune=True, new_head=True)
  assert "mlp_head_1/kernel" in report.kept_init and "decoder_embed/kernel" in report.dropped
  params = io.load_params(tmp_path / "ft")
  np.testing.assert_array_equal(params["norm_a"]["scale"], state_dict["module.norm_a.weight"])
  assert params["mlp_head_1"]["kernel"].shape == (64, 5)
  pipelines.checkpoint_to_eval_export(tmp_path / "ft", tmp_path / "eval", dtype="bfloat16")
  exported = io.load_params(tmp_path / "eval")
  assert str(exported["blocks_u_0"]["attn"]["qkv"]["kernel"].dtype) == "bfloat16"
  assert io.load_model_config(tmp_path / "eval")["num_classes"] == 5
  with pytest.raises(sd.ParamsMismatchError, match="mlp_head_1/kernel"):
    pipelines.checkpoint_to_eval_export(tmp_path / "ft", tmp_path / "eval10", dtype="float32",
                                        model_config=dict(FINETUNE.to_dict(), num_classes=10))
  assert not (tmp_path / "eval10").exists()


def test_imagenet_mae_file_to_pretraining_checkpoint(tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  # Random stand-in init values: compiling the model's init is slow, and target.init_params is
  # exercised by the new-head test above.
  monkeypatch.setattr(pipelines.target, "init_params", lambda config, finetune, seed: jax.tree_util.tree_map(
      lambda s: rng.standard_normal(s.shape).astype(s.dtype), pipelines.target.param_shapes(config, finetune=finetune)))
  mae = {k: rng.standard_normal(s).astype(np.float32) for k, s in mae_shapes(DIMS).items()}
  formats.write_state_dict(tmp_path / "mae.npz", mae)
  report = pipelines.imagenet_mae_to_checkpoint(tmp_path / "mae.npz", tmp_path / "init", PRETRAIN)
  assert report.dropped == {"cls_token": "CAV-MAE has no CLS token"}
  params = io.load_params(tmp_path / "init")
  np.testing.assert_array_equal(params["pos_embed_v"], mae["pos_embed"][:, 1:])
  shapes = models.param_shapes(PRETRAIN.to_dict() | {"contrast_group_size": 0})
  assert set(sd.flatten_params(params)) == set(sd.flatten_params(shapes))


def _assert_nothing_written(tmp_path, out):
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp left behind


def test_finetuned_checkpoint_given_for_pretraining_names_what_is_missing(tmp_path):
  src, _ = _released(tmp_path, dataclasses.replace(DIMS, num_classes=5), "ft.safetensors")
  out = tmp_path / "ckpt"
  # The message names the file first (the mapping rules' own name only keys).
  with pytest.raises(sd.ParamsMismatchError, match=rf"^{src}: .*has no decoder.*"
                     "decoder_embed/kernel"):
    pipelines.cavmae_to_checkpoint(src, out, PRETRAIN, finetune=False)
  _assert_nothing_written(tmp_path, out)
  longer = models.model_config("tiny", audio_length=96, image_size=32, num_classes=5,
                               trainable_pos_embed=True)
  with pytest.raises(sd.ParamsMismatchError, match=rf"^{src}: pos_embed_a: cannot trim 4 time "
                     "patches to 6; to lengthen use method='interpolate'"):
    pipelines.cavmae_to_checkpoint(src, out, longer, finetune=True, audio_pos_resize="trim")


def test_an_audio_only_finetuning_checkpoint_is_named_as_such(tmp_path):
  # The original's CAVMAEFTAudio keeps no visual branch (none of its scripts use it; the
  # released audio-only models are CAVMAEFT checkpoints): say so, not only list 46 names.
  dims = dataclasses.replace(DIMS, num_classes=5)
  state_dict = {k: v for k, v in random_state_dict(dims, seed=0).items()
                if not k.startswith(("patch_embed_v", "pos_embed_v", "modality_v", "blocks_v",
                                     "norm_v."))}
  src, out = tmp_path / "ftaudio.safetensors", tmp_path / "ckpt"
  formats.write_state_dict(src, state_dict)
  with pytest.raises(sd.ParamsMismatchError, match=r"no visual branch: a checkpoint of the "
                     r"original's audio-only CAVMAEFTAudio.*: blocks_v_0/attn"):
    pipelines.cavmae_to_checkpoint(src, out, FINETUNE, finetune=True)
  _assert_nothing_written(tmp_path, out)


def test_bad_files_write_nothing(tmp_path):
  src, _ = _released(tmp_path)
  truncated = tmp_path / "cut.safetensors"
  truncated.write_bytes(src.read_bytes()[:-100])
  text = tmp_path / "readme.pth"
  text.write_text("not weights")
  for path, message in ((truncated, "truncated"), (text, "not a PyTorch")):
    out = tmp_path / "ckpt"
    with pytest.raises(formats.CheckpointFileError, match=message):
      pipelines.cavmae_to_checkpoint(path, out, PRETRAIN, finetune=False)
    _assert_nothing_written(tmp_path, out)
  with pytest.raises(FileNotFoundError, match="no params checkpoint"):
    pipelines.checkpoint_to_torch(tmp_path / "missing", tmp_path / "x.pth")
  _assert_nothing_written(tmp_path, tmp_path / "x.pth")
  with pytest.raises(ValueError, match="unknown output format '.ckpt'"):
    pipelines.checkpoint_to_torch(tmp_path / "missing", tmp_path / "x.ckpt")
  existing = tmp_path / "taken"
  existing.mkdir()
  with pytest.raises(FileExistsError, match="already exists"):
    pipelines.cavmae_to_checkpoint(src, existing, PRETRAIN, finetune=False)
  assert not os.listdir(existing)


def _cli(*args, max_file_kib=None, xla_cache_dir=None, first_on_path=None):
  """tools/convert.py; `max_file_kib`: a file-size limit (`limits.file_size_limited`);
  `first_on_path`: a folder put first on its PYTHONPATH."""
  command = [sys.executable, str(ROOT / "tools/convert.py"), *args]
  if max_file_kib:
    command = limits.file_size_limited(command, max_file_kib, xla_cache_dir)
  env = None
  if first_on_path:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [first_on_path, str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, check=False)


_TINY = "--config=configs/pretrain.py:tiny"
# (arguments, the error line): a flag that the direction does not read was ignored silently
# (`to-torch --dtype=bfloat16` kept the params' dtype, `to-torch --new_head` the model's head).
_OTHER_DIRECTIONS_FLAGS = [
    (["to-torch", "--new_head"], "--new_head applies to cavmae, not to to-torch"),
    (["to-torch", "--audio_pos_resize=trim"],
     "--audio_pos_resize applies to cavmae, not to to-torch"),
    (["to-torch", "--dtype=bfloat16"], "--dtype applies to export-eval, not to to-torch"),
    (["to-torch", "--seed=1"], "--seed applies to imagenet-mae and cavmae, not to to-torch"),
    (["to-torch", _TINY], "--config applies to imagenet-mae, cavmae and export-eval, not to "
     "to-torch"),
    (["export-eval", "--nomodule_prefix"], "--module_prefix applies to to-torch, not to "
     "export-eval"),
    (["export-eval", "--allow_unexpected"], "--allow_unexpected applies to imagenet-mae and "
     "cavmae, not to export-eval"),
    (["cavmae", _TINY, "--step=2"], "--step applies to to-torch and export-eval, not to cavmae"),
    (["cavmae", _TINY, "--dtype=float16"], "--dtype applies to export-eval, not to cavmae"),
    (["imagenet-mae", _TINY, "--new_head"], "--new_head applies to cavmae, not to imagenet-mae"),
]


@pytest.mark.parametrize("args, line", _OTHER_DIRECTIONS_FLAGS,
                         ids=[" ".join(a) for a, _ in _OTHER_DIRECTIONS_FLAGS])
def test_a_flag_of_another_direction_is_refused(tmp_path, args, line):
  # --src does not exist: the flags are refused before it is looked at.
  out = tmp_path / "out.pth"
  result = _cli(*args, f"--src={tmp_path / 'src'}", f"--out={out}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip() == f"error: {line}"
  assert not out.exists()


@pytest.mark.parametrize("args", [
    ["imagenet-mae", _TINY, "--seed=1", "--allow_unexpected", "--overwrite"],
    ["cavmae", _TINY, "--new_head", "--audio_pos_resize=sincos", "--seed=1",
     "--allow_unexpected", "--overwrite"],
    ["to-torch", "--nomodule_prefix", "--step=2", "--overwrite"],
    ["export-eval", _TINY, "--dtype=bfloat16", "--step=2", "--overwrite"],
    # A boolean flag at its default says nothing: accepted by any direction.
    ["to-torch", "--nonew_head", "--noallow_unexpected"],
], ids=" ".join)
def test_each_direction_takes_the_flags_it_reads(tmp_path, args):
  # Past the flag checks, the missing --src is the error, named before any work (export-eval
  # named the model_config.json it looked for in it).
  src = tmp_path / "src"
  result = _cli(*args, f"--src={src}", f"--out={tmp_path / 'out.pth'}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip() == f"error: --src: {src}: no such file or directory"


def test_command_line_converts_and_reports_errors(tmp_path):
  src, _ = _released(tmp_path)
  config = [f"--config={ROOT}/configs/pretrain.py:tiny", "--config.model.audio_length=64",
            "--config.model.image_size=32"]
  # Without TensorFlow (no conversion reads records): it was imported first, 3-4 s of each run.
  no_tf = blocked_imports.blocked_packages(tmp_path / "without_tensorflow", ["tensorflow"],
                                           "conversion does not need it")
  ok = _cli("cavmae", f"--src={src}", f"--out={tmp_path / 'ckpt'}", *config, first_on_path=no_tf)
  assert ok.returncode == 0, ok.stderr
  assert "mapped: " in ok.stdout and f"wrote {tmp_path / 'ckpt'}" in ok.stdout
  # Ignored, and nothing said so: a params checkpoint's --step, a pretraining model's new head.
  for args, line in (
      (["to-torch", f"--src={tmp_path / 'ckpt'}", "--step=3"],
       f"--step picks one of the checkpoints of a training workdir; --src {tmp_path / 'ckpt'} is "
       "not one (a params checkpoint holds a single one)"),
      (["cavmae", f"--src={src}", "--new_head", *config], "--new_head makes a new "
       "classification head, and a pretraining model has none (--config "
       "configs/finetune.py:... fine-tunes)")):
    refused = _cli(*args, f"--out={tmp_path / 'refused.pth'}")
    assert (refused.returncode, refused.stderr) == (2, f"error: {line}\n"), refused.stderr
  # Back to the original's layout: by default with DataParallel's prefix, as the released files
  # (the original's loaders wrap the model first; strict=False would load nothing without it).
  back = _cli("to-torch", f"--src={tmp_path / 'ckpt'}", f"--out={tmp_path / 'back.safetensors'}",
              first_on_path=no_tf)
  assert back.returncode == 0 and "keys prefixed 'module.'" in back.stdout, back.stderr
  pipelines.checkpoint_to_eval_export(tmp_path / "ckpt", tmp_path / "bf16", dtype="bfloat16")
  npz = _cli("to-torch", f"--src={tmp_path / 'bf16'}", f"--out={tmp_path / 'bf16.npz'}")
  assert npz.returncode == 2 and npz.stderr.startswith(  # the path given, not a staged one
      f"error: {tmp_path / 'bf16.npz'}: .npz cannot hold bfloat16 arrays"), npz.stderr
  assert not list(tmp_path.glob("*bf16.npz*"))
  assert set(formats.read_state_dict(tmp_path / "back.safetensors")) == set(
      formats.read_state_dict(src))
  # A disk full: torch's and safetensors' writers raised their own errors (a traceback,
  # "unexpected pos 1037568 vs 1037520"); the line names the output, and no file is left.
  # The same disk holds a JAX compilation cache: its entries refused (then read truncated by the
  # second run) each printed JAX's warning before the line.
  xla_cache = tmp_path / "xla_cache"
  for name in ("full.pth", "full.safetensors"):
    full = _cli("to-torch", f"--src={tmp_path / 'ckpt'}", f"--out={tmp_path / name}",
                max_file_kib=64, xla_cache_dir=str(xla_cache))
    assert (full.returncode, full.stderr) == (
        2, f"error: {tmp_path / name}: cannot be written: File too large\n"), full.stderr
    assert not list(tmp_path.glob(f"*{name}*"))
  assert any(entry.stat().st_size == 64 * 1024 for entry in xla_cache.rglob("*"))  # refused
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(src.read_bytes()[:1000])
  bad = _cli("cavmae", f"--src={cut}", f"--out={tmp_path / 'bad'}", *config)
  assert bad.returncode == 2 and "truncated safetensors file" in bad.stderr
  assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error:"), bad.stderr
  assert not (tmp_path / "bad").exists()


def test_command_line_converts_a_finetuned_checkpoint_for_a_probe_config(tmp_path):
  # configs/finetune.py:<recipe>,probe trains the fine-tuning model (task 'probe'); its
  # conversion target is that model, not the pretraining model with a decoder.
  src, state_dict = _released(tmp_path, dataclasses.replace(DIMS, num_classes=5), "ft.safetensors")
  out = tmp_path / "probe"
  done = _cli("cavmae", f"--src={src}", f"--out={out}",
              f"--config={ROOT}/configs/finetune.py:tiny,classes=5,probe",
              "--config.model.audio_length=64", "--config.model.image_size=32")
  assert done.returncode == 0, done.stderr
  params = io.load_params(out)
  assert "decoder_embed" not in params
  np.testing.assert_array_equal(params["mlp_head_1"]["kernel"],
                                state_dict["module.mlp_head.1.weight"].T)


def _files(path):
  """{relative path: bytes} of every file under `path`."""
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_overwrite_replaces_only_an_output_of_its_kind_and_never_an_input(tmp_path):
  src, _ = _released(tmp_path)
  ckpt = tmp_path / "ckpt"
  pipelines.cavmae_to_checkpoint(src, ckpt, PRETRAIN, finetune=False)
  saved = _files(ckpt)
  # The output is the input: it was read, then deleted and replaced by the export.
  for out in (ckpt, ckpt / "inner"):
    with pytest.raises(io.OutputPathError, match=f"--out {out}: (is|lies inside) --src {ckpt}"):
      pipelines.checkpoint_to_eval_export(ckpt, out, dtype="bfloat16", overwrite=True)
  with pytest.raises(io.OutputPathError, match=f"--out {src}: is --src {src}"):
    pipelines.cavmae_to_checkpoint(src, src, PRETRAIN, finetune=False, overwrite=True)
  folder = tmp_path / "folder"
  folder.mkdir()
  (folder / "keep.txt").write_text("someone's data")
  with pytest.raises(io.OutputPathError, match="a directory that is not a params checkpoint"):
    pipelines.cavmae_to_checkpoint(src, folder, PRETRAIN, finetune=False, overwrite=True)
  with pytest.raises(io.OutputPathError, match="a directory, not a file"):
    pipelines.checkpoint_to_torch(ckpt, folder, overwrite=True)
  assert _files(ckpt) == saved and _files(folder) == {"keep.txt": b"someone's data"}
  # Of the same kind: replaced.
  pipelines.checkpoint_to_eval_export(ckpt, tmp_path / "eval", dtype="float32")
  pipelines.checkpoint_to_eval_export(ckpt, tmp_path / "eval", dtype="bfloat16", overwrite=True)
  exported = io.load_params(tmp_path / "eval")
  assert str(exported["blocks_u_0"]["attn"]["qkv"]["kernel"].dtype) == "bfloat16"
  (tmp_path / "back.npz").write_bytes(b"an earlier export")
  pipelines.checkpoint_to_torch(ckpt, tmp_path / "back.npz", module_prefix=True, overwrite=True)
  assert set(formats.read_state_dict(tmp_path / "back.npz")) == set(formats.read_state_dict(src))


def test_command_line_refuses_an_out_that_is_an_input_or_another_kind(tmp_path):
  src, _ = _released(tmp_path)
  ckpt = tmp_path / "ckpt"
  pipelines.cavmae_to_checkpoint(src, ckpt, PRETRAIN, finetune=False)
  saved = _files(ckpt)
  (tmp_path / "folder").mkdir()
  (tmp_path / "folder" / "keep.txt").write_text("someone's data")
  for args, named in (
      (["export-eval", f"--src={ckpt}", f"--out={ckpt}"], f"--out {ckpt}: is --src {ckpt}"),
      (["to-torch", f"--src={ckpt}", f"--out={tmp_path / 'folder'}"], "a directory, not a file"),
      # export-eval reads --config (to-torch refuses it as a flag of other directions).
      (["export-eval", f"--src={ckpt}", "--out=configs/pretrain.py",
        "--config=configs/pretrain.py"],
       "--out configs/pretrain.py: is --config configs/pretrain.py")):
    result = _cli(*args, "--overwrite")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: ") and named in lines[0], lines[0]
  assert _files(ckpt) == saved
  assert _files(tmp_path / "folder") == {"keep.txt": b"someone's data"}


def test_eval_export_refuses_a_config_of_another_task(tmp_path):
  # A pretraining checkpoint exported with a fine-tuning config was written with a
  # model_config.json claiming its num_classes and trainable_pos_embed (exit 0): the target
  # was the pretraining model whatever the config's task.
  src, _ = _released(tmp_path)
  ckpt = tmp_path / "ckpt"
  pipelines.cavmae_to_checkpoint(src, ckpt, PRETRAIN, finetune=False)
  result = _cli("export-eval", f"--src={ckpt}", f"--out={tmp_path / 'eval'}",
                f"--config={ROOT}/configs/finetune.py:tiny", "--config.model.audio_length=64",
                "--config.model.image_size=32")
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
  assert lines[0] == (f"error: {ckpt}: the params are a pretraining model's (no classification "
                      "head), the config's task is fine-tuning; give a config of the "
                      "checkpoint's task, or none (the checkpoint's own model config)")
  assert not (tmp_path / "eval").exists()
  with pytest.raises(sd.ParamsMismatchError, match="the params are a pretraining model's"):
    pipelines.checkpoint_to_eval_export(ckpt, tmp_path / "eval", dtype="float32",
                                        model_config=FINETUNE.to_dict(), finetune=True)
  pipelines.checkpoint_to_eval_export(ckpt, tmp_path / "eval", dtype="float32",
                                      model_config=PRETRAIN.to_dict(), finetune=False)
  assert io.load_model_config(tmp_path / "eval")["num_classes"] == PRETRAIN.num_classes
