"""What every command-line tool shares: one flag style, quiet logs, one-line errors.

Tools are absl programs: `cli.run(main)` instead of `app.run(main)`.
- A bad input (missing or unreadable file, wrong folder, bad flag or config value) prints one
  line `error: <what> <why>` to stderr and exits 2, never a traceback. Unexpected errors still
  raise; `--verbosity=1` (or absl's `-v 1`) shows the traceback of any error and the library logs.
- `--config` files resolve from any working directory: a relative `configs/<file>.py` that does
  not exist where the tool runs is taken from this package's `configs/` directory. The tools
  that load a checkpoint (`define_model_flags`) default it, given --workdir, to the config the
  workdir's run recorded (`configs/workdir.py:<workdir>`).
- TensorFlow's C++ start-up lines are silenced: TF_CPP_MIN_LOG_LEVEL=3 unless set, and TF
  (when installed) is imported once with the process's stderr closed, because TF 2.16+ prints
  its start-up lines (an INFO and a WARNING) before that variable is read (not closed when it
  asks for them: 0 or 1). Its GPUs are hidden from it: it reads the input on the host, and a
  CUDA build would claim the memory JAX computes in. That import comes after the flags are
  parsed, after the tool's own argument checks (`run`'s check_args), a check that the tool's
  local input paths exist and its outputs may be written, and the config checks that need no
  data (`run`'s check_config), so a bad flag, config value or mistyped path is answered in one
  or two seconds.
- A flag that the tool's chosen mode does not read is refused, not ignored (`check_mode_flags`);
  so is an empty path (`--workdir=`, `--out=`: `_PATH_FLAGS`, and `path_type` for argparse).
- Ctrl-C and SIGTERM end a tool with one line and status 130 or 143 after its cleanup; the tools
  that parse their own arguments (argparse: make_synthetic, inspect_records, benchmark_preprocess,
  preprocess's start) get that from `signals_end_with_one_line`.
- A warning (the project's, or a library's at WARNING and above) prints as one line,
  `warning: <what>`, without absl's time, thread and source line unless `--verbosity` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib.util
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
import warnings
import _thread
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging

from cav_mae_jax import errors
from cav_mae_jax import files
from cav_mae_jax.train import peers

# Flags this module defines for a tool (define_model_flags) belong to that tool, as if the tool
# had defined them itself: absl lists them under the tool's own --helpshort.
flags.disclaim_key_flags()

# One line for these (status 2 and 1), a traceback for any other error: `errors`.
USER_ERRORS, RUN_FAILURES = errors.USER_ERRORS, errors.RUN_FAILURES


def config_search_dirs() -> list[str]:
  """Where a relative `configs/...` path is looked for: the working directory, then the
  package's."""
  import configs  # pylint: disable=g-import-not-at-top
  return [os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(configs.__file__)))]


def resolve_config_args(argv: Sequence[str], flag_names: Sequence[str] = ("config",)) -> list[str]:
  """argv with `--config=<file>[:arg]` made absolute when the file is found in a search dir."""
  resolved = list(argv)
  for i, arg in enumerate(resolved):
    for name in flag_names:
      prefix = f"--{name}="
      if arg.startswith(prefix):
        resolved[i] = prefix + _resolve(arg[len(prefix):])
      elif arg == f"--{name}" and i + 1 < len(resolved):
        resolved[i + 1] = _resolve(resolved[i + 1])
  return resolved


def _resolve(value: str) -> str:
  path, sep, arg = value.partition(":")
  if not path or os.path.isabs(path) or os.path.exists(path):
    return value
  for directory in config_search_dirs():
    candidate = os.path.join(directory, path)
    if os.path.exists(candidate):
      return candidate + sep + arg
  return value


# Whether the tool defined the model flags (`define_model_flags`), whose --config has a default.
_model_flags_defined = False
WORKDIR_CONFIG = os.path.join("configs", "workdir.py")


def workdir_config_args(argv: Sequence[str]) -> list[str]:
  """argv plus `--config=configs/workdir.py:<workdir>` when a tool with the model flags is given
  --workdir and no --config (any `--config.<path>` overrides then apply to that config)."""
  argv = list(argv)
  if not _model_flags_defined or any(a == "--config" or a.startswith("--config=") for a in argv):
    return argv
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--workdir="):
      workdir = arg.split("=", 1)[1]
    elif arg == "--workdir" and i + 1 < len(argv):
      workdir = argv[i + 1]
    else:
      continue
    if workdir:
      _check_run_config(workdir)
      return [argv[0], f"--config={WORKDIR_CONFIG}:{workdir}", *argv[1:]]
  return argv


def _check_run_config(workdir: str) -> None:
  """Fails naming --workdir when it holds no recorded config for --config to default to."""
  from cav_mae_jax.train import run_config  # pylint: disable=g-import-not-at-top
  why = run_config.missing_run_config(workdir)
  if why:
    fail(f"--workdir {workdir}: {why}")


