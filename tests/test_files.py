"""Local writes that a full disk refuses (`cav_mae_jax/files.py`): one line naming the file, and
no temporary left. A file-size limit (RLIMIT_FSIZE, lowered for the block and put back; Python
ignores SIGXFSZ, so a longer write fails with EFBIG) stands in for the full disk."""

import contextlib
import errno
import os
import resource

import pytest

from cav_mae_jax import files
from cav_mae_jax.train import metrics


@contextlib.contextmanager
def _files_limited_to(size):
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_file_replaced_whole_keeps_its_old_text_and_no_temporary(tmp_path):
  # config.json, plan.json, log_window.json: the failed write left `<name>.tmp-<pid>` behind
  # for good, and said "[Errno 27] File too large" without a path.
  path = tmp_path / "config.json"
  files.replace_text(str(path), "old")
  with _files_limited_to(1000), pytest.raises(OSError) as e:
    files.replace_text(str(path), "x" * 5000)
  assert str(e.value) == f"{path}: cannot be written: File too large"
  assert e.value.errno == errno.EFBIG
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]


def test_other_errors_are_raised_as_they_are(tmp_path):
  with pytest.raises(FileNotFoundError):  # no such folder: not a refused write
    files.replace_text(str(tmp_path / "missing" / "config.json"), "x")


def test_a_metrics_line_the_disk_refuses_names_the_file(tmp_path):
  path = tmp_path / "metrics.jsonl"
  writer = metrics.JsonlWriter(str(path))
  with _files_limited_to(1000), pytest.raises(OSError) as e:
    writer.write_scalars(1, {f"metric_{i}": float(i) for i in range(200)})
    writer.flush()
  assert str(e.value) == f"{path}: cannot be written: File too large"
  writer.close()  # what the failed flush kept, written now
