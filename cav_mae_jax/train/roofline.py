"""A roofline model of a compiled step: each kernel's FLOPs and bytes, and the time each would take
at the device's peak.

Without the device, the compiled program still says where the time must go. `estimate` reads an
optimized HLO module (`compiled.as_text()`, e.g. a step compiled for an H200 on a host without
one: `gpu_target`) and, for every kernel the program launches (a fusion, a cuBLAS/cuDNN call, a
copy), counts
  FLOPs   of its matrix products: dots, convolutions and GEMM custom calls (2 per multiply-add,
          from the operand and output shapes), cuDNN attention (its two products; the backward
          kernel 2.5 times the forward's); elementwise arithmetic is not counted (it is bound by
          memory on a GPU);
  bytes   of its distinct operands plus its outputs (a custom call's scratch buffer excluded):
          what it moves through device memory at least once, counting a whole operand where the
          kernel reads a slice of it;
and models its time as max(FLOPs / peak FLOP/s of its input type, bytes / memory bandwidth). A
collective (the gradients' all-reduce of a data-parallel mesh, FSDP's all-gathers and
reduce-scatters) takes the bytes a device sends in a ring over the interconnect's bandwidth
(`collective_ms`). The sum is the step's time if every kernel ran at its roofline and all ran one
after another (no launch gaps, no collective hidden behind compute, as XLA's asynchronous
collectives can be): a bound on what these kernels can reach, and the
share of that time each category (matmul, attention, elementwise, ...), phase and model scope
takes (`profile.hlo_ops`) says where a change can gain. It is a model, not a measurement: real
GEMMs reach some 60-80% of peak, and caches and fusion can move fewer bytes than counted.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from typing import Any

from cav_mae_jax.train import flops as flops_lib
from cav_mae_jax.train import profile

# Bytes per element of HLO's primitive types.
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
                "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8,
                "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1,
                "f8e5m2fnuz": 1, "token": 0}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True))
                    + r")\[([\d,]*)\]")
# Instructions that launch nothing: views, tuples, parameters and constants.
_FREE = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast",
                   "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
                   "domain"})
# What the backward kernel of cuDNN attention costs against its forward (2 products recomputed or
# transposed per forward product, plus the recomputed scores: FlashAttention's count).
_ATTENTION_BACKWARD_FACTOR = 2.5


# NVLink 4 (H100/H200 SXM), bytes/s each way: 18 links, 900 GB/s both ways.
NVLINK4_BANDWIDTH = 450e9


@dataclasses.dataclass(frozen=True)
class Peaks:
  """A device's dense peak FLOP/s by the input type of a matrix product, its memory bandwidth
  and its interconnect bandwidth to the other devices (bytes/s each way)."""
  name: str
  flops: dict[str, float]
  memory_bandwidth: float
  interconnect_bandwidth: float = NVLINK4_BANDWIDTH

  def matmul_flops(self, dtype: str) -> float:
    return self.flops.get(dtype, self.flops["f32"])


def gpu_peaks(device_kind: str, memory_bandwidth: float,
              interconnect_bandwidth: float = NVLINK4_BANDWIDTH) -> Peaks:
  """An NVIDIA GPU's peaks from its dense bf16 Tensor Core peak (`flops.PEAK_BF16_FLOPS`): f16
  the same, fp8 twice it, f32 products half of it (they run as TF32, XLA's default precision on
  NVIDIA GPUs). ValueError for a GPU the table does not know."""
  bf16 = flops_lib.peak_flops(device_kind)
  if not bf16:
    raise ValueError(f"no peak FLOP/s known for {device_kind!r}")
  return Peaks(device_kind, {"f8e4m3fn": 2 * bf16, "f8e5m2": 2 * bf16, "bf16": bf16, "f16": bf16,
                             "f32": bf16 / 2}, memory_bandwidth, interconnect_bandwidth)


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  opcode: str
  shape: str  # the result's shape text: 'bf16[8,16]{1,0}' or a tuple '(f32[2], s8[64])'
  operands: tuple[str, ...]
  rest: str  # the text after '=': shape, opcode, operands and attributes


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dtype, tuple(int(d) for d in dims.split(",") if d))
          for dtype, dims in _ARRAY.findall(shape)]


def shape_bytes(shape: str) -> float:
  """Bytes of every array in an HLO shape text (a tuple counts its elements)."""
  return sum(_DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in _arrays(shape))


def _operand_text(rest: str, opcode: str) -> str:
  """The text between an instruction's opcode's parentheses."""
  start = re.search(r"(?:^|\s)" + re.escape(opcode) + r"\(", rest)
  if not start:
    return ""
  depth, begin = 0, start.end() - 1
  for i in range(begin, len(rest)):
    depth += {"(": 1, ")": -1}.get(rest[i], 0)
    if depth == 0:
      return rest[begin + 1:i]
  return rest[begin + 1:]


def _parsed(lines: dict[str, list[profile.HloLine]], entry: str
            ) -> tuple[dict[str, list[Instruction]], str]:
  """The instructions of every computation of a module split by `profile.split_module`, with
  their operands, by computation name, and the name of the entry computation."""
  if not entry:
    raise ValueError("not an optimized HLO module text (no ENTRY computation)")
  computations = {
      computation: [Instruction(line.name, line.opcode, line.shape,
                                tuple(re.findall(r"%([\w.\-]+)",
                                                 _operand_text(line.rest, line.opcode))),
                                line.rest)
                    for line in instructions]
      for computation, instructions in lines.items()}
  return computations, entry


def _backend_config(rest: str) -> dict[str, Any]:
  match = re.search(r"backend_config=(\{.*\})\s*$", rest) or re.search(
      r"backend_config=(\{.*?\})(?:,\s*\w+=|$)", rest)
  if not match:
    return {}
  try:
    return json.loads(match.group(1))
  except json.JSONDecodeError:
    return {}


def _dims(text: str) -> list[int]:
  return [int(d) for d in re.findall(r"\d+", text)]


def _dot_flops(out_shape: str, lhs_shape: str, contracting: list[int]) -> float:
  out, lhs = _arrays(out_shape), _arrays(lhs_shape)
  if not out or not lhs:
    return 0.0
  return 2.0 * math.prod(out[0][1]) * math.prod(lhs[0][1][i] for i in contracting)


def _conv_flops(instruction: Instruction, shapes: dict[str, str], target: str = "") -> float:
  """2 x forward output elements x window elements x input features per group.

  `dim_labels` describe the forward convolution. A cuDNN backward-filter call takes (input,
  output gradient) and returns the kernel; a backward-input call takes (output gradient, kernel)
  and returns the input gradient: the same products as the forward.
  """
  labels = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", instruction.rest)
  if not labels or len(instruction.operands) < 2:
    return 0.0
  operand_shapes = [_arrays(shapes.get(name, "")) for name in instruction.operands[:2]]
  result = _arrays(instruction.shape)
  if "backwardfilter" in target:
    output, inputs = operand_shapes[1], operand_shapes[0]
  elif "backwardinput" in target:
    output, inputs = operand_shapes[0], result
  else:
    output, inputs = result, operand_shapes[0]
  if not output or not inputs:
    return 0.0
  features = inputs[0][1][labels.group(1).index("f")]
  window = re.search(r"window=\{size=([\dx]+)", instruction.rest)
  groups = re.search(r"feature_group_count=(\d+)", instruction.rest)
  window_size = math.prod(_dims(window.group(1))) if window else 1
  return (2.0 * math.prod(output[0][1]) * window_size * features
          / (int(groups.group(1)) if groups else 1))


def _attention_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
  """cuDNN fused attention: Q [B, S, H, D] and K [B, T, H, D] (JAX's layout) -> 4 B H S T D for
  the forward, 2.5 times that for the backward kernel."""
  if len(instruction.operands) < 2:
    return 0.0
  query = _arrays(shapes.get(instruction.operands[0], ""))
  key = _arrays(shapes.get(instruction.operands[1], ""))
  if not query or not key or len(query[0][1]) != 4 or len(key[0][1]) != 4:
    return 0.0
  batch, q_len, heads, head_dim = query[0][1]
  forward = 4.0 * batch * heads * q_len * key[0][1][1] * head_dim
  target = profile.attribute(instruction.rest, "custom_call_target").lower()
  return forward * (_ATTENTION_BACKWARD_FACTOR if "backward" in target else 1.0)


def _group_size(rest: str) -> int | None:
  """How many devices take part in each group of a collective, from its `replica_groups`:
  explicit groups `{{0,1},{2,3}}`, an iota `[2,4]<=[8]`, or mesh axes `mesh['x'=8,'y'=1] {'x'}`;
  None where the text says nothing readable."""
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
  if mesh:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
    return math.prod(int(sizes.get(axis, 1)) for axis in re.findall(r"'([^']+)'", mesh.group(2)))
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", rest)
  if iota:
    return int(iota.group(2))
  explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
  if explicit:
    return len(_dims(explicit.group(1)))
  return None


def collective_bytes(instruction: Instruction, shapes: dict[str, str]) -> float:
  """Bytes one device sends over its links for a collective, as a ring moves them: an
  all-reduce of S bytes over n devices 2 (n - 1) / n S, an all-gather or reduce-scatter
  (n - 1) / n of the full array, anything else its operands; 0 for the `-done` half of an
  asynchronous collective and for groups of one device."""
  opcode = instruction.opcode
  if opcode.endswith("-done"):
    return 0.0
  n = _group_size(instruction.rest)
  if n == 1:
    return 0.0
  share = (n - 1) / n if n else 1.0
  operands = sum(shape_bytes(shapes.get(name, "")) for name in instruction.operands)
  if opcode.startswith("all-reduce"):
    return 2 * share * operands
  if opcode.startswith(("all-gather", "reduce-scatter")):
    # The full arrays: the gathered outputs or the scattered inputs, whichever side is larger
    # (an asynchronous start returns its inputs and outputs together; several arrays may go as
    # one combined collective).
    outputs = shape_bytes(instruction.shape) - (operands if opcode.endswith("-start") else 0)
    return share * max(operands, outputs)
  return operands


class _Module:
  """Cost of a parsed module's kernels."""

  def __init__(self, lines: dict[str, list[profile.HloLine]], entry: str):
    self.computations, self.entry = _parsed(lines, entry)
    self.shapes = {c: {i.name: i.shape for i in instructions}
                   for c, instructions in self.computations.items()}

  def flops_and_dtype(self, instruction: Instruction, computation: str) -> tuple[float, str]:
    """Matrix-product FLOPs of one instruction (inside fusions too) and its products' input
    type."""
    shapes = self.shapes[computation]
    opcode = instruction.opcode
    lhs = _arrays(shapes.get(instruction.operands[0], "")) if instruction.operands else []
    dtype = lhs[0][0] if lhs else "f32"
    if opcode == "dot":
      contracting = _dims(re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.rest)
                          .group(1)) if "lhs_contracting_dims" in instruction.rest else []
      return _dot_flops(instruction.shape, shapes.get(instruction.operands[0], ""),
                        contracting), dtype
    if opcode == "convolution":
      return _conv_flops(instruction, shapes), dtype
    if opcode == "custom-call":
      target = profile.attribute(instruction.rest, "custom_call_target").lower()
      if "fmha" in target or "attention" in target:
        return _attention_flops(instruction, shapes), dtype
      if "conv" in target:
        return _conv_flops(instruction, shapes, target), dtype
      if "gemm" in target or "matmul" in target:
        numbers = _backend_config(instruction.rest).get("gemm_backend_config", {}).get(
            "dot_dimension_numbers", {})
        contracting = [int(d) for d in numbers.get("lhs_contracting_dimensions", [])]
        out = _arrays(instruction.shape)
        return (_dot_flops(f"{out[0][0]}[{','.join(map(str, out[0][1]))}]" if out else "",
                           shapes.get(instruction.operands[0], ""), contracting), dtype)
      return 0.0, dtype
    if opcode == "fusion":
      total, product_dtype = 0.0, ""
      for callee in re.findall(r"calls=%?([\w.\-]+)", instruction.rest):
        for inner in self.computations.get(callee, ()):
          flops, inner_dtype = self.flops_and_dtype(inner, callee)
          if flops:
            total, product_dtype = total + flops, product_dtype or inner_dtype
      return total, product_dtype or dtype
    return 0.0, dtype

  def kernel_bytes(self, instruction: Instruction, computation: str) -> float:
    """Distinct operands plus outputs; a custom call's trailing s8 scratch buffer excluded."""
    shapes = self.shapes[computation]
    out = _arrays(instruction.shape)
    if instruction.opcode == "custom-call" and len(out) > 1 and out[-1][0] == "s8":
      out = out[:-1]
    output_bytes = sum(_DTYPE_BYTES[d] * math.prod(dims) for d, dims in out)
    return output_bytes + sum(shape_bytes(shapes.get(name, ""))
                              for name in dict.fromkeys(instruction.operands))

  def kernels(self, computation: str, repeat: float = 1.0):
    """(instruction, computation, times it runs) of every kernel, through while loops (their
    known trip count) and calls."""
    for instruction in self.computations[computation]:
      if instruction.opcode in _FREE:
        continue
      if instruction.opcode in ("while", "call", "conditional"):
        trips = 1.0
        if instruction.opcode == "while":
          known = _backend_config(instruction.rest).get("known_trip_count", {}).get("n")
          trips = float(known) if known else 1.0
        names = re.findall(r"(?:body|to_apply|calls|branch_computations)=\{?%?([\w.\-]+)",
                           instruction.rest)
        for callee in names:
          if callee in self.computations:
            yield from self.kernels(callee, repeat * trips)
        continue
      yield instruction, computation, repeat


