"""The roofline model of a compiled step: FLOPs and bytes per kernel, modelled time."""

import jax
import jax.numpy as jnp
import pytest

from cav_mae_jax.train import flops
from cav_mae_jax.train import profile
from cav_mae_jax.train import roofline
from configs import pretrain

import target_runs

# 1 TFLOP/s in bf16, 0.5 in f32, 1 GB/s: modelled times are easy to check by hand.
_PEAKS = roofline.Peaks("test", {"bf16": 1e12, "f32": 0.5e12}, 1e9)

# An optimized GPU module in the form `compiled.as_text()` prints (operands without shapes,
# backend configs as JSON): a cuBLAS GEMM with its scratch buffer, a while loop of a known trip
# count around a fusion with a dot, cuDNN attention forward and backward, a cuDNN weight-gradient
# convolution, and views (bitcast, get-tuple-element) that launch nothing.
_MODULE = r"""HloModule jit_train_step, entry_computation_layout={()->()}

%fused_dot (p0: f32[4,8], p1: f32[8,16]) -> f32[4,16] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (state: (s32[], f32[4,8], f32[8,16])) -> (s32[], f32[4,8], f32[8,16]) {
  %state = (s32[], f32[4,8]{1,0}, f32[8,16]{1,0}) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%state), index=1
  %w = f32[8,16]{1,0} get-tuple-element(%state), index=2
  %fusion.7 = f32[4,16]{1,0} fusion(%x, %w), kind=kLoop, calls=%fused_dot, metadata={op_name="jit(train_step)/jvp(M)/M.scan/dense/dot_general"}
  ROOT %tuple.1 = (s32[], f32[4,8]{1,0}, f32[8,16]{1,0}) tuple(%state, %x, %w)
}

%cond (state: (s32[], f32[4,8], f32[8,16])) -> pred[] {
  %state = (s32[], f32[4,8]{1,0}, f32[8,16]{1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main.9 (a: bf16[128,256], b: bf16[256,512]) -> bf16[128,512] {
  %a = bf16[128,256]{1,0} parameter(0)
  %b = bf16[256,512]{1,0} parameter(1)
  %gemm.1 = (bf16[128,512]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(train_step)/jvp(M)/M.dense/dot_general"}, backend_config={"operation_queue_id":"0","gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"},"reification_cost":[]}
  %out = bf16[128,512]{1,0} get-tuple-element(%gemm.1), index=0
  %init = (s32[], f32[4,8]{1,0}, f32[8,16]{1,0}) parameter(2)
  %while.1 = (s32[], f32[4,8]{1,0}, f32[8,16]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %q = bf16[2,16,4,8]{3,2,1,0} parameter(3)
  %k = bf16[2,32,4,8]{3,2,1,0} parameter(4)
  %v = bf16[2,32,4,8]{3,2,1,0} parameter(5)
  %fwd.1 = (bf16[2,4,16,8]{3,1,2,0}, f32[2,4,16]{2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(train_step)/jvp(M)/M.attn/dot_product_attention_fwd"}
  %bwd.1 = (bf16[2,16,4,8]{3,2,1,0}, bf16[2,32,4,8]{3,2,1,0}, bf16[2,32,4,8]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmaxBackward", metadata={op_name="jit(train_step)/transpose(jvp(M))/M.attn/dot_product_attention_bwd"}
  %images = bf16[3,64,64,2]{3,2,1,0} parameter(6)
  %grad = bf16[3,4,4,32]{3,2,1,0} parameter(7)
  %conv.1 = (bf16[32,16,16,2]{3,2,1,0}, u8[0]{0}) custom-call(%images, %grad), window={size=16x16 stride=16x16}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(train_step)/transpose(jvp(M))/M.embed/conv_general_dilated"}
  %view = bf16[65536]{0} bitcast(%out)
  ROOT %copy.1 = bf16[128,512]{1,0} copy(%out), metadata={op_name="jit(train_step)/optimizer/copy"}
}
"""