@dataclasses.dataclass(frozen=True)
class DistributedFlags:
  """--distributed and the arguments of `jax.distributed.initialize` (every process of a
  multi-host run runs the same command)."""
  distributed: flags.FlagHolder
  coordinator_address: flags.FlagHolder
  num_processes: flags.FlagHolder
  process_id: flags.FlagHolder
  heartbeat_timeout_s: flags.FlagHolder

  def initialize(self) -> None:
    """Joins the other processes when --distributed is given (call before anything else of
    JAX): the arguments from the flags, or detected from the cluster environment (TPU pods,
    SLURM, Open MPI, Kubernetes)."""
    if not self.distributed.value:
      return
    import jax  # pylint: disable=g-import-not-at-top
    timeout = self.heartbeat_timeout_s.value
    try:
      jax.distributed.initialize(coordinator_address=self.coordinator_address.value,
                                 num_processes=self.num_processes.value,
                                 process_id=self.process_id.value,
                                 **({} if timeout is None else
                                    {"heartbeat_timeout_seconds": timeout}))
    except ValueError as e:  # JAX's own line ("coordinator_address should be defined.")
      hint = ("; outside a cluster JAX detects (TPU pod, SLURM, Open MPI, Kubernetes) give "
              "--coordinator_address, --num_processes and --process_id"
              if self.coordinator_address.value is None else "")
      raise ValueError(f"--distributed: {str(e).rstrip('.')}{hint}") from None
    peers.start()


def define_distributed_flags(alone: str) -> DistributedFlags:
  """Defines --distributed, --coordinator_address, --num_processes, --process_id and
  --heartbeat_timeout_s; all but the first need --distributed (`alone`: what each process would
  do without it, for the error)."""
  holder = DistributedFlags(
      distributed=flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize "
                                    "(one process per host of a multi-host run)."),
      coordinator_address=flags.DEFINE_string("coordinator_address", None,
                                              "host:port of process 0."),
      num_processes=flags.DEFINE_integer("num_processes", None, "Number of processes."),
      process_id=flags.DEFINE_integer("process_id", None, "This process's index."),
      heartbeat_timeout_s=flags.DEFINE_integer(
          "heartbeat_timeout_s", None, "Seconds without a process's heartbeat before JAX ends "
          "every process of the run (default: JAX's, 100): a process killed outright (SIGKILL, "
          "the OOM killer) cannot tell its peers that it failed.", lower_bound=1))
  names = ["coordinator_address", "num_processes", "process_id", "heartbeat_timeout_s"]
  flags.register_multi_flags_validator(
      ["distributed", *names],
      lambda values: values["distributed"] or all(values[name] is None for name in names),
      message=f"--coordinator_address, --num_processes, --process_id and --heartbeat_timeout_s "
      f"need --distributed (without it every process would {alone})")
  return holder


@dataclasses.dataclass(frozen=True)
class ModelFlags:
  """The flags that say which model a tool loads: --config, and --workdir [--step] or --params."""
  config: flags.FlagHolder
  workdir: flags.FlagHolder
  step: flags.FlagHolder
  params: flags.FlagHolder


def define_model_flags(workdir_help: str = "Training workdir (its checkpoint --step)."
                       ) -> ModelFlags:
  """Defines the calling tool's --config, --workdir, --step and --params.

  Exactly one of --workdir and --params must be given; the tool passes the values on to
  `eval.features.load` or `train.evaluate.evaluate`, which resolve the checkpoint. --config is
  required, except with --workdir: then it defaults to the config the workdir's run recorded
  (`configs/workdir.py:<workdir>`, see `workdir_config_args`).
  """
  global _model_flags_defined
  _model_flags_defined = True
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  model_flags = ModelFlags(
      config=config_flags.DEFINE_config_file(
          "config", None, "Config file and arg (default with --workdir: the config its run "
          "recorded, configs/workdir.py:<workdir>).", lock_config=True),
      workdir=flags.DEFINE_string("workdir", None, workdir_help),
      step=flags.DEFINE_integer("step", 0, "Checkpoint step of --workdir (0: the latest)."),
      params=flags.DEFINE_string("params", None, "Params checkpoint (tools/convert.py output)."))
  flags.mark_flags_as_required(["config"])
  flags.mark_flags_as_mutual_exclusive(["workdir", "params"], required=True)
  # --step picks one of a workdir's checkpoints; with --params it meant nothing. Refused as the
  # flags are parsed (train.evaluate.load_params refuses it too, but only after TensorFlow's
  # import and the config's checks).
  flags.register_multi_flags_validator(
      ["params", "step"], lambda values: not (values["params"] and values["step"]),
      message="--step picks one of the checkpoints of --workdir; --params names a single one")
  return model_flags


def define_batch_size_flag() -> flags.FlagHolder:
  """Defines the calling tool's --batch_size: the global batch of the clips it reads through a
  model, 0 (the default) for config.data.batch_size.

  A negative value is refused as the flags are parsed, naming the flag
  (`flag --batch_size=-4: must be >= 0 ...`); whether the devices divide it is known only with the
  model's mesh (`eval.features.check_batch_size`, given the name from `batch_size_source`).
  """
  holder = flags.DEFINE_integer("batch_size", 0, "Global batch (0: config.data.batch_size).")
  flags.register_validator(holder.name, lambda size: size >= 0,
                           message="must be >= 0 (0: config.data.batch_size)")
  return holder


