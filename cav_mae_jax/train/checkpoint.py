"""Orbax checkpoints of the train state and the input iterator, with preemption handling.

A checkpoint holds three items: `state` (params, optimizer state, step, RNG; restored sharded
into the shardings of an abstract state), `input` (the input iterators' states as JSON, so a
resumed run sees the same remaining batch order) and `digest` (below). Saves are asynchronous
and atomic: orbax writes to a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoint as the latest restorable one.

Every process has its own input iterator (their positions differed under the earlier
balanced sampling, whose epochs had random lengths; today they are batch counts). orbax
writes a JSON item from the primary process only, so the `input` item holds the list of every
process's state, gathered at save time
(`{"process_input_states": [state of process 0, state of process 1, ...]}`), and each process
restores its own entry. Checkpoints written before held process 0's state alone; they still
restore (every process gets that state, as then).

A checkpoint that is there but cannot be read (a damaged or missing file inside it) raises
`CheckpointReadError`, an OSError naming the checkpoint, which the tools print as one line.
orbax keeps no checksums of the array data, so the `digest` item holds a checksum of every
array of the state (`tree_digest`: a position-weighted sum of its bits, computed on the device
over any sharding); restoring recomputes it and refuses arrays that differ from what was saved
(a flipped bit in a data file) instead of training or evaluating with them. Checkpoints written
before the item existed restore unchecked.

Epoch ends' params (`config.checkpoint.every_epoch`, for weight averaging) are saved apart, in
a workdir's `epoch_params` folder, all kept; the full states in `checkpoints` are the newest
`keep` resume points (`Checkpointer`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from absl import logging as absl_logging
from jax.experimental import multihost_utils

CHECKPOINT_DIR = "checkpoints"  # inside a training workdir
EPOCH_PARAMS_DIR = "epoch_params"  # beside it: the params of every epoch end
INPUT_STATES_KEY = "process_input_states"  # the `input` item: one input state per process


DIGEST_ITEM = "digest"  # {"state/state/params/blocks_a_0/attn/qkv/kernel": checksum, ...}


class CheckpointReadError(OSError):
  """A checkpoint that exists but cannot be read: damaged or missing files inside it."""


def _checksum(x: Any) -> jax.Array:
  """uint32 sum of an array's bits, each word weighted by an odd function of its position:
  any single flipped bit changes it, and it is the same for any sharding (integer sums wrap
  exactly, in any order)."""
  x = jnp.asarray(x)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}.get(x.dtype.itemsize)
  if bits is None:
    raise ValueError(f"no checksum for {x.dtype} arrays")
  words = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32).reshape(-1)
  weights = jnp.arange(words.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) | 1
  return jnp.sum(words * weights, dtype=jnp.uint32)


# One jit for every call, so that a run's saves compile it once (a new lambda each call re-traced
# and re-compiled it at every save: 1.2-1.7 s for the tiny model's 444 arrays).
_checksums = jax.jit(lambda tree: jax.tree.map(_checksum, tree))


def _key_name(key: Any) -> str:
  for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def tree_digest(tree: Any) -> dict[str, int]:
  """{"state/params/a/kernel": checksum, ...} of every array of a pytree (jax arrays, sharded
  over any number of processes or not, or NumPy); every process must call it (one jit)."""
  sums = _checksums(tree)
  return {"/".join(_key_name(k) for k in path): int(np.asarray(
              value.addressable_data(0) if isinstance(value, jax.Array) else value))
          for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]}


def verify_digest(path: str, tree: Any, saved: dict[str, int] | None) -> None:
  """Raises CheckpointReadError when arrays of `tree` differ from the `saved` digest of the tree
  they were restored from (arrays not in `tree`, e.g. after a partial restore, are not checked;
  None: a checkpoint without a digest, unchecked)."""
  if saved is None:
    return
  digest = tree_digest(tree)
  differ = sorted(name for name, value in digest.items() if saved.get(name, value) != value)
  if differ:
    raise CheckpointReadError(
        f"{path}: {len(differ)} array(s) differ from what was saved (by their checksums: "
        f"{', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''}); a data file inside the "
        "checkpoint is damaged")


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
  """Reports a failure of orbax (or TensorStore below it) to read `path` as CheckpointReadError.

  Their errors name an internal file or none (a damaged metadata file surfaces as an
  AttributeError), so the message names the checkpoint and keeps the cause's first line.
  """
  try:
    yield
  except (CheckpointReadError, FileNotFoundError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    lines = str(e).strip().splitlines()
    raise CheckpointReadError(
        f"{path}: the checkpoint cannot be read; a file inside it may be damaged or missing "
        f"({type(e).__name__}: {lines[0][:300] if lines else 'no message'})") from e


class CheckpointWriteError(OSError):
  """A checkpoint that cannot be written (the disk full, no permission, a quota reached)."""


_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")  # how TensorStore names errno


@contextlib.contextmanager
def writing(directory: str) -> Iterator[None]:
  """Reports a failure of orbax (or TensorStore below it) to write a checkpoint in `directory`
  as CheckpointWriteError, where the file system refused it (TensorStore's errors are
  ValueErrors that end with the errno); any other error as it is.

  An asynchronous save's error is raised where the run next waits for it (the next save, or
  the run's end): the message names the folder, the file system's reason, then the cause's
  first line."""
  try:
    yield
  except CheckpointWriteError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    code = e.errno if isinstance(e, OSError) else None
    found = _OS_ERROR_CODE.search(str(e))
    if found:
      code = int(found.group(1))
    if not code:
      raise
    lines = str(e).strip().splitlines()
    error = CheckpointWriteError(
        f"{directory}: a checkpoint cannot be written: {os.strerror(code)} "
        f"({type(e).__name__}: {lines[0][:300] if lines else 'no message'})")
    error.errno = code
    raise error from e


def gather_input_states(input_state: dict[str, Any]) -> list[dict[str, Any]]:
  """Every process's input state, in process order (collective: every process must call it)."""
  if jax.process_count() == 1:
    return [input_state]
  encoded = np.frombuffer(json.dumps(input_state).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(encoded.size))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:encoded.size] = encoded
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(row[:length].tobytes()) for row, length in zip(gathered, lengths)]


