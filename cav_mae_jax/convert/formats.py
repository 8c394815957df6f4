"""Reading and writing flat state dicts ({key: array}) as .pth, .safetensors and .npz files.

torch is optional: it is imported only to read or write .pth files. Arrays come back as
NumPy arrays with their stored dtype (bfloat16 via ml_dtypes, bit-exact).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

StateDict = dict[str, np.ndarray]

# Top-level keys under which training scripts nest the state dict (facebookresearch/mae: 'model';
# PyTorch's tutorial on saving a checkpoint to resume: 'model_state_dict').
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointFileError(ValueError):
  """A file is not a readable state dict (wrong type, truncated, unexpected contents)."""

  def __init__(self, path: str | os.PathLike, reason: str):
    super().__init__(f"{os.fspath(path)}: {reason}")


def detect_format(path: str | os.PathLike) -> str:
  """Returns 'pth', 'safetensors' or 'npz' from the file's first bytes (not its name)."""
  if os.path.isdir(path):  # open() says only "Is a directory"
    raise CheckpointFileError(
        path, "a directory, not a .pth, .safetensors or .npz file (this library's params "
        "checkpoints and training workdirs are directories: start from one with "
        "config.init.source=params or workdir, or export one with tools/convert.py to-torch)")
  try:
    with open(path, "rb") as f:
      head = f.read(16)
      size = os.fstat(f.fileno()).st_size
  except OSError as e:
    raise CheckpointFileError(path, f"cannot open ({e.strerror})") from e
  if not head:
    raise CheckpointFileError(path, "empty file")
  if head.startswith(b"PK"):  # zip: torch.save (since 1.6) and np.savez both write zip archives
    return _zip_format(path)
  if head[:1] == b"\x80":  # a bare pickle: torch.save with the legacy serialization
    return "pth"
  if len(head) >= 9 and head[8:9] == b"{":
    header_len = struct.unpack("<Q", head[:8])[0]
    if header_len < size:
      return "safetensors"
    raise CheckpointFileError(path, "truncated safetensors file (header longer than the file)")
  raise CheckpointFileError(
      path, "not a PyTorch (.pth), safetensors or .npz file "
      f"(first bytes {head[:8]!r})")


def _zip_format(path: str | os.PathLike) -> str:
  """'npz' or 'pth' for a zip archive, from its members' names.

  np.savez writes only `.npy` members; torch.save writes `<name>/data.pkl` beside the tensors'
  data. Any other zip (an empty one, a folder of files zipped) was handed to torch.load, and
  refused as a "truncated or corrupt PyTorch file" or as holding objects to unpickle; a
  TorchScript archive (torch.jit.save: code, no state dict) as "truncated or corrupt" too.
  """
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
  except zipfile.BadZipFile as e:
    raise CheckpointFileError(path, f"truncated or corrupt zip archive ({e})") from e
  if names and all(n.endswith(".npy") for n in names):
    return "npz"
  if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
    raise CheckpointFileError(
        path, "a TorchScript archive (torch.jit.save): a compiled program, not a state dict; "
        "save the model's weights with torch.save(model.state_dict(), ...)")
  if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
    return "pth"
  shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more"
                                                   if len(names) > 3 else "")
  raise CheckpointFileError(
      path, "a zip archive that is neither a PyTorch checkpoint (no data.pkl) nor an .npz (not "
      f"only .npy members): {f'it holds {shown}' if names else 'it is empty'}")


def read_state_dict(path: str | os.PathLike) -> StateDict:
  """Reads a flat {key: array} state dict from a .pth, .safetensors or .npz file."""
  kind = detect_format(path)
  readers = {"pth": _read_pth, "safetensors": _read_safetensors, "npz": _read_npz}
  state_dict = readers[kind](path)
  if not state_dict:
    raise CheckpointFileError(path, "holds no arrays")
  return state_dict


