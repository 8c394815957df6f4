"""Holding Ctrl-C and SIGTERM back while something must not be cut in half.

Used around a preprocessing shard's two renames (the shard and its sidecar appear together) and
around the wait for a checkpoint being written (its writes run on other threads: an interrupt of
the wait ended the process with the save half done). Imports nothing beyond the standard
library, so the preprocessing workers need neither JAX nor orbax for it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)

HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def held(abandon_what: str | None = None) -> Iterator[None]:
  """Holds SIGINT and SIGTERM until the block ends, then raises each that came again, for the
  handler it was meant for (a handler that raises stops the rest). Also when the block raised:
  the signal's exception then carries the block's as its context. (Masking them would not do:
  the process's other threads, TensorFlow's or orbax's, would take them, and Python runs its
  handlers in the main thread all the same.)

  With `abandon_what` (what the block finishes, "the checkpoint being written"), the first
  signal logs a warning saying so and a second one abandons the block at once with
  KeyboardInterrupt; without it, every signal waits for the block.

  Main thread only: signal handlers can be set there only, and it gets the signals anyway;
  elsewhere nothing is held back."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received: list[int] = []
  abandoned = False

  def hold(signum, frame):  # pylint: disable=unused-argument
    nonlocal abandoned
    if received and abandon_what is not None:  # again: stop waiting
      abandoned = True
      raise KeyboardInterrupt
    received.append(signum)
    if abandon_what is not None:
      logger.warning("%s: finishing %s first (again to abandon it).",
                     signal.Signals(signum).name, abandon_what)

  previous = {signum: signal.signal(signum, hold) for signum in HELD}
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    if not abandoned:  # delivered again, each to the handler it was meant for, in order
      for signum in dict.fromkeys(received):
        signal.raise_signal(signum)