def own_input_state(saved: dict[str, Any]) -> dict[str, Any]:
  """This process's entry of a saved `input` item (the whole item if it predates the list).

  When the process count changed, every process gets process 0's state, and the input iterator
  decides whether it can continue from it (the tf.data pipeline refuses).
  """
  if INPUT_STATES_KEY not in saved:
    return saved
  states = saved[INPUT_STATES_KEY]
  return states[jax.process_index()] if len(states) == jax.process_count() else states[0]


class Checkpointer:
  """Saves every `every_steps` steps and at epoch ends (when asked); keeps the newest K.

  With epoch ends (`steps_per_epoch`), each epoch end's params are also saved apart, in
  `epoch_params` beside `directory` (`workdir_epoch_params`), all kept (weight averaging):
  a third of a full state (the base fine-tuning model's 0.66 GB of 1.98 GB: AS-20K's 15 epochs
  keep 10 GB, and the newest three full states 6 GB, where its 15 full states kept 30 GB), as
  the original keeps them. `settle_epoch_params` makes the epoch folder match the resume point
  (a workdir whose epoch ends are full states, from before, gets their params there too)."""

  def __init__(self, directory: str, checkpoint_config: ml_collections.ConfigDict,
               steps_per_epoch: int = 0):
    self.every_steps = int(checkpoint_config.every_steps)
    self.epoch_steps = steps_per_epoch if checkpoint_config.every_epoch else 0
    self.directory = _orbax_directory(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=checkpoint_config.keep,
        enable_async_checkpointing=checkpoint_config.async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.epoch_manager = None
    self.workdir = os.path.dirname(self.directory.rstrip("/"))  # named by a failed save
    epoch_directory = workdir_epoch_params(self.workdir)
    # Also without epoch ends where the folder is there: its steps after the resume point go.
    if self.epoch_steps or epath.Path(epoch_directory).exists():
      epoch_options = ocp.CheckpointManagerOptions(
          enable_async_checkpointing=checkpoint_config.async_save,
          cleanup_tmp_directories=True, create=True,
          # Both managers save an epoch end's step: their processes' barriers must not meet.
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              barrier_sync_key_prefix=EPOCH_PARAMS_DIR))
      self.epoch_manager = ocp.CheckpointManager(epoch_directory, options=epoch_options)

  def settle_epoch_params(self) -> tuple[list[int], list[int]]:
    """Makes the epoch folder match the resume point (the latest full state); returns (the
    epoch-end steps whose params were taken from their full states, the steps removed). Called
    once the run goes on in this workdir with these epochs (after the resume checks), before it
    saves.

    Epoch ends after the resume point are trained again, and saved again: their params are
    removed (their full states were not complete when the run stopped). An epoch end whose full
    state is complete and whose params are not (a run stopped between the two saves; or a
    workdir from before epoch params were kept apart, whose epoch ends are all full states: the
    newest K alone would delete them at the next save) gets them from the full state."""
    if self.epoch_manager is None:
      return [], []
    resume_step = self.manager.latest_step() or 0
    removed, kept = [], set()
    for step in sorted(self.epoch_manager.all_steps()):
      if step > resume_step:
        self.epoch_manager.delete(step)
        removed.append(step)
      else:
        kept.add(step)
    taken = [step for step in sorted(self.manager.all_steps())
             if self.epoch_steps and step % self.epoch_steps == 0 and step not in kept]
    for step in taken:
      path = os.path.join(self.directory, str(step))
      try:
        params = read_state_params(path)
      except CheckpointReadError as e:
        if step == resume_step:
          raise
        raise CheckpointReadError(
            f"{e} (read to keep epoch-end step {step}'s params in {EPOCH_PARAMS_DIR}/; remove "
            f"{path} to go on without them)") from e
      with writing(self.workdir):
        self._save_epoch_params(step, params)
    with writing(self.workdir):
      self.epoch_manager.wait_until_finished()
    return taken, removed

  def latest_step(self) -> int | None:
    """Step of the newest complete checkpoint, or None."""
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `step` is a periodic or epoch-end save step."""
    return ((self.every_steps > 0 and step % self.every_steps == 0) or
            (self.epoch_steps > 0 and step % self.epoch_steps == 0))

  def save(self, step: int, state: Any, input_state: dict[str, Any],
           params: Any = None) -> None:
    """Starts an (asynchronous) save of `state` and of every process's input state at `step`;
    at an epoch end, also of `params` (the state's) in the epoch folder."""
    epoch_end = bool(self.epoch_steps) and step % self.epoch_steps == 0
    if epoch_end and params is None:
      raise ValueError(f"step {step} ends an epoch: its params are saved apart; pass them")
    if self.epoch_manager is not None:
      # An epoch end's params are complete before a later full state is saved, which may
      # delete that epoch end's full state (orbax rotates in the next save of its folder).
      with writing(self.workdir):  # an earlier save's error is raised here
        self.epoch_manager.wait_until_finished()
    input_states = {INPUT_STATES_KEY: gather_input_states(input_state)}
    digest = tree_digest({"state": state})
    with writing(self.workdir):
      self.manager.save(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  input=ocp.args.JsonSave(input_states),
                                  **{DIGEST_ITEM: ocp.args.JsonSave(digest)}),
          force=True)
      if epoch_end:
        self._save_epoch_params(step, params)

  def _save_epoch_params(self, step: int, params: Any) -> None:
    """Laid out as a full state's `state` item's params: `read_state_params` reads both."""
    tree = {"state": {"params": params}}
    digest = tree_digest({"state": tree})
    self.epoch_manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                      **{DIGEST_ITEM: ocp.args.JsonSave(digest)}),
        force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores (state, this process's input state) at `step`; arrays take `abstract_state`'s
    shardings."""
    path = os.path.join(self.directory, str(step))
    try:
      with reading(path):
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                    input=ocp.args.JsonRestore()))
        saved = read_digest(path)
      verify_digest(path, {"state": restored["state"]}, saved)
    except CheckpointReadError as e:  # not passed over for an earlier one: said what to do
      earlier = [s for s in self.manager.all_steps() if s < step]
      if not earlier:
        raise
      raise CheckpointReadError(
          f"{e}; the newest earlier checkpoint is step {max(earlier)}: to resume from it, move "
          f"{path} out of {self.directory}") from e
    return restored["state"], own_input_state(restored["input"])

  def reached_preemption(self, step: int) -> bool:
    """Whether the cluster's preemption notice (multi-host sync point) was reached."""
    return self.manager.reached_preemption(step)

  def check_for_errors(self) -> None:
    """Raises the error of an asynchronous save that has failed (CheckpointWriteError where the
    file system refused it), without waiting for one under way: a run learns of it at its next
    log row rather than at its next save, many steps later. (orbax's own `check_for_errors`
    finds nothing once its finalize thread has taken the error; waiting for a save that has
    ended returns at once, raising it.)"""
    with writing(self.workdir):
      for manager in (self.manager, self.epoch_manager):
        if manager is not None and not manager.is_saving_in_progress():
          manager.wait_until_finished()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are complete."""
    self._on_both("wait_until_finished")

  def close(self) -> None:
    """Finishes pending saves and releases resources."""
    self._on_both("close")

  def _on_both(self, method: str) -> None:
    """Calls `method` of the full states' manager, then (whatever it raised) of the epoch
    params' manager; a write the file system refused is CheckpointWriteError."""
    with writing(self.workdir):
      try:
        getattr(self.manager, method)()
      finally:
        if self.epoch_manager is not None:
          getattr(self.epoch_manager, method)()


def read_digest(step_path: str) -> dict[str, int] | None:
  """The digest saved in checkpoint folder `step_path`; None if it has none (older ones)."""
  item = epath.Path(step_path) / DIGEST_ITEM
  if not item.exists():
    return None
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item)


