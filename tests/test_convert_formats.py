"""Reading/writing state-dict files and orbax params checkpoints; errors on bad files."""

import argparse
import json
import os
import pickle
import re
import shutil
import struct
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from cav_mae_jax.convert import formats
from cav_mae_jax.convert import io
from cav_mae_jax.train import checkpoint


def _state_dict():
  rng = np.random.default_rng(0)
  return {"blocks_a.0.attn.qkv.weight": rng.standard_normal((6, 2)).astype(np.float32),
          "modality_a": rng.standard_normal((1, 1, 2)).astype(np.float16),
          "norm.weight": np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16)}


def _assert_same(got, want):
  assert set(got) == set(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
    assert got[key].tobytes() == value.tobytes(), key


@pytest.mark.parametrize("suffix", ["safetensors", "npz", "pth"])
def test_write_then_read_is_exact(tmp_path, suffix):
  if suffix == "pth":
    pytest.importorskip("torch", reason="reading .pth needs torch")
  want = _state_dict()
  if suffix == "npz":  # np.savez cannot hold bfloat16 portably
    del want["norm.weight"]
  path = tmp_path / f"weights.{suffix}"
  formats.write_state_dict(path, want)
  assert formats.detect_format(path) == suffix
  _assert_same(formats.read_state_dict(path), want)


def test_pth_nested_under_model_is_unwrapped(tmp_path):
  torch = pytest.importorskip("torch", reason="reading .pth needs torch")
  path = tmp_path / "mae.pth"
  torch.save({"model": {"norm.weight": torch.ones(3)}}, path)
  got = formats.read_state_dict(path)
  assert list(got) == ["norm.weight"] and got["norm.weight"].dtype == np.float32



def test_pth_nested_as_in_the_pytorch_tutorial_is_unwrapped_and_two_state_dicts_are_refused(
    tmp_path):
  """{'model_state_dict': ..., 'optimizer_state_dict': ..., 'epoch': ...} (PyTorch's recipe for a
  checkpoint to resume) was "no state dict found"; of 'model' and 'state_dict' both, the first was
  taken without a word."""
  torch = pytest.importorskip("torch", reason="reading .pth needs torch")
  path = tmp_path / "resume.pth"
  torch.save({"epoch": 3, "model_state_dict": {"norm.weight": torch.ones(3)},
              "optimizer_state_dict": {"state": {}, "param_groups": []}, "loss": 0.5}, path)
  assert list(formats.read_state_dict(path)) == ["norm.weight"]
  torch.save({"model": {"norm.weight": torch.ones(3)}, "state_dict": {"norm.bias": torch.ones(3)}},
             path)
  with pytest.raises(formats.CheckpointFileError, match=r"holds a dict under each of \['model', "
                     r"'state_dict'\]: which is the model's state dict is ambiguous"):
    formats.read_state_dict(path)

def test_pth_of_a_training_state_with_its_arguments_is_read(tmp_path):
  """MAE's training checkpoints keep the command line (an argparse.Namespace) beside 'model'."""
  torch = pytest.importorskip("torch", reason="reading .pth needs torch")
  path = tmp_path / "checkpoint-799.pth"
  torch.save({"model": {"norm.weight": torch.ones(3)}, "optimizer": {"state": {}},
              "epoch": 799, "scaler": {"scale": 65536.0},
              "args": argparse.Namespace(model="mae_vit_base_patch16", lr=None)}, path)
  got = formats.read_state_dict(path)
  assert list(got) == ["norm.weight"]


def test_pth_with_pickled_objects_is_refused(tmp_path):
  torch = pytest.importorskip("torch", reason="reading .pth needs torch")
  path = tmp_path / "train_state.pth"
  torch.save({"model": {"w": torch.ones(1)}, "args": _Namespace()}, path)
  with pytest.raises(formats.CheckpointFileError, match="refusing to unpickle"):
    formats.read_state_dict(path)


class _Namespace:
  pass


def test_pth_with_pickled_objects_names_the_class(tmp_path):
  torch = pytest.importorskip("torch", reason="reading .pth needs torch")
  path = tmp_path / "train_state.pth"
  torch.save({"model": {"w": torch.ones(1)}, "args": _Namespace()}, path)
  with pytest.raises(formats.CheckpointFileError, match=r"\(the class [\w.]*_Namespace\)"):
    formats.read_state_dict(path)


class _CallsAFunction:
  """Unpickles as a call of os.getpid (harmless: the reader must refuse it, not run it)."""

  def __reduce__(self):
    return (os.getpid, ())


def test_pth_that_would_call_a_function_names_it_not_torchs_advice(tmp_path):
  """The message was torch's first line: that loading with weights_only=False "will likely
  succeed", which the tool never does; what was refused was not named."""
  torch = pytest.importorskip("torch", reason="reading .pth needs torch")
  for path in (tmp_path / "saved.pth", tmp_path / "pickled.pth"):
    if path.name == "saved.pth":
      torch.save({"w": torch.ones(1), "x": _CallsAFunction()}, path)
      refused = r"the class posix.getpid|posix.getpid, of the blocked module posix"
    else:  # a plain pickle, not torch.save's format
      path.write_bytes(pickle.dumps({"x": _CallsAFunction()}, protocol=4))
      refused = r"Unsupported operand \d+"
    with pytest.raises(formats.CheckpointFileError) as info:
      formats.read_state_dict(path)
    assert re.search(rf"{path}: holds objects other than tensors and containers \(({refused})\), "
                     r"or is damaged; refusing to unpickle", str(info.value)), str(info.value)
    assert "will likely succeed" not in str(info.value)


@pytest.mark.parametrize("cut", [1, 2, 200, 2000, 3000])
def test_legacy_pth_cut_short_is_an_error_naming_the_file(tmp_path, cut):
  """torch < 1.6's format (not a zip): cut short, torch.load raises EOFError() without a message,
  IndexError or struct.error depending on where; each was a traceback."""
  torch = pytest.importorskip("torch", reason="writing a .pth needs torch")
  path = tmp_path / "legacy.pth"
  torch.save({f"layer{i}.weight": torch.ones(64, 64) for i in range(20)}, path,
             _use_new_zipfile_serialization=False)
  path.write_bytes(path.read_bytes()[:cut])
  with pytest.raises(formats.CheckpointFileError, match=f"{path}: truncated or corrupt"):
    formats.read_state_dict(path)


def test_pth_damaged_in_place_is_refused_not_loaded(tmp_path):
  """torch.load does not check the zip members' CRC-32s: 64 zeroed bytes loaded as other weights."""
  torch = pytest.importorskip("torch", reason="writing a .pth needs torch")
  path = tmp_path / "model.pth"
  torch.save({"w": torch.arange(4096, dtype=torch.float32)}, path)
  data = bytearray(path.read_bytes())
  start = data.index(np.arange(4096, dtype=np.float32).tobytes()[:64]) + 8192
  data[start:start + 64] = bytes(64)
  path.write_bytes(bytes(data))
  with pytest.raises(formats.CheckpointFileError, match=rf"{path}: damaged: its member "
                     r"'model/data/0' fails its CRC-32 check"):
    formats.read_state_dict(path)


def _unreadable_entries(torch):
  """(entry, the error naming it): each made a traceback (TypeError, RuntimeError,
  NotImplementedError or, for a non-string key, AttributeError in the converters)."""
  return [
      (torch.zeros(2, dtype=torch.float8_e4m3fn), r"'x' has dtype torch.float8_e4m3fn"),
      (torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.qint8),
       r"'x' is a quantized tensor \(torch.qint8\)"),
      (torch.zeros(2, 2).to_sparse(), r"'x' is a torch.sparse_coo tensor, not a dense one"),
      (torch.empty(2, device="meta"), r"'x' is a meta tensor: it holds no values"),
      # Read, then cast to float32 with only NumPy's warning: the imaginary part was dropped.
      (torch.zeros(2, dtype=torch.complex64), r"'x' is complex \(torch.complex64\)"),
  ]