def estimate(hlo_text: str, peaks: Peaks, top: int = 12) -> dict[str, Any]:
  """The roofline model of one compiled module: FLOPs, bytes and modelled milliseconds in all and
  by category, phase and scope (the shape of `profile.summarize`'s summary, so
  `profile.markdown` prints it)."""
  lines, entry = profile.split_module(hlo_text)
  module = _Module(lines, entry)
  ops = profile.ops_of(lines)
  unknown = profile.OpInfo("other", "update/other", "(not attributed)")
  per = {"category": collections.Counter(), "phase": collections.Counter(),
         "scope": collections.Counter(), "op": collections.Counter()}
  totals = collections.Counter()
  for instruction, computation, repeat in module.kernels(module.entry):
    info = ops.get(instruction.name, unknown)
    if info.category == "collective":  # over the links, not through memory
      sent = collective_bytes(instruction, module.shapes[computation]) * repeat
      ms = sent / peaks.interconnect_bandwidth * 1e3
      totals["collective_bytes"] += sent
      totals["collective_ms"] += ms
    else:
      flops, dtype = module.flops_and_dtype(instruction, computation)
      nbytes = module.kernel_bytes(instruction, computation)
      compute_s = flops / peaks.matmul_flops(dtype) if flops else 0.0
      memory_s = nbytes / peaks.memory_bandwidth
      ms = max(compute_s, memory_s) * 1e3 * repeat
      totals["flops"] += flops * repeat
      totals["bytes"] += nbytes * repeat
      totals["kernels"] += repeat
      totals["compute_bound_ms"] += ms if compute_s >= memory_s else 0.0
    per["category"][info.category] += ms
    per["phase"][info.phase] += ms
    per["scope"][f"{info.phase}: {info.scope}"] += ms
    per["op"][(instruction.name, info.category, info.phase, info.scope)] += ms
  busy_ms = sum(per["category"].values())
  return {
      "module": profile.module_name(hlo_text), "device": peaks.name, "busy_ms_per_step": busy_ms,
      "flops": totals["flops"], "bytes": totals["bytes"], "kernels": int(totals["kernels"]),
      "compute_bound_ms": totals["compute_bound_ms"],
      "collective_ms": totals["collective_ms"], "collective_bytes": totals["collective_bytes"],
      "categories": dict(per["category"].most_common()),
      "phases": dict(per["phase"].most_common()),
      "scopes": dict(per["scope"].most_common(top)),
      "top_ops": [{"op": op, "category": c, "phase": p, "scope": s, "ms_per_step": ms}
                  for (op, c, p, s), ms in per["op"].most_common(top)],
  }