def workdir_checkpoints(workdir: str) -> str:
  """The checkpoint directory of a training workdir."""
  return os.path.join(workdir, CHECKPOINT_DIR)


def workdir_epoch_params(workdir: str) -> str:
  """The epoch ends' params directory of a training workdir (as orbax needs it)."""
  return _orbax_directory(os.path.join(workdir, EPOCH_PARAMS_DIR))


def is_workdir(path: str) -> bool:
  """Whether `path` is a training workdir (it holds a checkpoint directory)."""
  return os.path.isdir(workdir_checkpoints(path))


def _orbax_directory(directory: str) -> str:
  """`directory` as orbax needs it: absolute when local (gs://... stays as is)."""
  return directory if "://" in directory else os.path.abspath(directory)


def _steps_in(directory: str) -> list[int]:
  """Steps of the complete checkpoints in an orbax checkpoint folder (none when it does not
  exist; nothing is created)."""
  manager = ocp.CheckpointManager(_orbax_directory(directory),
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def _complete_steps(workdir: str) -> list[int]:
  """Steps of the complete full-state checkpoints of a workdir (resume points)."""
  return _steps_in(workdir_checkpoints(workdir))


def _epoch_params_steps(workdir: str) -> list[int]:
  """Steps of the epoch-end params checkpoints of a workdir (`EPOCH_PARAMS_DIR`)."""
  return _steps_in(workdir_epoch_params(workdir))


def saved_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints in a training workdir whose params can be read: its full
  states and its epoch ends' params."""
  return _full_state_and_params_steps(workdir)[1]


def _full_state_and_params_steps(workdir: str) -> tuple[set[int], list[int]]:
  """(steps of a workdir's full states, steps whose params can be read, sorted)."""
  if not os.path.isdir(workdir_checkpoints(workdir)):
    raise FileNotFoundError(f"{workdir}: not a training workdir (no {CHECKPOINT_DIR}/ inside)")
  full_states = set(_complete_steps(workdir))
  return full_states, sorted(full_states | set(_epoch_params_steps(workdir)))


def latest_saved_step(workdir: str) -> int | None:
  """Step of the newest complete checkpoint in a run's workdir (local or e.g. gs://), None when
  it has none or does not exist yet (nothing is created)."""
  steps = _complete_steps(workdir)
  return steps[-1] if steps else None


class MissingStepError(FileNotFoundError):
  """A workdir has checkpoints, but not of the step asked for."""


def read_workdir_params(workdir: str, step: int = 0) -> tuple[dict[str, Any], int]:
  """(params as NumPy, step) of a workdir's checkpoint `step` (0: the latest); nothing else is read.

  Only the parameters are restored (orbax partial restore), so a workdir of any task can start
  another: the optimizer state and the input position stay on disk.
  """
  directory = os.path.abspath(workdir_checkpoints(workdir))
  full_states, steps = _full_state_and_params_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"{workdir}: no complete checkpoint in {directory}")
  step = step or max(steps)
  if step not in steps:
    raise MissingStepError(f"{workdir}: no checkpoint of step {step} (have {steps})")
  if step not in full_states:  # an epoch end's params alone
    directory = workdir_epoch_params(workdir)
  return read_state_params(os.path.join(directory, str(step))), step