def test_pth_entries_numpy_cannot_hold_are_named(tmp_path):
  torch = pytest.importorskip("torch", reason="writing a .pth needs torch")
  for value, message in _unreadable_entries(torch):
    path = tmp_path / "model.pth"
    torch.save({"w": torch.ones(2), "x": value}, path)
    with pytest.raises(formats.CheckpointFileError, match=rf"{path}: entry {message}"):
      formats.read_state_dict(path)
  torch.save({"w": torch.ones(2), 0: torch.ones(2)}, path)  # keyed like an optimizer's state
  with pytest.raises(formats.CheckpointFileError,
                     match=r"key 0 \(int\) is not a string: not a model"):
    formats.read_state_dict(path)

def _zip(path, members):
  with zipfile.ZipFile(path, "w") as archive:
    for name, data in members.items():
      archive.writestr(name, data)
  return path


def test_zip_archives_that_are_not_checkpoints_are_named(tmp_path):
  """A zip torch.save did not write was refused as a "truncated or corrupt PyTorch file" (or an
  empty one as holding objects to unpickle), a TorchScript archive as "truncated or corrupt"."""
  np.save(tmp_path / "w.npy", np.ones(2))
  cases = [
      (_zip(tmp_path / "docs.pth", {"readme.txt": "hello"}), r"a zip archive that is neither a "
       r"PyTorch checkpoint \(no data.pkl\) nor an .npz \(not only .npy members\): it holds "
       r"'readme.txt'"),
      (_zip(tmp_path / "empty.pth", {}), "a zip archive that is neither .*: it is empty"),
      (_zip(tmp_path / "mixed.npz", {"w.npy": (tmp_path / "w.npy").read_bytes(),
                                     "notes.txt": "hi"}),
       "a zip archive .*: it holds 'w.npy', 'notes.txt'"),
      (_zip(tmp_path / "scripted.pt", {"m/data.pkl": b"", "m/constants.pkl": b"",
                                       "m/code/__torch__.py": "", "m/version": "3"}),
       r"a TorchScript archive \(torch.jit.save\): a compiled program, not a state dict"),
  ]
  for path, message in cases:
    with pytest.raises(formats.CheckpointFileError, match=f"{path}: {message}"):
      formats.read_state_dict(path)