def _kernels(summary):
  return {op["op"]: op["ms_per_step"] for op in summary["top_ops"]}


def test_kernels_flops_bytes_and_modelled_time_of_a_gpu_module():
  summary = roofline.estimate(_MODULE, _PEAKS, top=20)
  gemm_flops, dot_flops = 2 * 128 * 512 * 256, 2 * 4 * 16 * 8
  attention_flops = 4 * 2 * 4 * 16 * 32 * 8  # batch x heads x queries x keys x head dim
  # The weight gradient's products are the forward's: its output (the gradient operand, b01f:
  # batch 3, 4 x 4 patches, 32 features) x a 16 x 16 window x 2 input features (the images' f).
  conv_flops = 2 * (3 * 4 * 4 * 32) * 16 * 16 * 2
  assert summary["flops"] == gemm_flops + 3 * dot_flops + 3.5 * attention_flops + conv_flops
  kernels = _kernels(summary)
  assert set(kernels) == {"gemm.1", "fusion.7", "fwd.1", "bwd.1", "conv.1", "copy.1"}
  assert summary["kernels"] == 8  # the fusion runs 3 times: the loop's known trip count
  # The GEMM: operands and output, not its s8 scratch buffer; memory-bound at 1 GB/s.
  gemm_bytes = 2 * (128 * 256 + 256 * 512 + 128 * 512)
  assert kernels["gemm.1"] == pytest.approx(gemm_bytes / 1e9 * 1e3)
  assert kernels["fusion.7"] == pytest.approx(3 * 4 * (4 * 8 + 8 * 16 + 4 * 16) / 1e9 * 1e3)
  assert kernels["copy.1"] == pytest.approx(2 * 2 * 128 * 512 / 1e9 * 1e3)
  assert summary["busy_ms_per_step"] == pytest.approx(sum(summary["categories"].values()))
  assert summary["categories"]["attention"] == pytest.approx(kernels["fwd.1"] + kernels["bwd.1"])
  assert summary["phases"]["update/other"] == pytest.approx(kernels["copy.1"])
  assert summary["compute_bound_ms"] == 0.0  # at 1 GB/s every kernel waits on memory


# Collectives of a data-parallel step and of an FSDP step over 8 devices, in the three forms
# XLA writes replica groups: mesh axes, an iota, explicit groups.
_COLLECTIVES = r"""HloModule jit_train_step, entry_computation_layout={()->()}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

ENTRY %main.3 (g: bf16[1000000], w: f32[1000,125], r: f32[8000,125]) -> bf16[1000000] {
  %g = bf16[1000000]{0} parameter(0)
  %all-reduce-start.1 = bf16[1000000]{0} all-reduce-start(%g), channel_id=1, replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, use_global_device_ids=true, to_apply=%add, metadata={op_name="jit(train_step)/transpose(jvp(M))/M.dense/dot_general"}
  %all-reduce-done.1 = bf16[1000000]{0} all-reduce-done(%all-reduce-start.1)
  %w = f32[1000,125]{1,0} parameter(1)
  %all-gather-start.1 = (f32[1000,125]{1,0}, f32[8000,125]{1,0}) all-gather-start(%w), channel_id=2, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true
  %all-gather-done.1 = f32[8000,125]{1,0} all-gather-done(%all-gather-start.1)
  %r = f32[8000,125]{1,0} parameter(2)
  %reduce-scatter.1 = f32[1000,125]{1,0} reduce-scatter(%r), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add
  %alone = bf16[1000000]{0} all-reduce(%g), channel_id=4, replica_groups={{0},{1},{2},{3},{4},{5},{6},{7}}, to_apply=%add
  ROOT %copy.2 = bf16[1000000]{0} copy(%all-reduce-done.1)
}
"""


