"""One run per output directory at a time: a lock file that names its holder.

Two training runs on one workdir (a job submitted again while the first still runs) would both
write checkpoints of the same steps and interleave their metrics.jsonl, silently; two
preprocessing runs of one task into one directory would write the same shards and remove each
other's temporary files. The main process of a run holds a lock file in the directory (`lock`
for a workdir) with an fcntl (POSIX) lock for the whole run: the kernel (or the NFS lock
service) drops it when the process ends in any way, SIGKILL included, so a lock is never stale
while its file stays behind. The file holds the holder's host, pid and start time for the
message a second run gets (`DirectoryInUseError`, one line). When the previous holder is gone,
the next run takes the lock over and says whose it was. A file system without locks (some FUSE
mounts) is run unguarded, with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from typing import Any, Iterator

LOCK_FILE = "lock"
# What lockf raises where a file system has no locks (some FUSE and NFS mounts).
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)

logger = logging.getLogger(__name__)


def make_output_dir(path: str, what: str) -> bool:
  """Makes output directory `path` (and its parents) or raises OSError naming it and why: a
  file in its place, or a folder that cannot be written (os.makedirs names the first folder it
  could not make, which under a read-only or special folder such as /proc reads "No such file
  or directory"). Returns whether `path` was made here (False: it was there)."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"{what} {path}: exists and is not a directory")
  existed = os.path.isdir(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise OSError(f"{what} {path}: cannot make this directory ({e.strerror or e})") from e
  return not existed


class DirectoryInUseError(OSError):
  """Another live run holds the directory's lock."""


class DirLock:
  """Lock `name` of `directory` (a context manager) for a run of kind `what` ("training run");
  `acquire` raises DirectoryInUseError while another process holds it."""

  def __init__(self, directory: str, name: str = LOCK_FILE, what: str = "training run"):
    self.path = os.path.join(directory, name)
    self.what = what
    self._fd: int | None = None
    self.previous_holder: dict[str, Any] | None = None

  def acquire(self) -> "DirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EACCES, errno.EAGAIN):
        holder = _read_holder(fd)
        os.close(fd)
        raise DirectoryInUseError(
            f"{os.path.dirname(self.path)}: in use by another {self.what} "
            f"({_describe(holder)}); two at once would overwrite each other's outputs; wait "
            f"for it to end, or stop it (its lock, {self.path}, is released when its process "
            "ends)") from None
      os.close(fd)
      if e.errno in _NO_LOCKS:
        logger.warning("%s: this file system has no file locks (%s); a second %s here "
                       "would not be detected", self.path, e.strerror, self.what)
        return self
      raise
    self.previous_holder = _read_holder(fd)
    mine = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    """Ends the lock (the file stays: removing it would race with a run taking it)."""
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.close(self._fd)  # closing the descriptor drops the fcntl lock
      self._fd = None

  def remove_unused_directory(self) -> bool:
    """Removes the lock's directory if it holds nothing but the lock file and empty folders
    (a run's `checkpoints/`, made before its first file), while the lock is held; returns
    whether it did. For a run that made its directory and failed before writing anything there
    (a starting-weights source that does not fit, records that cannot be opened, a full disk):
    the next attempt then finds no empty directory left behind. A run that takes the lock file
    over meanwhile made a new one (the directory is then not empty and stays) or, after the
    removal, finds no directory: it fails as it would have without one."""
    directory = os.path.dirname(self.path)
    if self._fd is None:
      return False
    walk = list(os.walk(directory, topdown=False))  # the deepest folders first
    for folder, folders, files in walk:
      if (files != ([os.path.basename(self.path)] if folder == directory else []) or
          any(os.path.islink(os.path.join(folder, name)) for name in folders)):
        return False
    try:
      for folder, _, _ in walk[:-1]:  # (the last is `directory`)
        os.rmdir(folder)  # fails where a peer process of the run has just written into it
      os.unlink(self.path)
      os.rmdir(directory)
    except OSError:  # or another run's lock file appeared in between: its directory now
      return False
    return True

  def __enter__(self) -> "DirLock":
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()


@contextlib.contextmanager
def held(directory: str, name: str) -> Iterator[None]:
  """Holds lock file `name` of `directory` over a short critical section, waiting while another
  process holds it (DirLock refuses instead); unguarded where the file system has no locks."""
  fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.lockf(fd, fcntl.LOCK_EX)
    except OSError as e:
      if e.errno not in _NO_LOCKS:
        raise
    yield
  finally:
    os.close(fd)  # drops the lock


def _read_holder(fd: int) -> dict[str, Any] | None:
  try:
    data = os.pread(fd, 4096, 0)
    holder = json.loads(data) if data.strip() else None
  except (OSError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
  if not holder:
    return "its holder did not record itself"
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
          f"{holder.get('started')}")


def describe_previous(holder: dict[str, Any] | None) -> str | None:
  """A note about a lock taken over from a run that ended without releasing it, or None."""
  if not holder:
    return None
  return (f"note: taking over the lock of a run that is no longer running "
          f"({_describe(holder)})")