def test_npz_of_objects_is_refused_as_such_not_as_corrupt(tmp_path):
  path = tmp_path / "objects.npz"
  np.savez(path, w=np.ones(2), meta=np.array([{"epoch": 3}], dtype=object))
  with pytest.raises(formats.CheckpointFileError) as info:
    formats.read_state_dict(path)
  assert str(info.value) == (f"{path}: entry 'meta' is an object array (pickled Python objects), "
                             "not numbers; refusing to unpickle it")

def test_a_torchscript_file_is_named_as_such(tmp_path):
  torch = pytest.importorskip("torch", reason="writing TorchScript needs torch")
  path = tmp_path / "model.pt"
  torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
  with pytest.raises(formats.CheckpointFileError, match=f"{path}: a TorchScript archive"):
    formats.read_state_dict(path)

def test_npz_refuses_bfloat16_rather_than_writing_void_arrays(tmp_path):
  arrays = {"w": np.ones(3, ml_dtypes.bfloat16), "b": np.ones(3, np.float32)}
  with pytest.raises(ValueError, match=r"\.npz cannot hold bfloat16 arrays \('w' and 0 more\)"):
    formats.write_state_dict(tmp_path / "x.npz", arrays)
  assert not (tmp_path / "x.npz").exists()
  formats.write_state_dict(tmp_path / "x.safetensors", arrays)  # keeps bfloat16
  assert formats.read_state_dict(tmp_path / "x.safetensors")["w"].dtype == ml_dtypes.bfloat16


