"""Which exceptions mean a bad input or a failed run rather than a bug.

Tools answer them with one line and no traceback (`cli.run`); a multi-process run tells its
peers their message alone (`train.peers`), where any other error is named by its type too, as a
traceback would have named it.
"""

from __future__ import annotations

# Bad input: ValueError covers config checks, parse and shape errors (ours subclass it); OSError
# covers missing, unreadable and existing paths. A tool exits with status 2.
USER_ERRORS = (ValueError, OSError)
# Failures of a run that started: a loss that became NaN or infinite
# (trainer.NonFiniteLossError); host memory exhausted, e.g. NumPy's "Unable to allocate 954. GiB
# for an array with shape ...". A tool exits with status 1.
RUN_FAILURES = (FloatingPointError, MemoryError)


def speaks_for_itself(error: BaseException) -> bool:
  """Whether `error`'s message alone says what went wrong (one of the kinds above)."""
  return isinstance(error, USER_ERRORS + RUN_FAILURES)