def _read_pth(path: str | os.PathLike) -> StateDict:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointFileError(
        path, "reading .pth needs PyTorch (pip install 'cav-mae-jax[torch]'), "
        "or convert it once elsewhere to .safetensors/.npz") from e
  _check_zip_crcs(path)
  try:
    with _allowed_globals(torch):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    detail = _unpickling_detail(e)
    raise CheckpointFileError(
        path, f"holds objects other than tensors and containers ({detail}), or is damaged; "
        "refusing to unpickle arbitrary code (torch.load weights_only=True)") from e
  except (RuntimeError, EOFError, IndexError, struct.error, zipfile.BadZipFile, OSError) as e:
    # A legacy (non-zip) file cut short raises EOFError() without a message, IndexError or
    # struct.error, depending on where it is cut.
    raise CheckpointFileError(path, f"truncated or corrupt PyTorch file ({_first_line(e)})") from e
  tensors = _unwrap(path, obj)
  for key in tensors:
    if not isinstance(key, str):  # an optimizer's state is keyed by parameter index
      raise CheckpointFileError(path, f"key {key!r} ({type(key).__name__}) is not a string: "
                                "not a model's state dict")
  return {key: _tensor_to_numpy(path, key, value) for key, value in tensors.items()}


def _unpickling_detail(error: pickle.UnpicklingError) -> str:
  """What torch.load(weights_only=True) refused. Its first line is generic advice (that
  loading with weights_only=False "will likely succeed", which this reader never does); what it
  refused is in its last lines: a class not allowed, a function of a blocked module (os.system),
  or a pickle opcode it does not read."""
  text = str(error)
  refused = re.search(r"Unsupported global: GLOBAL (\S+) was not", text)
  if refused:
    return f"the class {refused.group(1)}"
  blocked = re.search(r"unsupported GLOBAL (\S+) whose module (\S+) is blocked", text)
  if blocked:
    return f"{blocked.group(1)}, of the blocked module {blocked.group(2)}"
  unpickler = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)|(Unsupported operand \d+)", text)
  return (unpickler.group(1) or unpickler.group(2)).strip() if unpickler else _first_line(error)


def _check_zip_crcs(path: str | os.PathLike) -> None:
  """A .pth of torch >= 1.6 is a zip; torch.load does not check its members' CRC-32s, so bytes
  damaged in place (same length) would load as other weights. One extra read of the file."""
  if not zipfile.is_zipfile(path):
    return  # the legacy format: torch.load finds what it can
  try:
    with zipfile.ZipFile(path) as archive:
      damaged = archive.testzip()
  except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
    raise CheckpointFileError(path, f"truncated or corrupt PyTorch file ({_first_line(e)})") from e
  if damaged is not None:
    raise CheckpointFileError(path, f"damaged: its member {damaged!r} fails its CRC-32 check")


