"""Local writes that a full disk (or a quota, a file-size limit) must not leave half done or
report without a path.

Python's OSError of a failed write names no file (`[Errno 28] No space left on device`), and a
file written in place is left truncated under its final name, where a later run or another tool
takes it for a complete one. Here a file is written under a temporary name beside it and renamed
when complete (`staged_output`), the temporary goes again when the write fails (no rerun would
remove it), and a refused write names the file (`WriteRefusedError`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import socket
from typing import Iterator

# A file system's refusals of a write: the disk full, a file-size limit, a quota, read-only.
WRITE_REFUSED = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO)


class WriteRefusedError(OSError):
  """A write the file system refused, naming the output (`filename`) and the reason
  (`strerror`); its one line: `<path>: cannot be written: <reason>`."""

  def __str__(self) -> str:
    return f"{self.filename}: cannot be written: {self.strerror}"


def refused_write(path: str, error: OSError) -> WriteRefusedError | None:
  """`error` as a WriteRefusedError naming `path` (the same errno) where the file system
  refused a write; None for any other OSError."""
  if error.errno not in WRITE_REFUSED:
    return None
  return WriteRefusedError(error.errno, error.strerror or os.strerror(error.errno), path)


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
  """Raises `refused_write(path, ...)` for a refused write inside the block."""
  try:
    yield
  except OSError as e:
    refused = refused_write(path, e)
    if refused is None:
      raise
    raise refused from e


STAGED = ".tmp-"  # what a temporary name adds to the final one, before its tag


def staged_name(path: str, tag: str | None = None) -> str:
  """The temporary name `path` is written under (`staged_output`): in the same folder (a rename
  cannot cross file systems), ending in no extension of the final name's (a reader of the
  folder skips it)."""
  return f"{path}{STAGED}{tag or os.getpid()}"


def process_tag() -> str:
  """`<host>-<pid>`: the tag of this process's temporaries (`staged_name`) in a folder that
  processes of several hosts write (a split preprocessing run's); `dead_temporaries` reads it."""
  return f"{socket.gethostname()}-{os.getpid()}"


def dead_temporaries(path: str) -> list[str]:
  """The temporaries of `path` tagged by a process of this host (`process_tag`) that is gone (a
  run killed while it wrote them); a live process's, and other hosts', are not listed."""
  prefix = staged_name(path, f"{socket.gethostname()}-")
  dead = []
  for staged in glob.glob(glob.escape(prefix) + "*"):
    pid = staged[len(prefix):]
    if pid.isdigit() and not _process_alive(int(pid)):
      dead.append(staged)
  return dead


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's
    return True
  return True


@contextlib.contextmanager
def staged_output(path: str, tag: str | None = None) -> Iterator[str]:
  """Yields a temporary name beside `path` (`staged_name`), renamed to `path` when the block
  succeeds; on any error the temporary is removed, and a refused write names `path`."""
  staged = staged_name(path, tag)
  try:
    with writing(path):
      yield staged
      os.replace(staged, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(staged)
    raise


def replace_text(path: str, text: str) -> None:
  """Writes `text` as the file `path` atomically (`staged_output`)."""
  with staged_output(path) as staged, open(staged, "w") as f:
    f.write(text)
