"""Where a compiled step's device time goes: a profiler trace of a few steps, summed per HLO op.

`trace_steps` runs a function under `jax.profiler.trace` with a Perfetto trace (plain gzipped
JSON: no TensorBoard plugin is needed to read it). `summarize` sums the duration of every
executed op of one compiled module (trace events carry `hlo_module` and `hlo_op`) and attributes
each op through the module's optimized HLO text (`compiled.as_text()`):
  category  what the op does: matmul (dots, convolutions, cuBLAS/Triton GEMMs), attention
            (cuDNN fused attention), elementwise, reduction, gather, scatter, sort,
            data movement (copies, transposes, slices, concatenations, pads), collective, other;
  phase     forward (`jvp(...)`), backward (`transpose(jvp(...))`), or update/other (the
            train step's `optimizer`, `metrics` and `device_augment` scopes, and unscoped ops);
  scope     the model path of the op (`encode/audio_blocks/blocks_a_*/attn`), block indices
            collapsed.
On a GPU the trace holds the kernels of each stream (`/device:GPU:N`); on a CPU the thunks of the
host threads. Only innermost events count (a `while` thunk does not count again what its body
ran). The busy time against the wall time of the same steps shows what is spent between ops
(launch overhead, host waits).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import time
from typing import Any, Callable, Iterable, NamedTuple

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*(?P<rest>.*)$")
OPCODE = re.compile(r"(?:^|\s)(?P<opcode>[a-z][\w\-]*)\(")
COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[^\s(]+)\s*\(.*\{\s*$")
_BLOCK_INDEX = re.compile(r"_\d+$")
_SUBLAYERS = ("attn", "mlp")
_CONTROL = ("while", "body", "cond", "closed_call", "pjit", "cond_fun", "body_fun")
_MOVES = frozenset({"copy", "transpose", "bitcast", "reshape", "slice", "dynamic-slice",
                    "dynamic-update-slice", "concatenate", "pad", "broadcast", "parameter",
                    "constant", "tuple", "get-tuple-element"})


@dataclasses.dataclass(frozen=True)
class OpInfo:
  """How one HLO instruction of the compiled module is reported."""
  category: str
  phase: str
  scope: str


def attribute(text: str, key: str) -> str:
  match = re.search(key + r'="([^"]*)"', text)
  return match.group(1) if match else ""


def phase_of(op_name: str) -> str:
  """'backward' for transposed (VJP) ops, 'forward' for linearized ones, else 'update/other'."""
  if "transpose(jvp(" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "update/other"


def scope_of(op_name: str) -> str:
  """The model path of an op: transformations, the entry point and the primitive dropped.

  'jit(train_step)/transpose(jvp(CAVMAE))/CAVMAE._forward/CAVMAE.encode/CAVMAE.audio_blocks/
  blocks_a_3/attn/qkv/dot_general' -> 'encode/audio_blocks/blocks_a_*/attn'.
  """
  parts = []
  for part in op_name.split("/")[:-1]:
    if part.startswith(("jit(", "jvp(", "transpose(", "vmap(", "checkpoint", "remat",
                        "branch_")) or part in _CONTROL:
      continue
    part = part.split(".", 1)[1] if "." in part else part  # 'CAVMAE.encode' -> 'encode'
    if part.startswith("_") or not part:
      continue
    parts.append(_BLOCK_INDEX.sub("_*", part))
    if part in _SUBLAYERS or part.startswith("norm"):
      break
  return "/".join(parts) or "(top level)"


def _category(opcode: str, rest: str, called: set[str]) -> str:
  """The category of an instruction from its opcode and, for fusions, the ops they call."""
  if opcode == "custom-call":
    target = attribute(rest, "custom_call_target").lower()
    if "fmha" in target or "attention" in target:
      return "attention"
    if "gemm" in target or "cublas" in target or "matmul" in target or "conv" in target:
      return "matmul"
    return "other"
  if opcode in ("dot", "convolution"):
    return "matmul"
  if opcode in ("gather", "scatter", "sort"):
    return opcode
  if opcode in _MOVES:
    return "data movement"
  if opcode.startswith(_COLLECTIVES):
    return "collective"
  if opcode == "reduce":
    return "reduction"
  if opcode == "fusion":
    for ops, category in ((("custom-call:attention",), "attention"),
                          (("dot", "convolution", "custom-call:matmul"), "matmul"),
                          (("scatter",), "scatter"), (("gather",), "gather"), (("sort",), "sort"),
                          (("reduce", "reduce-window"), "reduction")):
      if called & set(ops):
        return category
    if called and called <= _MOVES:
      return "data movement"
    return "elementwise"
  return "elementwise" if opcode not in ("while", "conditional", "call") else "other"


class HloLine(NamedTuple):
  """One instruction line of an HLO module's text: `name = shape opcode(...) ...` (`rest`: all
  after the `=`)."""
  name: str
  opcode: str
  shape: str
  rest: str


def split_module(hlo_text: str) -> tuple[dict[str, list[HloLine]], str]:
  """The instructions of every computation of an HLO module's text by computation name, and the
  entry computation's name ("" when the text has none)."""
  computations: dict[str, list[HloLine]] = collections.defaultdict(list)
  current, entry = "", ""
  for line in hlo_text.splitlines():
    header = COMPUTATION.match(line)
    if header and "=" not in line.split("(", 1)[0]:
      current = header.group("name")
      if line.startswith("ENTRY"):
        entry = current
      continue
    instruction = INSTRUCTION.match(line)
    if not instruction:
      continue
    rest = instruction.group("rest")
    opcode = OPCODE.search(rest)
    if opcode:
      computations[current].append(HloLine(instruction.group("name"), opcode.group("opcode"),
                                           rest[:opcode.start("opcode")].strip(), rest))
  return computations, entry


