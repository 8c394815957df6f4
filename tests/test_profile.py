"""train/profile.py: device time of a compiled function summed per HLO op and attributed."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from cav_mae_jax.train import profile

import xla_flags


def _loss(w, x, ids):
  """A matmul, a gather (whose gradient is a scatter), a sort and a reduction."""
  h = jnp.tanh(x @ w)
  picked = jnp.take_along_axis(h, ids, axis=1)
  return jnp.sum(jnp.sort(picked, axis=1)[:, :3] ** 2)


def _args():
  keys = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(keys[0], (64, 64)), jax.random.normal(keys[1], (32, 64)),
          jax.random.randint(keys[2], (32, 16), 0, 64))


def test_hlo_ops_attribute_category_phase_and_scope():
  compiled = jax.jit(jax.grad(_loss)).lower(*_args()).compile(xla_flags.native_compile_options())
  ops = profile.hlo_ops(compiled.as_text())
  categories = {info.category for info in ops.values()}
  assert {"matmul", "scatter", "sort"} <= categories, categories
  assert {"forward", "backward"} <= {info.phase for info in ops.values()}
  assert profile.module_name(compiled.as_text()).startswith("jit_")


@pytest.mark.parametrize("op_name, phase, scope", [
    ("jit(train_step)/transpose(jvp(CAVMAE))/CAVMAE._forward/CAVMAE.encode/CAVMAE.audio_blocks/"
     "blocks_a_3/attn/qkv/dot_general", "backward", "encode/audio_blocks/blocks_a_*/attn"),
    ("jit(train_step)/jvp(CAVMAE)/CAVMAE._forward/CAVMAE.decode/decoder_blocks_7/norm2/mul",
     "forward", "decode/decoder_blocks_*/norm2"),
    ("jit(train_step)/mul", "update/other", "(top level)"),
    ("jit(train_step)/device_augment/jit(_uniform)/while/body/closed_call/add", "update/other",
     "device_augment"),
    ("", "update/other", "(top level)"),
])
def test_phase_and_scope_of_op_names(op_name, phase, scope):
  assert profile.phase_of(op_name) == phase
  assert profile.scope_of(op_name) == scope


def _event(name, ts, dur, pid=1, tid=1, module="jit_step"):
  return {"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur,
          "args": {"hlo_module": module, "hlo_op": name}}


def test_only_innermost_events_count_and_device_streams_win():
  trace = {"traceEvents": [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
      _event("while.1", 0, 100), _event("fusion.1", 10, 30), _event("fusion.2", 50, 40),
      _event("other_module_op", 0, 5, module="jit_other"),
  ]}
  host = profile.op_events(trace, "jit_step")
  assert sorted(e["args"]["hlo_op"] for e in host) == ["fusion.1", "fusion.2"]
  trace["traceEvents"] += [_event("fusion.9", 0, 7, pid=2, tid=5),
                           _event("fusion.8", 7, 3, pid=2, tid=6)]
  device = profile.op_events(trace, "jit_step")
  assert sorted(e["args"]["hlo_op"] for e in device) == ["fusion.8", "fusion.9"]


def test_summary_of_a_traced_function_adds_up(tmp_path):
  step = jax.jit(jax.grad(_loss))
  args = _args()
  compiled = step.lower(*args).compile()
  run = lambda: jax.block_until_ready(compiled(*args))
  run()
  trace, wall_s = profile.trace_steps(run, 2, str(tmp_path))
  with gzip.open(trace, "rt") as f:
    assert json.load(f)["traceEvents"]
  summary = profile.summarize(trace, compiled.as_text(), 2, wall_s)
  busy = summary["busy_ms_per_step"]
  assert busy > 0 and summary["wall_ms_per_step"] > 0  # CPU thunks may overlap: no ratio
  assert sum(summary["categories"].values()) == pytest.approx(busy)
  assert sum(summary["phases"].values()) == pytest.approx(busy)
  assert summary["categories"].get("matmul", 0) > 0
  assert "| category | ms/step | share |" in profile.markdown(summary)


def test_a_trace_without_the_module_is_an_error(tmp_path):
  path = tmp_path / "t.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": [_event("fusion.1", 0, 1, module="jit_other")]}, f)
  with pytest.raises(ValueError, match="no op of module 'jit_step'"):
    profile.summarize(str(path), "HloModule jit_step, entry_computation_layout={}\n", 1)


def test_custom_calls_count_as_what_they_compute():
  hlo = "\n".join([
      "HloModule jit_step, entry_computation_layout={}",
      "",
      "%fused_attention (p0: bf16[2,8,64]) -> bf16[2,8,64] {",
      '  ROOT %cc.1 = bf16[2,8,64]{2,1,0} custom-call(%p0), custom_call_target="__cudnn$fmhaSoftmax"',
      "}",
      "",
      "%fused_gemm (p1: bf16[16,64]) -> bf16[16,64] {",
      '  ROOT %cc.2 = bf16[16,64]{1,0} custom-call(%p1), custom_call_target="__cublas$lt$matmul"',
      "}",
      "",
      "ENTRY %main (a: bf16[2,8,64]) -> bf16[2,8,64] {",
      '  %fusion.3 = bf16[16,64]{1,0} fusion(%a), kind=kCustom, calls=%fused_gemm, '
      'metadata={op_name="jit(step)/optimizer/mul"}',
      '  %gemm = (bf16[64,64]{1,0}, s8[1024]{0}) custom-call(%a), custom_call_target="__cublas$gemm", '
      'metadata={op_name="jit(step)/jvp(M)/M.encode/blocks_1/mlp/fc1/dot_general"}',
      '  ROOT %fusion.7 = bf16[2,8,64]{2,1,0} fusion(%a), kind=kCustom, calls=%fused_attention, '
      'metadata={op_name="jit(step)/transpose(jvp(M))/M.encode/blocks_1/attn/dot_product_attention"}',
      "}",
  ])
  ops = profile.hlo_ops(hlo)
  assert ops["gemm"] == profile.OpInfo("matmul", "forward", "encode/blocks_*/mlp")
  assert ops["fusion.7"] == profile.OpInfo("attention", "backward", "encode/blocks_*/attn")
  assert ops["fusion.3"] == profile.OpInfo("matmul", "update/other", "optimizer")