def batch_size_source(batch_size: flags.FlagHolder, config: Any) -> tuple[int, str]:
  """(global batch, where it came from): `define_batch_size_flag`'s value and '--batch_size', or
  config.data.batch_size and 'config.data.batch_size' when the flag is 0; an error about the
  batch names the one the user set."""
  if batch_size.value:
    return batch_size.value, f"--{batch_size.name}"
  return config.data.batch_size, "config.data.batch_size"


def flag_given(name: str) -> bool:
  """Whether the command line set flag `name`: it is present, and a boolean one is set away from
  its default (`--nonew_head`, where new_head is off anyway, says nothing)."""
  flag = flags.FLAGS[name]
  return bool(flag.present) and (not isinstance(flag.default, bool) or flag.value != flag.default)


def check_mode_flags(mode: Any, mode_flags: Mapping[Any, Sequence[str]],
                     mode_name: Callable[[Any], str]) -> None:
  """Raises ValueError naming a flag the command line set (`flag_given`) that `mode` does not read.

  `mode_flags`: for each mode of the tool, the names of the flags it reads among those that only
  some modes read; a flag in none of the lists is not checked. Without this such a flag was
  ignored silently (`convert.py to-torch --dtype=bfloat16` kept the params' own dtype).
  `mode_name(mode)` is how the message names a mode: `--dtype applies to export-eval, not to
  to-torch`.
  """
  for name in sorted({n for names in mode_flags.values() for n in names}):
    if flag_given(name) and name not in mode_flags[mode]:
      readers = [mode_name(m) for m, names in mode_flags.items() if name in names]
      listed = (", ".join(readers[:-1]) + " and " if len(readers) > 1 else "") + readers[-1]
      raise ValueError(f"--{name} applies to {listed}, not to {mode_name(mode)}")


def number_type(kind: Callable[[str], Any], minimum: float, *,
                inclusive: bool = True) -> Callable[[str], Any]:
  """An argparse `type`: `kind(text)`, refused below `minimum` (and at it unless inclusive), so
  that argparse answers with the flag's name: `error: argument --top: -1: must be >= 0`."""

  def parse(text: str) -> Any:
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
    if not math.isfinite(value):  # (NaN passes every comparison below)
      raise argparse.ArgumentTypeError(f"{text}: must be a finite number")
    if value < minimum or (value == minimum and not inclusive):
      raise argparse.ArgumentTypeError(f"{text}: must be {'>=' if inclusive else '>'} {minimum:g}")
    return value

  return parse


def path_type(text: str) -> str:
  """An argparse `type` for a file or folder: an empty one is refused (`error: argument --out:
  must not be empty (a path)`), as the absl tools refuse theirs (`_PATH_FLAGS`)."""
  if not text:
    raise argparse.ArgumentTypeError("must not be empty (a path)")
  return text


def error_line(message: object, status: int = 2) -> int:
  """Prints `error: <message>` as one line to stderr; returns the exit status (2: bad input)."""
  print("error: " + " ".join(str(message).split()), file=sys.stderr)
  return status


# TensorFlow's errors of a file system (gs://...: a bucket or object not found, no permission,
# no credentials, the network down) by name: one line as an OSError is (`_storage_error`).
_STORAGE_ERRORS = ("NotFoundError", "PermissionDeniedError", "UnauthenticatedError",
                   "FailedPreconditionError", "UnavailableError", "DeadlineExceededError",
                   "DataLossError")
# Its ResourceExhaustedError is a refused write (a disk full under TensorBoard's event file) or
# host memory exhausted ("OOM when allocating tensor ..."): told apart by the system's words.
_REFUSED_WRITE_WORDS = tuple(os.strerror(code) for code in files.WRITE_REFUSED)


def _storage_error(error: BaseException) -> OSError | MemoryError | None:
  """`error` in its own words where it is one of TensorFlow's file-system errors (an OSError)
  or its host memory exhausted (a MemoryError); they subclass neither and printed a traceback.
  Else None."""
  tf_errors = getattr(sys.modules.get("tensorflow"), "errors", None)
  if tf_errors is None or not isinstance(error, tf_errors.OpError):
    return None
  from cav_mae_jax.data import records  # pylint: disable=g-import-not-at-top  (TF imported)
  text = records.op_error_text(error)
  if isinstance(error, tf_errors.ResourceExhaustedError):
    refused = any(words in (error.message or "") for words in _REFUSED_WRITE_WORDS)
    return OSError(text) if refused else MemoryError(text)
  return OSError(text) if type(error).__name__ in _STORAGE_ERRORS else None


def fail(message: str) -> None:
  """Prints `error: <message>` as one line to stderr and exits 2."""
  sys.exit(error_line(message))


# `--config.<field>=None` overrides taken out of argv before absl parses it (ml_collections
# parses a field's value with the field's type, so None cannot be given), applied after.
_none_overrides: list[tuple[str, str]] = []