def read_state_params(step_path: str) -> dict[str, Any]:
  """The params (NumPy) of the checkpoint in folder `step_path` (a full state's, or an epoch
  end's alone), checked against its digest; nothing else is read."""
  path = os.path.join(step_path, "state")  # the item holding {"state", "rng"}
  with _quiet_absl(), ocp.PyTreeCheckpointer() as checkpointer, reading(path):
    tree = checkpointer.metadata(path).item_metadata.tree
    params_metadata = tree["state"]["params"]
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                params_metadata)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item={"state": {"params": params_metadata}},
        restore_args={"state": {"params": restore_args}}, partial_restore=True))
    saved = read_digest(step_path)
  verify_digest(step_path, {"state": restored}, saved)
  return restored["state"]["params"]


@contextlib.contextmanager
def _quiet_absl():
  """Hides orbax's warnings about optional metadata files of items read directly."""
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(level if level >= absl_logging.INFO else absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(level)


class PreemptionWatcher:
  """Turns SIGTERM into a flag polled by the train loop, which then saves and stops.

  In multi-process runs a signal may reach hosts at different steps, so hosts agree through
  JAX's preemption sync point (`Checkpointer.reached_preemption`) instead; when that service
  is not available this is logged once rather than silently ignored.
  """

  def __init__(self, checkpointer: Checkpointer | None):
    self.checkpointer = checkpointer
    self._signalled = threading.Event()
    self._multi_process = jax.process_count() > 1
    self._warned = False
    self._last_step_taken = False
    self._previous_handler = None
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    if self._last_step_taken:  # no step is left to stop at: the run is saving and evaluating
      logging.warning("SIGTERM received after the last training step: the run finishes its "
                      "final checkpoint and evaluation.")
    else:
      logging.warning("SIGTERM received: saving a checkpoint and stopping at the next step.")
    self._signalled.set()

  def last_step_taken(self) -> None:
    """The loop took its last step (after polling it): a later SIGTERM has no step to stop at."""
    self._last_step_taken = True

  def preempted(self, step: int) -> bool:
    """True once a preemption notice arrived (single process: SIGTERM; multi-host: sync point)."""
    if not self._multi_process:
      return self._signalled.is_set()
    if self.checkpointer is None:
      return False
    try:
      return self.checkpointer.reached_preemption(step)
    except Exception as error:  # pylint: disable=broad-except
      if not self._warned:
        logging.warning("Preemption sync point unavailable (%s); preemption is not detected.",
                        error)
        self._warned = True
      return False

  def restore_handler(self) -> None:
    """Puts back the SIGTERM handler that was installed before."""
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None
