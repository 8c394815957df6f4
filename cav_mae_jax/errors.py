"""Which exceptions mean a bad input or a failed run rather than a bug.

Tools answer them with one line and no traceback (`cli.run`); a multi-process run tells its
peers their message alone (`train.peers`), where any other error is named by its type too, as a
traceback would have named it.
"""

from __future__ import annotations

import sys

# Bad input: ValueError covers config checks, parse and shape errors (ours subclass it); OSError
# covers missing, unreadable and existing paths. A tool exits with status 2.
USER_ERRORS = (ValueError, OSError)


class DeviceMemoryError(MemoryError):
  """An accelerator's memory exhausted (XLA's RESOURCE_EXHAUSTED at compile or run time)."""


class PeerLostError(RuntimeError):
  """A collective of a multi-process run lost a process that ended without reporting a failure
  (killed outright: SIGKILL, the OOM killer; its machine gone)."""


# Failures of a run that started: a loss that became NaN or infinite
# (trainer.NonFiniteLossError); host memory exhausted, e.g. NumPy's "Unable to allocate 954. GiB
# for an array with shape ...", or a device's (DeviceMemoryError); a lost peer process
# (PeerLostError). A tool exits with status 1.
RUN_FAILURES = (FloatingPointError, MemoryError, PeerLostError)


def speaks_for_itself(error: BaseException) -> bool:
  """Whether `error`'s message alone says what went wrong (one of the kinds above)."""
  return isinstance(error, USER_ERRORS + RUN_FAILURES)


def out_of_memory(error: BaseException) -> str | None:
  """XLA's sentence on memory that a step or array does not fit (its RESOURCE_EXHAUSTED
  error's first line, without the status), or None for any other error."""
  text = str(error).strip()
  if not text.startswith("RESOURCE_EXHAUSTED"):
    return None
  return text.splitlines()[0].removeprefix("RESOURCE_EXHAUSTED:").strip()


# How a collective says that a peer's end cut its connection: Gloo (CPU) and NCCL (GPU).
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
              "remote process exited")


def from_jax_runtime(error: BaseException) -> MemoryError | PeerLostError | None:
  """`error` in its own words (one of RUN_FAILURES) where it is a JAX runtime error that says
  what went wrong to a user, not a bug: a device's memory exhausted, or a multi-process run's
  collective that lost a process; else None. (JAX's runtime errors are RuntimeErrors of
  XLA's status and text: a tool printed them as a traceback.)"""
  jax = sys.modules.get("jax")
  runtime_error = getattr(getattr(jax, "errors", None), "JaxRuntimeError", None)
  if runtime_error is None or not isinstance(error, runtime_error):
    return None
  sentence = out_of_memory(error)
  if sentence is not None:
    return DeviceMemoryError(f"out of device memory: {sentence} (a smaller batch per device "
                             "needs less; --verbosity=1 shows XLA's report)")
  text = str(error)
  if jax.process_count() > 1 and any(words in text for words in _PEER_LOST):
    first = text.strip().splitlines()[0]
    return PeerLostError(f"a collective lost another process of the run, which ended without "
                         f"reporting a failure (killed? out of host memory? see its log): "
                         f"{first}")
  return None