def split_none_overrides(argv: Sequence[str], flag_names: Sequence[str]
                         ) -> tuple[list[str], list[tuple[str, str]]]:
  """(argv without them, [(flag name, field path)]) for the `--<flag>.<path>=None` (or
  `--<flag>.<path> None`) arguments of config flags `flag_names`; a later override of the same
  field wins, as for any flag."""
  rest: list[str] = []
  overrides: dict[tuple[str, str], bool] = {}  # (flag, path) -> whether its last value is None
  i = 0
  while i < len(argv):
    arg, key, is_none = argv[i], None, False
    for name in flag_names:
      if arg.startswith(f"--{name}."):
        path, sep, value = arg[len(name) + 3:].partition("=")
        if not sep and i + 1 < len(argv):
          value = argv[i + 1]
        key, is_none = (name, path), value == "None"
    if key is not None:
      overrides.pop(key, None)
      overrides[key] = is_none
    if is_none:
      i += 1 if "=" in arg else 2
      continue
    rest.append(arg)
    i += 1
  return rest, [key for key, is_none in overrides.items() if is_none]


def apply_none_overrides(configs: dict[str, Any], overrides: Sequence[tuple[str, str]]) -> None:
  """Sets each (flag name, field path) of `overrides` to None in `configs[flag name]`, or, for
  an entry of `evals`, removes that evaluator; raises ValueError naming the flag for a field
  the config lacks or another group of fields."""
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  for name, path in overrides:
    parent, node, parents = None, configs[name], [name]
    for part in path.split("."):
      if not isinstance(node, config_dict.ConfigDict) or part not in node:
        raise ValueError(missing_field_message(name, path, node, parents, part))
      parent, node, parents = node, node[part], [*parents, part]
    if isinstance(node, config_dict.ConfigDict) and parents[-2:-1] == ["evals"]:
      with parent.unlocked():
        del parent[parents[-1]]  # an evaluator the run does without
    elif isinstance(node, config_dict.ConfigDict):
      raise ValueError(f"--{name}.{path}=None: {'.'.join(parents)} is a group of fields, not "
                       "a value")
    else:
      parent[parents[-1]] = None


def missing_field_message(name: str, path: str, node: Any, parents: Sequence[str],
                          part: str) -> str:
  """`--config.a.b: config.a has no field 'b' (did you mean ...? its fields: ...)`."""
  if not hasattr(node, "keys"):
    return f"--{name}.{path}: {'.'.join(parents)} is a value, it has no field {part!r}"
  fields = sorted(node.keys())
  close = difflib.get_close_matches(part, fields, n=1)
  hint = f"did you mean {close[0]}? " if close else ""
  listed = ", ".join(fields[:16]) + (", ..." if len(fields) > 16 else "")
  return (f"--{name}.{path}: {'.'.join(parents)} has no field {part!r} "
          f"({hint}its fields: {listed})")


class Terminated(KeyboardInterrupt):
  """SIGTERM (a scheduler's preemption or `kill`), raised like Ctrl-C's KeyboardInterrupt so that
  the same cleanup runs (`finally` blocks, temporary outputs removed, worker processes ended)."""


# A signal with a handler that does nothing: sent to the main thread, it ends a blocking wait
# (the call fails with EINTR, Python runs the pending handlers, then retries it). SIGURG's
# default action is to ignore it, and nothing here uses it for sockets' urgent data.
_WAKE_SIGNAL = signal.SIGURG
# After a swallowed signal's flag is set again: when to send _WAKE_SIGNAL (seconds, each after
# the one before).
_WAKE_DELAYS = (0.02, 0.1, 0.5)


def _raise_terminated(signum, frame) -> None:  # pylint: disable=unused-argument
  raise Terminated()


def stop_on_sigterm() -> None:
  """Makes SIGTERM raise `Terminated` in the main thread (the default ends the process at once,
  without cleanup). The trainer's preemption handler replaces it while the train loop runs."""
  signal.signal(signal.SIGTERM, _raise_terminated)


def redeliver_swallowed_interrupts() -> None:
  """Keeps a Ctrl-C or SIGTERM that lands in a finalizer, gc callback or weakref callback.

  Python raises the signal's exception in whatever Python code runs when it arrives; there an
  exception cannot propagate: Python prints "Exception ignored in ...: KeyboardInterrupt" and
  drops it, so the tool went on as if the signal had never come (seen with JAX's gc callback,
  which TensorFlow's import brings into every tool). This hook prints nothing for those and has
  the signal delivered again, once, to the main thread, where it raises at the next point that
  can raise (again here, should that be another callback).

  A helper thread delivers it: the main thread checks for signals right after every call, so a
  signal set from the hook itself would raise inside the hook. It sets the signal's flag as the
  signal would (`_thread.interrupt_main`: the handler runs once), then sends `_WAKE_SIGNAL` a
  few times (`_WAKE_DELAYS`), which ends a wait the main thread may have begun just before the
  flag was set; a real signal ends it too. (A kernel SIGINT from the helper would do both, but
  it arrived just as the main thread released the interpreter to wait, so the wait went on to
  its end.) Other unraisable errors go to the previous hook.
  """
  if getattr(sys.unraisablehook, "redelivers_interrupts", False):
    return
  can_wake = signal.getsignal(_WAKE_SIGNAL) == signal.SIG_DFL
  if can_wake:
    signal.signal(_WAKE_SIGNAL, lambda signum, frame: None)
  pending: queue.SimpleQueue[int] = queue.SimpleQueue()
  main_thread = threading.main_thread().ident

  def deliver() -> None:
    while True:
      _thread.interrupt_main(pending.get())
      for delay in _WAKE_DELAYS if can_wake else ():
        time.sleep(delay)
        try:
          signal.pthread_kill(main_thread, _WAKE_SIGNAL)
        except OSError:  # the main thread has ended
          return

  threading.Thread(target=deliver, name="redeliver-interrupts", daemon=True).start()
  previous = sys.unraisablehook

  def hook(unraisable: Any) -> None:
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
      previous(unraisable)
      return
    pending.put(signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT)

  hook.redelivers_interrupts = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook


def handle_stop_signals() -> None:
  """Makes SIGTERM raise `Terminated` and keeps a Ctrl-C or SIGTERM that lands in a finalizer or
  gc callback (`stop_on_sigterm`, `redeliver_swallowed_interrupts`): what `run` installs for its
  tools, and `signals_end_with_one_line` for a tool that parses its own arguments."""
  redeliver_swallowed_interrupts()
  stop_on_sigterm()


@contextlib.contextmanager
def signals_end_with_one_line(note: str = "") -> Iterator[None]:
  """`run`'s ending on a signal, for a tool that parses its own arguments (argparse).

  With `handle_stop_signals` installed, a Ctrl-C or SIGTERM in the block ends the process, after
  the cleanup of the block's `finally` clauses and context managers, with one line
  (`interrupted_line`, then `note`: what was kept) and status 130 or 143, as a normal exit ends
  (`exit_after_interrupt`); without it the tools printed Python's traceback. SIGTERM's handler
  is put back on leaving the block: after it (a tool's imports between two blocks), SIGTERM ends
  the process as before, not with an uncaught `Terminated`.
  """
  previous = signal.getsignal(signal.SIGTERM)
  handle_stop_signals()
  try:
    yield
  except KeyboardInterrupt as e:
    exit_after_interrupt(interrupted_line(e, note))
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def interrupted_line(error: KeyboardInterrupt, note: str = "") -> int:
  """Prints `error: interrupted by SIGINT (Ctrl-C)|stopped by SIGTERM[; note]` as one line to
  stderr; returns the shell's status for that signal (130 or 143)."""
  terminated = isinstance(error, Terminated)
  what = "stopped by SIGTERM" if terminated else "interrupted by SIGINT (Ctrl-C)"
  print(f"error: {what}" + (f"; {note}" if note else ""), file=sys.stderr, flush=True)
  return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


# The tools' flags that name a file or folder: given empty, `tools/demo.py --workdir=` ran (and
# cleared its earlier runs) in the working directory, `tools/train.py --workdir=` failed late.
_PATH_FLAGS = ("workdir", "out", "params", "records", "videos", "subset", "src", "quarantine")


def _parse_flags(argv: list[str]) -> list[str]:
  given = argv = resolve_config_args(argv)
  argv, _none_overrides[:] = split_none_overrides(argv, _config_flag_names())
  config_files = _config_file_args(argv)
  _check_config_file_given(argv, config_files)
  for flag, value in config_files:  # ml_collections' own messages name its internal module
    path = value.partition(":")[0]
    if path and not os.path.isfile(path):
      fail(f"{flag}={value}: " + ("a directory, not a config file" if os.path.isdir(path)
                                  else "no such file"))
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    fail(_without_traceback(str(e)))
  except Exception as e:  # pylint: disable=broad-except  (a config file's get_config raised)
    if isinstance(e, AttributeError) and "get_config" in str(e) and config_files:
      fail(f"{'='.join(config_files[0])}: the file defines no get_config()")
    # ml_collections answers an override of a field the config lacks with AttributeError("'x'")
    # (a `=None` one too: it reads sys.argv, which still holds those).
    where = f"{'='.join(config_files[0])}: " if config_files else ""
    fail(_unknown_config_field(given) or f"{where}{type(e).__name__}: {e}")
  for name in _PATH_FLAGS:  # an empty one was the working directory, or "not given"
    if name in flags.FLAGS and flags.FLAGS[name].present and flags.FLAGS[name].value == "":
      fail(f"flag --{name}=: must not be empty (a path)")
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  for flag, value in config_files:
    config = flags.FLAGS[flag.lstrip("-")].value
    if not isinstance(config, config_dict.ConfigDict):
      fail(f"{flag}={value}: get_config() returned an object of type "
           f"{type(config).__name__}, not a ml_collections.ConfigDict")
    _check_schedule_overrides(flag, config, given)
  return rest


def _check_schedule_overrides(flag: str, config: Any, argv: Sequence[str]) -> None:
  """Fails on an override of a `schedule` field that the config's schedule kind does not read
  (a schedule holds every kind's fields, configs/common.py): it changed nothing, silently."""
  schedule = config.get("schedule")  # a ConfigDict: checked by the caller
  overrides = [arg[len(flag) + 1:].partition("=")[0] for arg in argv[1:]
               if arg.startswith(f"{flag}.schedule.")]
  if schedule is None or not overrides or "kind" not in schedule:
    return
  from cav_mae_jax.train import optim  # pylint: disable=g-import-not-at-top
  read = optim.SCHEDULE_FIELDS.get(schedule.kind, ())
  for path in overrides:
    field = path.split(".", 1)[1]
    kinds = [kind for kind, fields in optim.SCHEDULE_FIELDS.items() if field in fields]
    if kinds and field not in read:
      fail(f"{flag}.{path}: read by schedule kind {kinds[0]!r} only, and this config's is "
           f"{schedule.kind!r} (--{flag.lstrip('-')}.schedule.kind={kinds[0]} to use it)")


