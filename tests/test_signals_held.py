"""cav_mae_jax.signals_held: Ctrl-C and SIGTERM held around a shard's renames and a checkpoint's
final wait (the checkpoint case with a real asynchronous save: tests/test_train_resume.py)."""

import logging
import os
import signal
import subprocess
import sys
import threading

import pytest

from cav_mae_jax import signals_held


class _Signalled(Exception):
  pass


@pytest.fixture(name="handlers")
def _handlers():
  """SIGINT and SIGTERM raise `_Signalled(signum)` for the test; restored after it."""
  def signalled(signum, frame):  # pylint: disable=unused-argument
    raise _Signalled(signum)

  previous = {signum: signal.signal(signum, signalled) for signum in signals_held.HELD}
  yield signalled
  for signum, handler in previous.items():
    signal.signal(signum, handler)


def test_signals_wait_for_the_block_then_the_first_reaches_its_handler(handlers):
  done = []
  with pytest.raises(_Signalled) as raised:
    with signals_held.held():
      os.kill(os.getpid(), signal.SIGTERM)
      os.kill(os.getpid(), signal.SIGINT)  # without abandon_what, a second one waits too
      done.append("renamed")
  assert done == ["renamed"]
  assert raised.value.args[0] == signal.SIGTERM
  for signum in signals_held.HELD:
    assert signal.getsignal(signum) is handlers


def test_a_signal_that_its_handler_ignores_does_not_hide_the_next(handlers):
  # A preprocessing worker ignores SIGINT: a SIGTERM held after one was lost.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  with pytest.raises(_Signalled) as raised:
    with signals_held.held():
      os.kill(os.getpid(), signal.SIGINT)
      os.kill(os.getpid(), signal.SIGTERM)
  assert raised.value.args[0] == signal.SIGTERM
  assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_no_signal_no_effect_and_an_error_in_the_block_still_raises_the_held_signal(handlers):
  with signals_held.held():
    pass
  with pytest.raises(_Signalled) as raised:  # the held signal, chained to the block's error
    with signals_held.held():
      os.kill(os.getpid(), signal.SIGINT)
      raise OSError("rename failed")
  assert isinstance(raised.value.__context__, OSError)
  assert signal.getsignal(signal.SIGINT) is handlers


def test_with_abandon_what_the_first_is_announced_and_a_second_abandons(handlers, caplog):
  steps = []
  with caplog.at_level(logging.WARNING, logger=signals_held.__name__):
    with pytest.raises(KeyboardInterrupt):
      with signals_held.held("the checkpoint being written"):
        os.kill(os.getpid(), signal.SIGINT)
        steps.append(1)
        os.kill(os.getpid(), signal.SIGINT)
        steps.append(2)
  assert steps == [1]
  assert caplog.messages == [
      "SIGINT: finishing the checkpoint being written first (again to abandon it)."]
  assert signal.getsignal(signal.SIGINT) is handlers  # and the first is not raised again


def test_outside_the_main_thread_nothing_is_held(handlers):
  seen = []

  def body():
    with signals_held.held():
      seen.append(signal.getsignal(signal.SIGINT))

  thread = threading.Thread(target=body)
  thread.start()
  thread.join()
  assert seen == [handlers]


def test_importing_it_imports_no_jax_or_tensorflow():
  # The preprocessing workers import it through shards; the trainer through checkpointing.
  code = ("import sys; import cav_mae_jax.signals_held; "
          "print(sorted(m for m in ('jax', 'tensorflow', 'orbax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
  assert out.stdout.strip() == "[]"