def _bad_files(tmp_path):
  """(path, expected message) for every kind of bad input."""
  good = tmp_path / "good.safetensors"
  formats.write_state_dict(good, {"w": np.ones((64, 64), np.float32)})
  data = good.read_bytes()
  cases = []

  def add(name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    cases.append((path, message))

  add("notes.pth", b"hello, this is a text file\n", "not a PyTorch")
  add("image.npz", b"\x89PNG\r\n\x1a\n" + bytes(64), "not a PyTorch")
  add("empty.safetensors", b"", "empty file")
  add("cut.safetensors", data[: len(data) // 2], "truncated safetensors")
  add("cut_header.safetensors", data[:12], "truncated safetensors")
  npz = tmp_path / "good.npz"
  formats.write_state_dict(npz, {"w": np.ones((64, 64), np.float32)})
  add("cut.npz", npz.read_bytes()[:300], "truncated or corrupt")
  add("pickle.pth", pickle.dumps([1, 2, 3], protocol=2), "corrupt PyTorch file|needs PyTorch")
  # Malformed safetensors headers: each was a traceback (AttributeError, KeyError, TypeError),
  # a ValueError not naming the file, or (a negative offset) the header's bytes read as weights.
  for name, entry, message in (
      ("entry_text", "F32", "the entry of tensor 'w' is a str, not an object"),
      ("no_offsets", {"dtype": "F32", "shape": [2]}, r"'w' has data_offsets None"),
      ("negative_offset", {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]},
       r"'w' has data_offsets \[-8, 0\]"),
      ("one_offset", {"dtype": "F32", "shape": [2], "data_offsets": [0]},
       r"'w' has data_offsets \[0\]"),
      ("shape_text", {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
       r"'w' has shape '2' \(expected a list of non-negative integers\)")):
    header = json.dumps({"w": entry}).encode()
    add(f"{name}.safetensors", struct.pack("<Q", len(header)) + header + bytes(64),
        f"corrupt safetensors header: (tensor )?{message}")
  return cases


def test_bad_files_give_clear_errors(tmp_path):
  for path, message in _bad_files(tmp_path):
    with pytest.raises(formats.CheckpointFileError, match=message) as info:
      formats.read_state_dict(path)
    assert str(path) in str(info.value)


def test_truncated_pth_is_reported(tmp_path):
  torch = pytest.importorskip("torch", reason="reading .pth needs torch")
  path = tmp_path / "audio_model.21.pth"
  torch.save({"w": torch.ones(256, 256)}, path)
  path.write_bytes(path.read_bytes()[:5000])
  with pytest.raises(formats.CheckpointFileError, match="truncated or corrupt"):
    formats.read_state_dict(path)


def test_missing_file_is_reported(tmp_path):
  with pytest.raises(formats.CheckpointFileError, match="cannot open"):
    formats.read_state_dict(tmp_path / "nope.pth")


def test_a_directory_is_named_with_where_ours_go(tmp_path):
  # open() said only "cannot open (Is a directory)", for our params checkpoints too.
  with pytest.raises(formats.CheckpointFileError) as info:
    formats.read_state_dict(tmp_path)
  assert str(info.value) == (
      f"{tmp_path}: a directory, not a .pth, .safetensors or .npz file (this library's params "
      "checkpoints and training workdirs are directories: start from one with "
      "config.init.source=params or workdir, or export one with tools/convert.py to-torch)")


def test_unknown_output_suffix_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="unknown output format"):
    formats.write_state_dict(tmp_path / "w.ckpt", {"w": np.ones(1)})


def test_params_checkpoint_round_trip_with_config(tmp_path):
  params = {"blocks_a_0": {"attn": {"qkv": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}},
            "modality_a": np.ones((1, 1, 3), np.float32)}
  path = tmp_path / "ckpt"
  io.save_params(path, params, model_config={"embed_dim": 3})
  restored = io.load_params(path)
  np.testing.assert_array_equal(restored["blocks_a_0"]["attn"]["qkv"]["kernel"],
                                params["blocks_a_0"]["attn"]["qkv"]["kernel"])
  assert io.load_model_config(path) == {"embed_dim": 3}
  assert [p for p in os.listdir(tmp_path) if p != "ckpt"] == []  # no temp left behind
  with pytest.raises(FileExistsError):
    io.save_params(path, params)


@pytest.mark.parametrize("damage", ["metadata", "manifest"])
def test_a_damaged_params_checkpoint_is_an_error_naming_it(tmp_path, damage):
  # orbax's own errors name an internal file or none at all (a garbled metadata file came out
  # as AttributeError: 'NoneType' object has no attribute 'tree' in the tools).
  path = tmp_path / "ckpt"
  io.save_params(path, {"a": {"kernel": np.ones((2, 3), np.float32)}})
  name = {"metadata": "_METADATA", "manifest": "manifest.ocdbt"}[damage]
  (path / name).write_bytes(b"garbage")
  with pytest.raises(checkpoint.CheckpointReadError) as info:
    io.load_params(path)
  assert isinstance(info.value, OSError)  # bad input: the tools print one error line
  assert str(info.value).startswith(f"{path}: the checkpoint cannot be read")


def test_damaged_parameter_data_in_a_params_checkpoint_is_refused(tmp_path):
  params = {"a": {"kernel": np.arange(4096, dtype=np.float32).reshape(64, 64)},
            "b": np.linspace(-1, 1, 1000).astype(ml_dtypes.bfloat16)}
  path = tmp_path / "ckpt"
  io.save_params(path, params)
  assert json.loads((path / io.DIGEST_FILE).read_text()) == checkpoint.tree_digest(params)
  data_files = sorted(p for p in path.rglob("*") if p.is_file() and p.parent.name == "d")
  # Into a target too (other dtypes: the checksums are of the arrays as saved); it was not
  # checked before.
  target = {"a": {"kernel": jax.ShapeDtypeStruct((64, 64), jnp.bfloat16)},
            "b": jax.ShapeDtypeStruct((1000,), jnp.float32)}
  caught = 0
  for fraction in (0.5, 0.25, 0.75):  # the data are compressed: a flip may hit a checksum
    for i, name in enumerate(data_files):
      damaged = tmp_path / f"damaged_{fraction}_{i}"
      shutil.copytree(path, damaged)
      damaged_file = damaged / name.relative_to(path)
      data = bytearray(damaged_file.read_bytes())
      data[int(len(data) * fraction)] ^= 0x10
      damaged_file.write_bytes(bytes(data))
      outcomes = []
      for load in (lambda: io.load_params(damaged), lambda: io.load_params(damaged, target)):
        try:
          restored = load()
        except checkpoint.CheckpointReadError as e:
          outcomes.append("refused")
          caught += "differ from what was saved" in str(e)
          continue
        outcomes.append("read")
        np.testing.assert_array_equal(np.asarray(restored["a"]["kernel"], np.float32),
                                      params["a"]["kernel"].astype(restored["a"]["kernel"].dtype))
        np.testing.assert_array_equal(np.asarray(restored["b"], np.float32),
                                      params["b"].astype(np.float32))
      assert outcomes[0] == outcomes[1], (name, fraction, outcomes)
    if caught:
      break
  assert caught >= 2, data_files  # by both loads


def test_atomic_output_leaves_nothing_on_error(tmp_path):
  path = tmp_path / "out.safetensors"
  with pytest.raises(RuntimeError, match="boom"):
    with io.atomic_output(path) as staged:
      with open(staged, "wb") as f:
        f.write(b"partial")
      raise RuntimeError("boom")
  assert os.listdir(tmp_path) == []


def test_load_params_into_an_abstract_sharded_target(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  params = {"norm": {"scale": np.arange(8, dtype=np.float32)}, "modality_a": np.ones((1, 1, 8), np.float32)}
  io.save_params(tmp_path / "ckpt", params)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), params)
  restored = io.load_params(tmp_path / "ckpt", target)
  assert isinstance(restored["norm"]["scale"], jax.Array)
  assert restored["norm"]["scale"].sharding == replicated
  np.testing.assert_array_equal(restored["norm"]["scale"], params["norm"]["scale"])
  # Another dtype: restored as saved (checksums), then cast, placement kept.
  target["norm"]["scale"] = jax.ShapeDtypeStruct((8,), jnp.bfloat16, sharding=replicated)
  restored = io.load_params(tmp_path / "ckpt", target)
  assert restored["norm"]["scale"].dtype == jnp.bfloat16
  assert restored["norm"]["scale"].sharding == replicated
  np.testing.assert_array_equal(restored["norm"]["scale"], params["norm"]["scale"])
  with pytest.raises(ValueError, match=r"the target's parameters are not the checkpoint's "
                     r"\(not in the target: modality_a\)"):
    io.load_params(tmp_path / "ckpt", {"norm": target["norm"]})
  target["modality_a"] = jax.ShapeDtypeStruct((1, 1, 4), jnp.float32, sharding=replicated)
  with pytest.raises(ValueError, match=r"not the checkpoint's \(of other shapes: modality_a\)"):
    io.load_params(tmp_path / "ckpt", target)


def _snapshot(path):
  """{relative path: bytes (None for a folder)} of everything under `path`."""
  return {str(p.relative_to(path)): None if p.is_dir() else p.read_bytes()
          for p in sorted(path.rglob("*"))}


def test_overwrite_never_replaces_a_directory_by_a_file_or_a_file_by_one(tmp_path):
  # `--out /tmp --overwrite` deleted /tmp and wrote the .npz in its place.
  folder = tmp_path / "folder"
  (folder / "sub").mkdir(parents=True)
  (folder / "keep.txt").write_text("someone's data")
  before = _snapshot(folder)
  with pytest.raises(io.OutputPathError, match=r"^--out .*folder: a directory, not a file; "
                                               r"--overwrite replaces only a file"):
    with io.atomic_output(folder, overwrite=True) as staged:
      with open(staged, "wb") as f:
        f.write(b"features")
  assert _snapshot(folder) == before
  weights = tmp_path / "w.npz"
  weights.write_bytes(b"weights")
  with pytest.raises(io.OutputPathError, match="a file, not a params checkpoint directory"):
    io.save_params(weights, {"a": np.ones(2, np.float32)}, overwrite=True)
  assert weights.read_bytes() == b"weights"
  assert sorted(os.listdir(tmp_path)) == ["folder", "w.npz"]  # no temp left behind
  # A file by a file: replaced.
  with io.atomic_output(weights, overwrite=True) as staged:
    with open(staged, "wb") as f:
      f.write(b"new weights")
  assert weights.read_bytes() == b"new weights"


def test_overwrite_replaces_a_directory_only_if_it_is_a_params_checkpoint(tmp_path):
  params = {"a": {"kernel": np.ones((2, 3), np.float32)}}
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "100").mkdir(parents=True)
  (workdir / "config.json").write_text("{}")
  records = tmp_path / "records"
  records.mkdir()
  (records / "train-00000-of-00001.tfrecord").write_bytes(b"clips")
  noted = tmp_path / "noted"
  io.save_params(noted, params, model_config={"embed_dim": 3})
  (noted / "notes.txt").write_text("where these came from")
  for folder, why in ((workdir, "a training workdir"),
                      (workdir / "checkpoints" / "100", "not a params checkpoint"),
                      (records, "not a params checkpoint"),
                      (noted, r"also holds other files \(notes.txt\)")):
    before = _snapshot(folder)
    with pytest.raises(io.OutputPathError, match=f"{folder}: .*{why}.*--overwrite replaces only "
                                                 "a params checkpoint directory"):
      io.save_params(folder, params, overwrite=True)
    assert _snapshot(folder) == before, folder
  # A params checkpoint by a params checkpoint: replaced, its extra files with it.
  ckpt = tmp_path / "ckpt"
  io.save_params(ckpt, params, model_config={"embed_dim": 3}, fbank_normalization={
      "fbank_stats": "fixed", "fbank_mean": -4.0, "fbank_std": 3.0})
  assert io.is_params_checkpoint(ckpt) and not io.is_params_checkpoint(noted)
  io.save_params(ckpt, {"a": {"kernel": np.zeros((2, 3), np.float32)}}, overwrite=True)
  np.testing.assert_array_equal(io.load_params(ckpt)["a"]["kernel"], np.zeros((2, 3)))
  assert io.load_fbank_normalization(ckpt) is None
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "noted", "records", "run"]


def test_an_output_that_is_an_input_or_inside_or_around_one_is_refused(tmp_path):
  src = tmp_path / "run"
  (src / "checkpoints").mkdir(parents=True)
  link = tmp_path / "link"
  link.symlink_to(src)
  for out, relation in ((src, "is"), (link, "is"), (src / "checkpoints" / "new", "lies inside"),
                        (tmp_path, "contains")):
    for overwrite in (False, True):
      with pytest.raises(io.OutputPathError, match=f"^--out {out}: {relation} --workdir {src}, "
                                                   "which this command reads"):
        io.check_output_path(out, overwrite=overwrite, kind="params",
                             inputs=[("--workdir", str(src)), ("--params", None)])
  assert sorted(os.listdir(src)) == ["checkpoints"] and not os.listdir(src / "checkpoints")
  # A sibling whose name starts with the input's is not inside it; a remote input is skipped.
  assert io.check_output_path(tmp_path / "run_avg", inputs=[("--workdir", str(src)),
                                                            ("--src", "gs://b/run")])