def _config_file_args(argv: Sequence[str]) -> list[tuple[str, str]]:
  """('--config', 'FILE[:ARG]') of each config-file flag given in argv."""
  found = []
  for name in _config_flag_names():
    for i, arg in enumerate(argv):
      if arg.startswith(f"--{name}="):
        found.append((f"--{name}", arg.split("=", 1)[1]))
      elif arg == f"--{name}" and i + 1 < len(argv):
        found.append((f"--{name}", argv[i + 1]))
  return found


def _without_traceback(message: str) -> str:
  """A flag error with the traceback that ml_collections puts in it (a config file's
  get_config raised) replaced by its last line, the exception itself."""
  head, marker, trace = message.partition("Traceback (most recent call last):")
  if not marker:
    return message
  lines = [line.strip() for line in trace.splitlines() if line.strip()]
  return f"{head.rstrip()} {lines[-1]}" if lines else head.rstrip()


def _check_config_file_given(argv: Sequence[str], config_files: Sequence[tuple[str, str]]) -> None:
  """Fails, saying what is missing, when a config flag is needed and absent: absl said "flag
  --config=None: Flag --config must have a value other than None." (with --params) or "Unknown
  command line flag 'config.data.eval_dir'" (an override without its config file)."""
  given = {flag for flag, _ in config_files}
  if any(arg.startswith(("--flagfile", "-flagfile")) for arg in argv[1:]):
    return  # the config file may be in it: absl reads it later
  for name in _config_flag_names():
    if f"--{name}" in given:
      continue
    override = next((arg.split("=", 1)[0] for arg in argv[1:]
                     if arg.startswith(f"--{name}.")), None)
    if override is not None:
      fail(f"{override}: overrides a field of --{name}, which is not given (the config file, "
           f"e.g. --{name}=configs/pretrain.py:base)")
    if _model_flags_defined and name == "config" and any(
        arg == "--params" or arg.startswith("--params=") for arg in argv[1:]):
      fail("--params needs --config, the config file of the model the params are (e.g. "
           "--config=configs/finetune.py:as2m); only --workdir reads the config its run recorded")


def _config_flag_names() -> list[str]:
  # pylint: disable-next=g-import-not-at-top  (the package does not re-export it)
  from ml_collections.config_flags.config_flags import is_config_flag
  return [name for name in flags.FLAGS if is_config_flag(flags.FLAGS[name])]


def _unknown_config_field(argv: Sequence[str]) -> str | None:
  """`--config.a.b: ...` for the first override in argv naming a field the config lacks."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  for name in _config_flag_names():
    file_arg = None
    for i, arg in enumerate(argv):
      if arg.startswith(f"--{name}="):
        file_arg = arg
      elif arg == f"--{name}" and i + 1 < len(argv):
        file_arg = f"--{name}={argv[i + 1]}"
    if file_arg is None:
      continue
    loader = flags.FlagValues()  # The config file alone, without the overrides.
    config_flags.DEFINE_config_file(name, None, "", flag_values=loader,
                                    sys_argv=["prog", file_arg])
    try:
      loader(["prog", file_arg])
      config = loader[name].value
    except Exception:  # pylint: disable=broad-except  (reported as it is by the caller)
      return None
    for arg in argv:
      if not arg.startswith(f"--{name}."):
        continue
      path = arg[len(name) + 3:].partition("=")[0]
      node, parents = config, [name]
      for part in path.split("."):
        if not hasattr(node, "keys"):
          break
        if part not in node:
          return missing_field_message(name, path, node, parents, part)
        node, parents = node[part], [*parents, part]
  return None


class _LevelFormatter(logging.Formatter):
  """`warning: <message>` (the level's name, then the message; a traceback's lines after it);
  `warning: process 1 of 2: <message>` in a multi-process run, whose processes' lines often
  reach one console or log (a scheduler's)."""

  def format(self, record: logging.LogRecord) -> str:
    line = f"{record.levelname.lower()}: {_process_tag()}{record.getMessage()}"
    if record.exc_info:
      line += "\n" + self.formatException(record.exc_info)
    return line


def _process_tag() -> str:
  """'process i of n: ' once jax.distributed joined n > 1 processes, else '' (JAX is not
  imported for it, nor its backends started before `initialize`)."""
  jax = sys.modules.get("jax")
  if jax is None or not jax.distributed.is_initialized() or jax.process_count() == 1:
    return ""
  return f"process {jax.process_index()} of {jax.process_count()}: "


def _verbose() -> bool:
  return flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].value >= 1


def _is_closed_loop_leftover(error: BaseException | None) -> bool:
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


_ORBAX_SOURCE = f"{os.sep}orbax{os.sep}"
_COMPILATION_CACHE_WARNING = "Error (reading|writing) persistent compilation cache entry"


def _not_an_orbax_error(record: logging.LogRecord) -> bool:
  """False for orbax's error records with a traceback: its background threads' errors of a
  save, each raised to its caller later (those it logs and passes over have none)."""
  return (record.levelno < logging.ERROR or not record.exc_info
          or _ORBAX_SOURCE not in record.pathname)