def hlo_ops(hlo_text: str) -> dict[str, OpInfo]:
  """Every instruction of an optimized HLO module (`compiled.as_text()`), by name."""
  return ops_of(split_module(hlo_text)[0])


def ops_of(computations: dict[str, list[HloLine]]) -> dict[str, OpInfo]:
  """`hlo_ops` of a module split by `split_module`."""

  def called_opcodes(rest: str, seen: frozenset[str] = frozenset()) -> set[str]:
    opcodes = set()
    for callee in re.findall(r"calls=%?([\w.\-]+)", rest):
      if callee in seen:
        continue
      for _, opcode, _, inner in computations.get(callee, ()):
        # A custom call inside a fusion (a cuDNN kernel) counts as what it computes.
        opcodes.add(opcode if opcode != "custom-call" else
                    "custom-call:" + _category(opcode, inner, set()))
        if opcode in ("fusion", "call"):
          opcodes |= called_opcodes(inner, seen | {callee})
    return opcodes

  ops = {}
  for instructions in computations.values():
    op_names = _op_names(instructions)
    for name, opcode, _, rest in instructions:
      op_name = op_names[name]
      ops[name] = OpInfo(_category(opcode, rest, called_opcodes(rest)), phase_of(op_name),
                         scope_of(op_name))
  return ops


def _op_names(instructions: list[HloLine], rounds: int = 3) -> dict[str, str]:
  """The source op name of each instruction of one computation.

  Instructions that XLA created (a broadcast split out of a fusion, a partial reduction) carry
  none; they take the name of their first named user, else of their first named operand.
  """
  names = {line.name: attribute(line.rest, "op_name") for line in instructions}
  operands = {line.name: [o for o in re.findall(r"%([\w.\-]+)", line.rest.split("calls=")[0])
                          if o in names and o != line.name] for line in instructions}
  users: dict[str, list[str]] = collections.defaultdict(list)
  for name, inputs in operands.items():
    for operand in inputs:
      users[operand].append(name)
  for _ in range(rounds):
    for name in names:
      if not names[name]:
        names[name] = next((names[n] for n in users[name] + operands[name] if names[n]), "")
  return names


