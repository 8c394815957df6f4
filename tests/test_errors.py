"""Which errors a tool answers with one line (`cav_mae_jax/errors.py`); the tools' lines
themselves: test_interrupts.py (a device out of memory), test_peers.py (a lost peer)."""

import types

import jax

from cav_mae_jax import errors


def test_the_compilers_out_of_memory_sentence_is_kept_and_nothing_else():
  error = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                       "for HLO temporaries (18.97G) exceeds available HBM (15.75G).\n\nmore")
  assert errors.out_of_memory(error) == (
      "Ran out of memory on HBM, the total memory required for HLO temporaries (18.97G) exceeds "
      "available HBM (15.75G).")
  assert errors.out_of_memory(RuntimeError("INTERNAL: something else")) is None


def test_a_device_out_of_memory_is_a_run_failure_in_xlas_words():
  error = errors.from_jax_runtime(jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 26.84GiB.\nBufferAssignment OOM "
      "Debugging.\n..."))
  assert isinstance(error, errors.DeviceMemoryError) and isinstance(error, errors.RUN_FAILURES)
  assert str(error) == ("out of device memory: Out of memory while trying to allocate 26.84GiB. "
                        "(a smaller batch per device needs less; --verbosity=1 shows XLA's "
                        "report)")


def test_other_errors_stay_what_they_are():
  # A bug's error keeps its traceback; a lost connection means a lost peer only in a run of
  # several processes (here one).
  assert errors.from_jax_runtime(RuntimeError("RESOURCE_EXHAUSTED: Out of memory")) is None
  assert errors.from_jax_runtime(jax.errors.JaxRuntimeError("INTERNAL: a bug")) is None
  assert errors.from_jax_runtime(jax.errors.JaxRuntimeError(
      "UNKNOWN: Gloo AllGather failed: Connection reset by peer")) is None


def test_a_multi_process_runs_peers_are_told_in_the_same_words(monkeypatch):
  # The trainer reports its own error to the peers before the tool's one line is made: they
  # said "process 0 of 2 failed: JaxRuntimeError: RESOURCE_EXHAUSTED: ...".
  from cav_mae_jax.train import peers  # pylint: disable=import-outside-toplevel
  told = []
  monkeypatch.setattr(peers, "_watch",
                      types.SimpleNamespace(report=lambda error, status: told.append(error)))
  peers.report(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 8 bytes."))
  assert [type(error) for error in told] == [errors.DeviceMemoryError]
  assert str(told[0]).startswith("out of device memory: Out of memory allocating 8 bytes. (")