def quiet_async_leftovers() -> None:
  """Keeps the leftovers of a failed checkpoint read or save off stderr.

  When orbax's restore fails (a damaged checkpoint), its event loop closes while TensorStore's
  other reads are still in flight; each then reports "Event loop is closed" as an unraisable
  exception, and asyncio logs every unretrieved task's error: dozens of tracebacks after the
  tool's one error line, at random. They say nothing the error line does not, so `cli.run`
  drops exactly those (that unraisable RuntimeError; asyncio's log below CRITICAL) unless
  `--verbosity` asks for library logs; and orbax's error records (a failed save: a traceback
  per thread of it, before the error is raised).
  """
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  # A failed asynchronous save: orbax logs the error of each of its threads with a traceback,
  # then raises it where the trainer next looks (one line, `checkpoint.writing`).
  absl_logging.get_absl_handler().addFilter(_not_an_orbax_error)
  previous = sys.unraisablehook

  def hook(unraisable: Any) -> None:
    if not _is_closed_loop_leftover(unraisable.exc_value):
      previous(unraisable)

  sys.unraisablehook = hook


# What TensorFlow's import loads of Keras "so that any function/method that needs to happen at
# load time will trigger" (its __init__; the second where TF_USE_LEGACY_KERAS is set).
_KERAS_PRELOADS = ("keras.src.optimizers", "tf_keras.src.optimizers")


@contextlib.contextmanager
def keras_preload_skipped() -> Iterator[None]:
  """TensorFlow's import loads Keras's optimizers, and with them all of Keras and (where
  scikit-learn is installed: librosa needs it) scikit-learn and SciPy's statistics: 2.3 of its
  7 seconds on 2 cores, for nothing the tools use. TensorFlow passes over a module it cannot
  import; None in sys.modules says so, for the import alone: `tf.keras` still loads Keras
  where something asks for it."""
  skipped = [name for name in _KERAS_PRELOADS if name not in sys.modules]
  for name in skipped:
    sys.modules[name] = None  # type: ignore[assignment]
  try:
    yield
  finally:
    for name in skipped:
      if name in sys.modules and sys.modules[name] is None:
        del sys.modules[name]


@contextlib.contextmanager
def _stderr_on_devnull() -> Iterator[None]:
  """File descriptor 2 on /dev/null (what C++ code writes there too)."""
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def import_tensorflow(quiet: bool = True) -> None:
  """Imports TensorFlow (if installed) for the host's input alone: its GPUs are hidden from it
  (`tf.config.set_visible_devices([], "GPU")`, as big_vision's trainers do), so that a CUDA build
  of TensorFlow does not claim the memory of the devices JAX computes on; Keras is not loaded
  with it (`keras_preload_skipped`). `quiet`: file descriptor 2 points at /dev/null during the
  import (TensorFlow's C++ start-up lines)."""
  if importlib.util.find_spec("tensorflow") is None:
    return
  if "tensorflow" not in sys.modules:
    with keras_preload_skipped(), _stderr_on_devnull() if quiet else contextlib.nullcontext():
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel
  import tensorflow as tf  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError as e:  # its runtime had started (the tool's caller used it): too late
    logging.getLogger(__name__).warning(
        "TensorFlow keeps its GPUs (%s): it may hold memory JAX's devices need", e)


def _raise_config_file_errors() -> None:
  """Raises a --config file's load error (config_flags keeps it until the config is first read)."""
  for name in _config_flag_names():
    getattr(flags.FLAGS[name].value, "lock", None)  # a config that failed to load raises OSError


def check_input_paths(paths: Sequence[tuple[str, str | None]]) -> None:
  """Raises FileNotFoundError naming the first local input path in `paths` that does not exist.

  `paths`: (what, path) in the order the tool reads them; an empty path is skipped, and so is
  one with a scheme (gs://, ...), which the tool reads through TensorFlow and checks itself.
  """
  for what, path in paths:
    if path and "://" not in path and not os.path.exists(path):
      raise FileNotFoundError(f"{what}: {path}: no such file or directory")


def records_input_path(records: str, config) -> tuple[str, str | None]:
  """The records directory a model tool reads (`records`, else config.data.eval_dir: the rule of
  `eval.features.records_directory`), for check_input_paths."""
  return ("--records", records) if records else ("config.data.eval_dir", config.data.eval_dir)


def model_input_paths(model_flags: ModelFlags) -> list[tuple[str, str | None]]:
  """The checkpoint paths of `define_model_flags` (--workdir or --params), for check_input_paths."""
  return [("--workdir", model_flags.workdir.value), ("--params", model_flags.params.value)]