def _first_line(error: BaseException) -> str:
  """The first non-blank line of an exception's message, or its type's name if it has none."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def _allowed_globals(torch) -> contextlib.AbstractContextManager:
  """Lets `weights_only` loading build an argparse.Namespace, a plain attribute holder: the
  training checkpoints of MAE-family scripts store their command line as one beside 'model'
  (torch < 2.5 has no scoped allow-list; such files are refused there)."""
  safe_globals = getattr(torch.serialization, "safe_globals", None)
  return safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext()


def _unwrap(path: str | os.PathLike, obj: object) -> Mapping[str, object]:
  """Returns the state dict inside a loaded object (as is, or under one of _WRAPPER_KEYS)."""
  if not isinstance(obj, Mapping):
    raise CheckpointFileError(path, f"holds a {type(obj).__name__}, not a state dict")
  if obj and all(not isinstance(v, Mapping) for v in obj.values()):
    return obj
  wrappers = [key for key in _WRAPPER_KEYS if isinstance(obj.get(key), Mapping)]
  if len(wrappers) > 1:  # the first was taken, the others left unsaid
    raise CheckpointFileError(
        path, f"holds a dict under each of {wrappers}: which is the model's state dict is "
        "ambiguous; save the one to convert on its own")
  if wrappers:
    return obj[wrappers[0]]
  raise CheckpointFileError(
      path, f"no state dict found: top-level keys {sorted(map(str, obj))[:10]} "
      f"(expected tensors, or a dict under one of {_WRAPPER_KEYS})")


def _tensor_to_numpy(path: str | os.PathLike, key: str, value: object) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  if not isinstance(value, torch.Tensor):
    raise CheckpointFileError(path, f"entry {key!r} is a {type(value).__name__}, not a tensor")
  # Each of these made .numpy() or .cpu() raise TypeError, RuntimeError or NotImplementedError:
  # a traceback, not a line naming the entry.
  if value.is_meta:
    raise CheckpointFileError(path, f"entry {key!r} is a meta tensor: it holds no values")
  if value.layout != torch.strided:
    raise CheckpointFileError(path, f"entry {key!r} is a {value.layout} tensor, not a dense one")
  if value.is_complex():  # the cast to the model's float dtype would drop the imaginary part
    raise CheckpointFileError(path, f"entry {key!r} is complex ({value.dtype}): no model "
                              "parameter is")
  if value.is_quantized:
    raise CheckpointFileError(path, f"entry {key!r} is a quantized tensor ({value.dtype}); "
                              "save the float weights")
  value = value.detach().cpu().contiguous()
  if value.dtype == torch.bfloat16:
    return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  try:
    return value.numpy()
  except TypeError as e:  # float8 and other dtypes NumPy has no type for
    raise CheckpointFileError(path, f"entry {key!r} has dtype {value.dtype}, which this reader "
                              "does not convert (use float32, float16 or bfloat16)") from e


def _read_npz(path: str | os.PathLike) -> StateDict:
  try:
    with np.load(path, allow_pickle=False) as archive:
      state_dict = {}
      for key in archive.files:
        try:
          state_dict[key] = archive[key]
        except ValueError as e:
          if "allow_pickle" not in str(e):
            raise
          # An intact file (np.savez of a dict or a ragged list): not "truncated or corrupt".
          raise CheckpointFileError(path, f"entry {key!r} is an object array (pickled Python "
                                    "objects), not numbers; refusing to unpickle it") from e
      return state_dict
  except CheckpointFileError:
    raise
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise CheckpointFileError(path, f"truncated or corrupt .npz file ({e})") from e


def _read_safetensors(path: str | os.PathLike) -> StateDict:
  """Parses a safetensors file (format: u64 header size, JSON header, raw little-endian data)."""
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
    header_len = struct.unpack("<Q", data[:8])[0]
    start = 8 + header_len
    try:
      header = json.loads(data[8:start])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointFileError(path, f"corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    state_dict = {}
    for key, info in header.items():
      state_dict[key] = _safetensors_array(path, key, info, data, start)
    return state_dict


def _safetensors_array(path: str | os.PathLike, key: str, info: Mapping[str, object],
                       data: mmap.mmap, start: int) -> np.ndarray:
  # The header is the file's to say: each entry is checked before it is used (a missing or
  # malformed field was a KeyError or TypeError, and a negative offset read the header's bytes
  # as the tensor's).
  if not isinstance(info, Mapping):
    raise CheckpointFileError(path, f"corrupt safetensors header: the entry of tensor {key!r} is "
                              f"a {type(info).__name__}, not an object")
  dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
  if dtype is None:
    raise CheckpointFileError(path, f"tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
  shape, offsets = info.get("shape"), info.get("data_offsets")
  if not (isinstance(shape, list) and all(_is_count(n) for n in shape)):
    raise CheckpointFileError(path, f"corrupt safetensors header: tensor {key!r} has shape "
                              f"{shape!r} (expected a list of non-negative integers)")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)
          and offsets[0] <= offsets[1]):
    raise CheckpointFileError(path, f"corrupt safetensors header: tensor {key!r} has data_offsets "
                              f"{offsets!r} (expected [begin, end], 0 <= begin <= end)")
  begin, end = offsets
  shape = tuple(shape)
  count = int(np.prod(shape))
  if start + end > len(data):
    raise CheckpointFileError(
        path, f"truncated safetensors file: tensor {key!r} ends at byte {start + end}, "
        f"file has {len(data)}")
  if end - begin != count * np.dtype(dtype).itemsize:
    raise CheckpointFileError(path, f"tensor {key!r}: byte range does not match shape {shape}")
  raw = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"), count=count,
                      offset=start + begin)
  return raw.reshape(shape).astype(dtype, copy=True)


def _is_count(value: object) -> bool:
  """Whether a JSON value is a non-negative integer (JSON's true and false are not)."""
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def write_state_dict(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
  """Writes a flat state dict; the format follows the suffix (.pth/.pt, .safetensors, .npz)."""
  kind = check_output(path, state_dict)
  arrays = {key: np.ascontiguousarray(value) for key, value in state_dict.items()}
  if kind == "pth":
    _write_pth(path, arrays)
  elif kind == "safetensors":
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    try:
      save_file(arrays, os.fspath(path))
    except Exception as e:  # pylint: disable=broad-except  # SafetensorError, Rust's I/O error
      found = re.search(r"\(os error (\d+)\)", str(e))  # "I/O error: ... (os error 28)"
      if not found:
        raise
      code = int(found.group(1))
      raise OSError(code, os.strerror(code), os.fspath(path)) from e
  else:
    with open(path, "wb") as f:
      np.savez(f, **arrays)


def check_output(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> str:
  """The format `path`'s suffix names ('pth', 'safetensors' or 'npz'); ValueError naming the
  path when it is none of them or cannot hold `state_dict`'s arrays (before anything is written)."""
  kind = output_format(path)
  bfloat16 = [key for key, value in state_dict.items()
              if np.asarray(value).dtype == ml_dtypes.bfloat16]
  if kind == "npz" and bfloat16:  # np.savez stores raw 2-byte voids that read back as no number
    raise ValueError(f"{os.fspath(path)}: .npz cannot hold bfloat16 arrays ({bfloat16[0]!r} "
                     f"and {len(bfloat16) - 1} more); write .safetensors or .pth, which keep "
                     "bfloat16, or export float32")
  return kind


def output_format(path: str | os.PathLike) -> str:
  """Returns 'pth', 'safetensors' or 'npz' from an output path's suffix."""
  suffix = os.fspath(path).rsplit(".", 1)[-1].lower()
  kinds = {"pth": "pth", "pt": "pth", "safetensors": "safetensors", "npz": "npz"}
  if suffix not in kinds:
    raise ValueError(f"{os.fspath(path)}: unknown output format '.{suffix}' "
                     "(use .pth, .safetensors or .npz)")
  return kinds[suffix]


def _write_pth(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError("writing .pth needs PyTorch (pip install 'cav-mae-jax[torch]'); "
                     "write .safetensors instead") from e
  tensors = {}
  for key, value in arrays.items():
    if value.dtype == ml_dtypes.bfloat16:
      tensors[key] = torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16)
    else:
      tensors[key] = torch.from_numpy(value.copy())
  with open(path, "wb") as f:
    out = _KeptWriteError(f)
    try:
      torch.save(tensors, out)
    except RuntimeError:  # "unexpected pos ...": torch's zip writer loses the file's OSError
      if out.error is not None:
        raise out.error from None
      raise


class _KeptWriteError:
  """A file for torch.save that keeps the OSError of a failed write (a disk full), which
  torch's zip writer replaces with a RuntimeError of its own."""

  def __init__(self, f: Any):
    self.f, self.error = f, None

  def write(self, data: bytes) -> int:
    try:
      return self.f.write(data)
    except OSError as e:
      self.error = e
      raise

  def flush(self) -> None:
    self.f.flush()
