"""One process's failure stops every process of a multi-process run at once, saying which and why.

Without this, a process whose input raised (a damaged shard, a missing file on one host) left
its peers waiting in a collective of the next step: they waited until JAX's shutdown barrier of
the failed process timed out (`shutdown_timeout_seconds`, 5 minutes), and then every process,
the failed one included, aborted with a C++ fatal error ("the JAX distributed service detected
fatal errors") that named no cause; a peer on a GPU or TPU may wait longer still.

`start()` (the trainer and the multi-host tools call it; nothing without jax.distributed or
with one process) runs a thread on each process that waits, in the coordination service's
key-value store, for a peer's failure. `report(error)` (where a process fails) puts the failure
there. Each peer then prints one line, `error: process P of N failed: <why>; process Q stops
too`, and ends with status 1 at once, whatever its main thread waits for; the failed process
goes on to its own error line and its status. No process waits at the shutdown barrier then (it
would wait for the processes that have gone); process 0, which runs the coordination service,
ends last, once the others have ended or after `EXIT_WAIT_S`. Where several processes fail, the
first failure stored is the run's: every other process prints the line above for it (its own
error is likely a consequence, e.g. a collective whose peer has gone).

A process that has finished waits at its exit (`at_exit`) for every process to get there, or
for a failure, before JAX's barrier: a peer failing late (process 0 writing the results) ends
it there with the same line. A failed process ends with `os._exit` after Python's exit
functions registered after `start()`, not those before (a library user's own, or logging's); a
script that catches the trainer's error still ends then, with the error's status (1 by
default): its peers have gone.

A Ctrl-C or SIGTERM is not a failure: a preemption notice reaches every process and they stop
together (`train.trainer`).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

from cav_mae_jax import errors

_PREFIX = "cav_mae_jax/peers/"
_FAILURE_KEY = _PREFIX + "failure"  # the first failure's line; later ones are not stored
# How long process 0, whose exit ends the coordination service, waits for the others to end
# (a process still there then is aborted by JAX when the service goes).
EXIT_WAIT_S = 30.0
_MESSAGE_CHARS = 500
_LAST_GRACE_S = 1.0  # process 0's wait after the others' last `ended` key
# How long a process at its exit waits for the others there (or a failure) before JAX's own
# shutdown barrier, which then waits as long again (its `shutdown_timeout_seconds` default).
_DONE_WAIT_S = 300.0
_WAIT_MS = 3_600_000  # one wait of the thread; it waits again after it


class _Watch:
  """The watching thread of this process, and how a failure ends it.

  The run's failure is the first one put in the store (`_FAILURE_KEY`); its process wakes the
  others and ends by its own error path. Any other process ends with one line naming that
  failure and status 1, by whichever of its threads sees it first (its watcher, or its main
  thread's own later error, likely a consequence: a collective whose peer has gone); the other
  thread then parks until the process ends."""

  def __init__(self, client, process: int, processes: int):
    self.client, self.process, self.processes = client, process, processes
    self.lock = threading.Lock()
    self.failed = False  # this process reported a failure
    self.following = False  # a peer's failure ends this process (`_follow`)
    self.status = 1
    self.thread = threading.Thread(target=self._wait, name="cav_mae_jax peers", daemon=True)

  def _wake_key(self, process: int) -> str:
    return f"{_PREFIX}wake/{process}"

  def _set(self, key: str, value: str) -> bool | None:
    """Puts key=value unless key is there: True; False when it was; None when the service
    cannot be reached (gone, or shut down)."""
    try:
      self.client.key_value_set(key, value, allow_overwrite=False)
      return True
    except Exception as e:  # pylint: disable=broad-except
      return False if "ALREADY_EXISTS" in str(e) else None

  def _get(self, key: str, timeout_s: float = 0.0) -> str | None:
    """The value of key (waiting up to timeout_s for it), or None."""
    try:
      if not timeout_s:
        return self.client.key_value_try_get(key)
      return self.client.blocking_key_value_get(key, int(timeout_s * 1000))
    except Exception:  # pylint: disable=broad-except  # not there, or the service gone
      return None

  def _wait(self) -> None:
    while True:
      try:
        message = self.client.blocking_key_value_get(self._wake_key(self.process), _WAIT_MS)
        break
      except Exception as e:  # pylint: disable=broad-except
        if "DEADLINE_EXCEEDED" not in str(e):  # the service went: JAX aborts the process
          return
    if message:  # else this process's own exit woke it
      self._follow(message)

  def _follow(self, line: str) -> None:
    """Ends this process for a peer's failure `line` (once: a second caller parks)."""
    # Never for the run's own failure: its process wakes only the others, and at its exit
    # ends before looking at the store.
    with self.lock:
      ended_elsewhere, self.following = self.following, True
    if ended_elsewhere:
      _park()
    try:
      print(f"error: {line}; process {self.process} stops too", file=sys.stderr)
    finally:  # whatever printing does (a closed pipe): the other thread may be parked
      self._end(1)

  def report(self, error: BaseException, status: int | None) -> None:
    with self.lock:
      if status is not None:
        self.status = status
      again, self.failed = self.failed, True
      following = self.following
    if following:  # a peer's failure came first: this error is likely its consequence
      _park()
    if again:
      return
    why = " ".join(str(error).split()) or type(error).__name__
    if not errors.speaks_for_itself(error):
      why = f"{type(error).__name__}: {why}"  # what a traceback would have named
    if len(why) > _MESSAGE_CHARS:
      why = why[:_MESSAGE_CHARS] + " ..."
    line = f"process {self.process} of {self.processes} failed: {why}"
    stored = self._set(_FAILURE_KEY, line)
    if stored is None:  # no service to tell (shut down): this process's own error path
      return
    if not stored:  # a peer failed first: its failure is the run's
      first_line = self._get(_FAILURE_KEY)
      if first_line:
        self._follow(first_line)
      return
    for peer in range(self.processes):  # a peer at its exit sees the failure there
      if peer != self.process:
        self._set(self._wake_key(peer), line)

  def at_exit(self) -> None:
    """Stops the thread. A failed process ends without JAX's barrier (its peers have gone, or
    go); any other waits for every process to reach this point, or for a failure, before JAX's
    barrier (where no failure could reach it: a peer that failed late, after this process's
    work, left it there until JAX gave up and aborted it)."""
    self._set(self._wake_key(self.process), "")
    self.thread.join(timeout=5.0)
    with self.lock:
      following, failed, status = self.following, self.failed, self.status
    if following:  # the watcher ends the process
      _park()
    if failed:
      self._end(status)
    self._set(f"{_PREFIX}done/{self.process}", "")
    deadline = time.monotonic() + _DONE_WAIT_S
    while time.monotonic() < deadline:
      try:
        if len(self.client.key_value_dir_get(f"{_PREFIX}done/")) >= self.processes:
          return  # JAX's barrier passes at once
      except Exception:  # pylint: disable=broad-except  # the service gone: JAX's exit says so
        return
      line = self._get(_FAILURE_KEY, timeout_s=0.5)
      if line:
        self._follow(line)

  def _end(self, status: int) -> None:
    """Ends this process now with `status`; process 0, whose exit ends the coordination
    service, after the others (or EXIT_WAIT_S)."""
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except (OSError, ValueError):
        pass
    self._set(f"{_PREFIX}ended/{self.process}", "")
    if self.process == 0:
      deadline = time.monotonic() + EXIT_WAIT_S
      while time.monotonic() < deadline:
        try:
          if len(self.client.key_value_dir_get(f"{_PREFIX}ended/")) >= self.processes:
            time.sleep(_LAST_GRACE_S)  # from its `ended` key to its os._exit
            break
        except Exception:  # pylint: disable=broad-except
          break
        time.sleep(0.1)
    os._exit(status)  # pylint: disable=protected-access


def _park() -> None:
  """Waits for the other thread of this process to end it (a Ctrl-C or SIGTERM then adds no
  line of its own)."""
  while True:
    try:
      threading.Event().wait()
    except KeyboardInterrupt:
      pass


_watch: _Watch | None = None


def start() -> bool:
  """Watches for a peer's failure (once per process); False, doing nothing, where the run has
  one process or JAX's distributed client is not initialized."""
  global _watch
  if _watch is not None:
    return True
  try:  # JAX's own client of the coordination service (not public API: a JAX without it
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    state = distributed.global_state  # leaves the run as it was without this module)
    client, process, processes = state.client, state.process_id, state.num_processes
    if client is None or not processes or processes == 1:
      return False
    for method in ("key_value_set", "blocking_key_value_get", "key_value_try_get",
                   "key_value_dir_get"):
      getattr(client, method)
  except (ImportError, AttributeError):
    return False
  _watch = _Watch(client, process, processes)
  _watch.thread.start()
  # After JAX's own exit function (registered at its import), so run before it: the shutdown
  # barrier in JAX's would wait for the processes a failure has ended.
  atexit.register(_watch.at_exit)
  return True


def report(error: BaseException, status: int | None = None) -> None:
  """Tells the peers that this process failed with `error` (the first report of a process is
  the one sent; `status`, given, is the one the process ends with). Nothing without `start()`
  or for a Ctrl-C or SIGTERM (KeyboardInterrupt)."""
  if _watch is not None and not isinstance(error, KeyboardInterrupt):
    _watch.report(errors.from_jax_runtime(error) or error, status)  # in the tools' words