def test_collectives_take_the_bytes_a_ring_sends_over_the_interconnect():
  summary = roofline.estimate(_COLLECTIVES, _PEAKS, top=20)
  all_reduce = 2 * 7 / 8 * 2e6  # bf16[1e6], 8 devices
  full = 4 * 8000 * 125  # the gathered and the scattered array
  assert summary["collective_bytes"] == pytest.approx(all_reduce + 2 * 7 / 8 * full)
  kernels = _kernels(summary)
  assert kernels["all-reduce-start.1"] == pytest.approx(all_reduce / 450e9 * 1e3)
  assert kernels["all-gather-start.1"] == pytest.approx(7 / 8 * full / 450e9 * 1e3)
  assert kernels["reduce-scatter.1"] == kernels["all-gather-start.1"]
  assert kernels["all-reduce-done.1"] == kernels["alone"] == 0.0  # nothing sent
  assert summary["collective_ms"] == pytest.approx(summary["categories"]["collective"])
  assert summary["busy_ms_per_step"] == pytest.approx(
      summary["collective_ms"] + kernels["copy.2"])
  assert summary["kernels"] == 1  # the copy; collectives are counted apart


def test_a_kernel_bound_by_compute_takes_its_flops_at_the_peak_of_its_input_type():
  fast_memory = roofline.Peaks("test", {"bf16": 1e12, "f32": 0.5e12}, 1e15)
  summary = roofline.estimate(_MODULE, fast_memory, top=20)
  kernels = _kernels(summary)
  assert kernels["gemm.1"] == pytest.approx(2 * 128 * 512 * 256 / 1e12 * 1e3)  # bf16
  assert kernels["fusion.7"] == pytest.approx(3 * 2 * 4 * 16 * 8 / 0.5e12 * 1e3)  # f32
  assert summary["compute_bound_ms"] == pytest.approx(
      summary["busy_ms_per_step"] - kernels["copy.1"])


def test_gpu_peaks_follow_the_mfu_table():
  peaks = roofline.gpu_peaks("NVIDIA H200", 4.8e12)
  assert peaks.flops["bf16"] == flops.PEAK_BF16_FLOPS["NVIDIA H200"]
  assert peaks.matmul_flops("f32") == peaks.flops["bf16"] / 2
  assert peaks.matmul_flops("s32") == peaks.flops["f32"]
  with pytest.raises(ValueError, match="no peak FLOP/s known for 'cpu'"):
    roofline.gpu_peaks("cpu", 1e11)


def test_the_benchmarked_gpus_have_roofline_peaks_and_other_devices_none():
  from cav_mae_jax.train import benchmark  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import gpu_target  # pylint: disable=g-import-not-at-top
  for target in gpu_target.TARGETS.values():
    peaks = gpu_target.roofline_peaks(target.device_kind)
    assert peaks.memory_bandwidth == target.memory_bandwidth
    assert peaks.flops["bf16"] == flops.peak_flops(target.device_kind)
  assert gpu_target.roofline_peaks("cpu") is None
  assert gpu_target.roofline_peaks("NVIDIA H100 PCIe") is None  # another memory bandwidth
  compiled = jax.jit(lambda x: x * 2).lower(jax.ShapeDtypeStruct((4,), jnp.float32)).compile()
  assert benchmark.step_roofline(compiled) == {}  # on this CPU


def test_the_benchmark_models_its_step_on_a_known_gpu_and_survives_a_module_it_cannot_read(
    monkeypatch):
  from cav_mae_jax.train import benchmark  # pylint: disable=g-import-not-at-top
  from cav_mae_jax.train import gpu_target  # pylint: disable=g-import-not-at-top
  compiled = jax.jit(lambda x, w: x @ w).lower(
      jax.ShapeDtypeStruct((64, 32), jnp.float32),
      jax.ShapeDtypeStruct((32, 16), jnp.float32)).compile()
  monkeypatch.setattr(gpu_target, "roofline_peaks", lambda kind: _PEAKS)
  figures = benchmark.step_roofline(compiled)
  assert figures["roofline_ms"] == pytest.approx(
      roofline.estimate(compiled.as_text(), _PEAKS)["busy_ms_per_step"])
  assert figures["roofline_ms"] > 0

  def unreadable(text, peaks):
    del text, peaks
    raise ValueError("not an optimized HLO module text (no ENTRY computation)")

  monkeypatch.setattr(roofline, "estimate", unreadable)
  assert benchmark.step_roofline(compiled) == {
      "roofline_error": "ValueError: not an optimized HLO module text (no ENTRY computation)"}