def trace_steps(run: Callable[[], Any], steps: int, log_dir: str) -> tuple[str, float]:
  """Runs `run()` `steps` times under the profiler; (Perfetto trace path, wall seconds).

  `run` must block until its step is done (e.g. `jax.block_until_ready`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    start = time.perf_counter()
    for _ in range(steps):
      run()
    wall_s = time.perf_counter() - start
  traces = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"),
                            recursive=True), key=os.path.getmtime)
  if not traces:
    raise FileNotFoundError(f"{log_dir}: the profiler wrote no perfetto_trace.json.gz")
  return traces[-1], wall_s


def _innermost(events: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
  """The events of one thread that contain no other event of the list."""
  events = sorted(events, key=lambda e: (float(e["ts"]), -float(e["dur"])))
  for i, event in enumerate(events):
    end = float(event["ts"]) + float(event["dur"])
    following = events[i + 1] if i + 1 < len(events) else None
    if following is None or float(following["ts"]) >= end:
      yield event


def op_events(trace: dict[str, Any], module: str) -> list[dict[str, Any]]:
  """The innermost op events of `module` in a Perfetto trace: device streams if any, else host."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  process_names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
                   if e.get("ph") == "M" and e.get("name") == "process_name"}
  ops = [e for e in events if e.get("ph") == "X" and "dur" in e
         and (e.get("args") or {}).get("hlo_module") == module and e["args"].get("hlo_op")]
  on_device = [e for e in ops if process_names.get(e["pid"], "").startswith("/device:")]
  ops = on_device or ops
  by_thread: dict[tuple[Any, Any], list[dict[str, Any]]] = collections.defaultdict(list)
  for event in ops:
    by_thread[(event["pid"], event.get("tid"))].append(event)
  return [e for thread in by_thread.values() for e in _innermost(thread)]


def module_name(hlo_text: str) -> str:
  """The name of an HLO module (its first line: 'HloModule jit_train_step, ...')."""
  match = re.match(r"HloModule\s+([^\s,]+)", hlo_text)
  if not match:
    raise ValueError("not an HLO module text (no 'HloModule' header)")
  return match.group(1)


def summarize(trace_path: str, hlo_text: str, steps: int, wall_s: float | None = None,
              top: int = 12) -> dict[str, Any]:
  """Milliseconds per step by category, phase and scope, and the costliest ops."""
  module = module_name(hlo_text)
  with gzip.open(trace_path, "rt") as f:
    trace = json.load(f)
  events = op_events(trace, module)
  if not events:
    raise ValueError(f"{trace_path}: no op of module {module!r} in the trace")
  ops = hlo_ops(hlo_text)
  unknown = OpInfo("other", "update/other", "(not in the HLO text)")
  per = {"category": collections.Counter(), "phase": collections.Counter(),
         "scope": collections.Counter(), "op": collections.Counter()}
  for event in events:
    info = ops.get(event["args"]["hlo_op"], unknown)
    ms = float(event["dur"]) / 1e3 / steps  # trace durations are in microseconds
    per["category"][info.category] += ms
    per["phase"][info.phase] += ms
    per["scope"][f"{info.phase}: {info.scope}"] += ms
    per["op"][(event["args"]["hlo_op"], info.category, info.phase, info.scope)] += ms
  busy_ms = sum(per["category"].values())
  summary = {
      "module": module, "steps": steps, "busy_ms_per_step": busy_ms,
      "events": len(events),
      "categories": dict(per["category"].most_common()),
      "phases": dict(per["phase"].most_common()),
      "scopes": dict(per["scope"].most_common(top)),
      "top_ops": [{"op": op, "category": c, "phase": p, "scope": s, "ms_per_step": ms}
                  for (op, c, p, s), ms in per["op"].most_common(top)],
  }
  if wall_s is not None:
    summary["wall_ms_per_step"] = wall_s * 1e3 / steps
  return summary


def markdown(summary: dict[str, Any], busy_label: str = "device busy") -> str:
  """The summary as markdown tables (shares of the busy time, which the first line names)."""
  busy = summary["busy_ms_per_step"]
  lines = [f"{busy_label} {busy:.2f} ms per step"
           + (f" of {summary['wall_ms_per_step']:.2f} ms wall (traced, {summary['steps']} steps)"
              if "wall_ms_per_step" in summary else "")]
  for title, key in (("category", "categories"), ("phase", "phases"), ("scope", "scopes")):
    lines += ["", f"| {title} | ms/step | share |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.3f} | {100 * ms / busy:.1f}% |"
              for name, ms in summary[key].items()]
  lines += ["", "| op | category | phase | scope | ms/step |", "|---|---|---|---|---|"]
  lines += [f"| {o['op']} | {o['category']} | {o['phase']} | {o['scope']} | "
            f"{o['ms_per_step']:.3f} |" for o in summary["top_ops"]]
  return "\n".join(lines)