def config_input_paths() -> list[tuple[str, str | None]]:
  """(flag, config file) of each config-file flag the tool was given: inputs too, which an
  output must not replace (`io.check_output_path`'s `inputs`)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  return [(f"--{name}", config_flags.get_config_filename(flags.FLAGS[name]))
          for name in _config_flag_names() if flags.FLAGS[name].value is not None]


def run(main: Callable[[list[str]], None], *, uses_tensorflow: bool = True,
        input_paths: Callable[[], Sequence[tuple[str, str | None]]] | None = None,
        check_args: Callable[[list[str]], Any] | None = None,
        check_outputs: Callable[[], Any] | None = None,
        check_config: Callable[[], Any] | None = None,
        interrupt_note: str = "") -> None:
  """app.run(main) with the conventions of the module docstring.

  `uses_tensorflow=False` for tools that must not import TensorFlow (the train-step benchmark
  runs where it is not installed); the others import it before `main`, its GPUs hidden
  (`import_tensorflow`). `input_paths` returns the tool's input paths from its parsed
  flags (see `check_input_paths`): a mistyped local path is then answered before TensorFlow's
  import, in about a second rather than the ten or more that importing and loading take.
  `check_args(argv)` checks what absl's validators cannot see (a tool's positional arguments,
  and the flags that apply to the mode they name) at the same time, before the paths; it raises
  ValueError or app.UsageError. `check_outputs()` refuses the tool's outputs (one that exists, or
  is or holds an input) after the input paths, also before TensorFlow's import; `check_config()`
  (last) the checks of the tool's config that need JAX but not the data.
  Ctrl-C (SIGINT) and SIGTERM end the tool with one line (`interrupted_line`, then
  `interrupt_note`: what was kept) and the shell's status for the signal (130, 143), after the
  tool's cleanup has run; `--verbosity=1` shows the traceback. A signal that lands in a
  finalizer or gc callback is not lost (`redeliver_swallowed_interrupts`).
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  # In place: config_flags keeps a reference.
  sys.argv[:] = resolve_config_args(workdir_config_args(sys.argv))

  def wrapped(argv: list[str]) -> None:
    if not _verbose():
      absl_logging.set_verbosity(absl_logging.WARNING)
      # A warning reads as the tools' other lines do, `warning: <what>`, not as a log record
      # (time, thread, source line); --verbosity=1 keeps absl's format.
      absl_logging.get_absl_handler().setFormatter(_LevelFormatter())
      logging.getLogger().setLevel(logging.WARNING)
      quiet_async_leftovers()
      # JAX's persistent compilation cache, where the user set one (JAX_COMPILATION_CACHE_DIR):
      # an entry it cannot write (a full disk) or read (one that a full disk left truncated) is
      # compiled anew, and its warning would come before the tool's own line.
      warnings.filterwarnings("ignore", message=_COMPILATION_CACHE_WARNING, category=UserWarning)
    handle_stop_signals()
    try:
      try:
        # After the flags and config files: a bad one is answered without TensorFlow's import.
        _raise_config_file_errors()
        apply_none_overrides({name: flags.FLAGS[name].value for name, _ in _none_overrides},
                             _none_overrides)
        if check_args is not None:
          check_args(argv)
        if input_paths is not None:
          check_input_paths(input_paths())
        if check_outputs is not None:
          check_outputs()
        if check_config is not None:
          check_config()
        if uses_tensorflow:  # quiet unless TF's INFO or WARNING lines are asked for (0, 1)
          import_tensorflow(quiet=os.environ["TF_CPP_MIN_LOG_LEVEL"] in ("2", "3"))
        main(argv)
      except Exception as e:  # a multi-process run's peers stop too (the status as below)
        error = _storage_error(e) or errors.from_jax_runtime(e) or e
        one_line = isinstance(error, app.UsageError) or (isinstance(error, USER_ERRORS) and
                                                         not _verbose())  # else a traceback
        peers.report(error, status=2 if one_line else 1)
        if error is e:
          raise
        raise error from e
    except app.UsageError as e:
      fail(str(e))
    except USER_ERRORS as e:
      if _verbose():
        raise
      fail(str(e))
    except RUN_FAILURES as e:
      if _verbose():
        raise
      sys.exit(error_line(str(e), status=1))
    except KeyboardInterrupt as e:
      if _verbose():
        raise
      exit_after_interrupt(interrupted_line(e, interrupt_note))

  app.run(wrapped, flags_parser=_parse_flags)


def exit_after_interrupt(status: int) -> None:
  """Ends the process after Ctrl-C or SIGTERM as a normal exit would, without the interpreter's
  native teardown: the tool's own cleanup has run (`finally` blocks), then what Python runs at
  exit (other threads are waited for, `atexit` functions), then the process ends with `status`.

  An interrupt that lands while XLA compiles left compiler threads running into the C++ static
  destructors of the interpreter's exit: "Fatal Python error: Segmentation fault" after the
  error line, and status 139 instead of 130 or 143 (2 of 6 tries of tools/train.py)."""
  # What the interpreter's exit runs first: threading's own exit calls (concurrent.futures
  # wakes its idle workers there, which a plain join of every thread would wait for forever),
  # then a join of the other non-daemon threads.
  shutdown = getattr(threading, "_shutdown", None)  # CPython's own (private)
  if shutdown is None:  # another interpreter: what it runs at exit is unknown; the normal path
    sys.exit(status)
  # The error line is out: a second Ctrl-C or SIGTERM (pressed twice, a scheduler repeating
  # it) must not raise out of the wait below (a traceback and status 1).
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, signal.SIG_IGN)
  try:
    shutdown()
    import atexit  # pylint: disable=g-import-not-at-top
    atexit._run_exitfuncs()  # pylint: disable=protected-access
  finally:
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except (OSError, ValueError):  # closed, or a pipe whose reader left
        pass
    os._exit(status)  # pylint: disable=protected-access