def test_not_an_optimized_module_is_an_error():
  with pytest.raises(ValueError, match="no ENTRY computation"):
    roofline.estimate("HloModule m\n", _PEAKS)


def test_a_compiled_matmul_counts_its_flops_and_at_least_its_arrays():
  compiled = jax.jit(lambda x, w: jnp.tanh(x @ w)).lower(
      jax.ShapeDtypeStruct((256, 512), jnp.float32),
      jax.ShapeDtypeStruct((512, 128), jnp.float32)).compile()
  summary = roofline.estimate(compiled.as_text(), _PEAKS)
  assert summary["flops"] == 2 * 256 * 128 * 512
  assert summary["bytes"] >= 4 * (256 * 512 + 512 * 128 + 256 * 128)


def test_the_tiny_pretraining_step_counts_the_model_flops():
  """On the step XLA compiled (here for the CPU), the products counted are the analytic model
  FLOPs, less the patch embeddings' input gradients (the step computes none: its inputs need no
  gradient) and plus the contrastive similarities (2 B D per sample and pass, which the model
  leaves out)."""
  from cav_mae_jax.train import benchmark  # pylint: disable=g-import-not-at-top
  config = _tiny_config()
  setup = benchmark.setup_train_step(config, 8, jax.devices()[:1])
  summary = roofline.estimate(setup.compile().as_text(), _PEAKS)
  model = config.model
  patches_a = (model.num_mel_bins // 16) * (model.audio_length // 16)
  patches_v = (model.image_size // 16) ** 2
  embeddings = 2 * 16 * 16 * model.embed_dim * (patches_a + 3 * patches_v)
  similarities = 3 * 2 * 8 * model.embed_dim
  assert summary["flops"] / 8 == pytest.approx(
      setup.task.step_flops - embeddings + similarities, rel=1e-9)
  assert summary["categories"]["matmul"] > 0
  assert set(summary["phases"]) <= {"forward", "backward", "update/other"}


def _tiny_config():
  config = pretrain.get_config("tiny")
  config.model.audio_length = 256
  config.model.image_size = 64
  return config


def test_markdown_names_what_the_busy_time_is():
  summary = roofline.estimate(_MODULE, _PEAKS)
  assert profile.markdown(summary, busy_label="modelled").startswith("modelled ")


@target_runs.needs_cuda_plugin
def test_benchmark_tool_models_the_step_on_a_gpu_it_does_not_have(tmp_path):
  """`--cost-analysis --gpu-target=h200` compiles the step for an H200 here and prints its
  roofline: cuDNN attention moves fewer bytes than XLA's (no score matrices in memory)."""
  lines = {attention: target_runs.run_benchmark(
      tmp_path, target_runs.TINY_BF16_ODD + [
          "--cost-analysis", "--gpu-target=h200", f"--config.model.attention_impl={attention}"])
           for attention in ("xla", "cudnn")}
  for attention, (first, second, third, *_) in lines.items():
    assert first.startswith("train step compiled for NVIDIA H200 (no GPU here) over mesh "
                            "{'data': 1, 'fsdp': 1}, batch 8, bfloat16, no remat, attention "
                            f"{attention}: "), first
    assert second.startswith("roofline model (every kernel at the device's peak, 4.80 TB/s"), second
    assert third.startswith("modelled "), third
  moved = {a: float(first.split(" GB/sample moved")[0].rsplit(" ", 1)[1])
           for a, (first, *_) in lines.items()}
  assert moved["cudnn"] < moved["xla"]
  # Over 2 GPUs: the gradients' all-reduce goes over the interconnect.
  first, second = target_runs.run_benchmark(
      tmp_path, ["--config=configs/pretrain.py:tiny", "--batch_size=8", "--cost-analysis",
                 "--gpu-target=h100", "--config.model.audio_length=256",
                 "--config.model.image_size=64", "--config.mesh.data=2",
                 "--config.mesh.fsdp=1"])[:2]
  assert " over mesh {'data': 2, 'fsdp': 1}, batch 8, " in first and first.endswith(" per device")
  assert "; collectives " in second and " GB sent per device at 450 GB/s)" in second, second


_COUNT_TRANSPOSES = """
import sys
from cav_mae_jax.train import gpu_target
gpu_target.prepare()
from cav_mae_jax.models import vit
from cav_mae_jax.train import benchmark
from configs import pretrain
if sys.argv[1] == "unconstrained":
  vit._ROW_MAJOR = None
config = pretrain.get_config("tiny")
with config.unlocked():
  config.model.update(dtype="bfloat16", contrast_group_size=2)
setup = benchmark.setup_train_step(config, 8, gpu_target.devices(gpu_target.TARGETS["h200"], 1))
print(setup.compile(gpu_target.COMPILER_OPTIONS).as_text().count(" transpose("))
"""


@target_runs.needs_cuda_plugin
def test_pooling_the_streams_keeps_them_row_major_on_a_gpu(tmp_path):
  """Compiled for an H200, the tiny pretraining step in bfloat16 with contrast groups: without
  `mean_tokens`' layout constraint XLA keeps the encoder's streams token-minor, a transpose at
  each of their products (219 transposes against 136 on JAX 0.10.2)."""
  from cav_mae_jax.models import vit  # pylint: disable=g-import-not-at-top
  if vit._ROW_MAJOR is None:  # pylint: disable=protected-access
    pytest.skip(f"JAX {jax.__version__} has no layout constraint")
  script = tmp_path / "count.py"
  script.write_text(_COUNT_TRANSPOSES)
  count = {how: int(target_runs.run_python(tmp_path, [str(script), how])[-1])
           for how in ("constrained", "unconstrained")}
  assert count["constrained"] < 0.7 * count["unconstrained"], count


_GEMMS_OF_QKV = r"""
import re
from cav_mae_jax.train import gpu_target
gpu_target.prepare()
from cav_mae_jax.train import benchmark
from configs import pretrain
config = pretrain.get_config("tiny")
with config.unlocked():
  config.model.update(dtype="bfloat16", contrast_group_size=2)
setup = benchmark.setup_train_step(config, 8, gpu_target.devices(gpu_target.TARGETS["h200"], 1))
for line in setup.compile(gpu_target.COMPILER_OPTIONS).as_text().splitlines():
  if "__cublas" in line and "/attn/qkv/" in line and "transpose(jvp" not in line:
    print(re.search(r"= \(?[a-z0-9]+\[([0-9,]+)\]", line).group(1).split(",")[-1])
"""


@target_runs.needs_cuda_plugin
def test_attention_projects_q_k_v_apart_on_a_gpu(tmp_path):
  """Compiled for an H200, the tiny pretraining step in bfloat16: every forward product of an
  attention's qkv projection writes one piece (the model's width), none all three: XLA's dot
  merger has not merged them back (nor the joint block's three streams into one product)."""
  script = tmp_path / "gemms.py"
  script.write_text(_GEMMS_OF_QKV)
  widths = [int(w) for w in target_runs.run_python(tmp_path, [str(script)])]
  m = pretrain.get_config("tiny").model
  # Attention calls: each modality's own blocks, the joint blocks on three streams, the decoder.
  encoder_calls = 2 * m.modality_specific_depth + 3 * (m.encoder_depth - m.modality_specific_depth)
  expected = [m.embed_dim] * 3 * encoder_calls + [m.decoder_embed_dim] * 3 * m.decoder_depth
  assert sorted(widths, reverse=True) == expected, widths  # 5 x 192 and 1 x 96 when merged
