"""The train step compiled for TPU chips that are not here (`cav_mae_jax/train/tpu_target.py`).

The compiles need JAX's TPU library (libtpu, `pip install -e '.[tpu]'`) and skip without it; they
run at XLA's lowest optimization effort (`JAX_EXEC_TIME_OPTIMIZATION_EFFORT=-1`): about 20 s for
the tiny step against 3 minutes at the default. XLA:TPU then fuses and schedules the same step
differently, so the figures are not compared with those of the tools' default effort.
"""

import importlib.util

import pytest

from cav_mae_jax.train import tpu_target

import target_runs

_FAST = {"JAX_EXEC_TIME_OPTIMIZATION_EFFORT": "-1"}


@pytest.mark.parametrize("name, chips, topology, bounds", [
    ("v5e", 1, "v5e:1x1", [1, 1, 1]), ("v5e", 2, "v5e:2x1", [2, 1, 1]),
    ("v6e", 4, "v6e:2x2", [2, 2, 1]), ("v6e", 8, "v6e:2x4", [2, 4, 1]),
    ("v5p", 1, "v5p:1x1x1", [1, 1, 1]), ("v5p", 4, "v5p:2x2x1", [2, 2, 1]),
])
def test_a_hosts_chips_as_libtpu_names_them(name, chips, topology, bounds):
  assert tpu_target.TARGETS[name].topology(chips) == (topology, bounds)


@pytest.mark.parametrize("name, chips, counts", [
    ("v5e", 3, "1, 2, 4, 8"), ("v5e", 16, "1, 2, 4, 8"), ("v5p", 8, "1, 2, 4")])
def test_a_mesh_one_host_does_not_hold_is_refused_naming_the_mesh(name, chips, counts):
  with pytest.raises(ValueError) as e:
    tpu_target.TARGETS[name].topology(chips)
  assert str(e.value) == (f"--tpu-target={name}: the mesh has {chips} devices; one {name} host "
                          f"is planned for {counts} chips (config.mesh.data x config.mesh.fsdp)")


def test_prepare_without_libtpu_says_how_to_install_it(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else object())
  with pytest.raises(ValueError) as e:
    tpu_target.prepare()
  assert str(e.value) == ("--tpu-target needs JAX's TPU library (pip install -e \".[tpu]\"; no "
                          "TPU is needed), which is not installed here")


@target_runs.needs_libtpu
def test_benchmark_tool_plans_the_step_on_tpu_chips_it_does_not_have(tmp_path):
  """XLA:TPU's plan per chip over 2 v5e chips with the parameters split (FSDP), and, at a batch
  no chip holds, the compiler's own sentence on what the step needs."""
  args = ["--config=configs/pretrain.py:tiny", "--memory-analysis", "--tpu-target=v5e",
          "--config.model.dtype=bfloat16", "--config.mesh.data=1", "--config.mesh.fsdp=2"]
  plan, = target_runs.run_benchmark(tmp_path, args + ["--batch_size=8"], **_FAST)[-1:]
  assert plan.startswith("XLA:TPU's plan of the step compiled for v5e (TPU v5 lite, 16 GiB of "
                         "HBM; no TPU here) over mesh {'data': 1, 'fsdp': 2}, batch 8, bfloat16, "
                         "no remat, attention xla: "), plan
  assert ": fits (XLA:TPU assigns the chip's memory as it compiles); XLA:TPU " in plan, plan
  assert " GFLOP/sample vs model " in plan, plan
  assert plan.endswith(")") and "collective matmuls" not in plan, plan  # none over 2 chips
  refused, = target_runs.run_benchmark(tmp_path, args + ["--batch_size=8192"], **_FAST)[-1:]
  assert refused.startswith("XLA:TPU's compile for 2 v5e chips (16 GiB of HBM each; no TPU "
                            "here), batch 8192: does not fit: "), refused
  assert "HBM" in refused.split(": does not fit: ")[1], refused


@target_runs.needs_libtpu
def test_benchmark_tool_counts_the_steps_flops_on_a_tpu_chip(tmp_path):
  """XLA:TPU's FLOPs per sample of the tiny step against the model's: the compiled program does
  the model's products and little else."""
  line, = target_runs.run_benchmark(
      tmp_path, ["--config=configs/pretrain.py:tiny", "--batch_size=8", "--cost-analysis",
                 "--tpu-target=v6e", "--config.mesh.data=1", "--config.mesh.fsdp=1"],
      **_FAST)[-1:]
  assert line.startswith("train step compiled for v6e (TPU v6 lite; no TPU here) over mesh "
                         "{'data': 1, 'fsdp': 1}, batch 8, float32, no remat, attention xla: "
                         "XLA:TPU "), line
  ratio = float(line.split("(x")[1].split(")")[0])
  assert 1.0 <= ratio <= 1.25, line


@target_runs.needs_libtpu
def test_collective_matmuls_are_named_where_they_make_the_count_low(tmp_path):
  """Over 8 chips with the parameters split 8 ways, XLA:TPU runs products as collective matmuls
  (loops whose body its cost analysis counts once): the count comes out near or below the
  model's, and the line says why."""
  line, = target_runs.run_benchmark(
      tmp_path, ["--config=configs/pretrain.py:tiny", "--batch_size=64", "--cost-analysis",
                 "--tpu-target=v5e", "--config.model.dtype=bfloat16", "--config.mesh.data=1",
                 "--config.mesh.fsdp=8"], **_FAST)[-1:]
  loops = int(line.split(") (")[1].split(" products run as collective matmuls")[0])
  assert loops > 0, line
  assert ("products run as collective matmuls, loops whose body XLA:TPU's count takes once, so "
          "the count is below what runs: compare it only with a count on the same mesh); ") in line


def test_collective_matmul_loops_are_counted_from_the_compiled_program():
  hlo = """
ENTRY %main {
  %while.25 = (bf16[8,64]{1,0}, s32[]) while(%tuple.984), condition=%wide.windowed_dot_general_cond_ag.1, body=%wide.windowed_dot_general_body_ag.1
  %while.3 = (bf16[8,64]{1,0}, s32[]) while(%tuple.7), condition=%wide.windowed_dot_general_cond_rs.12, body=%wide.windowed_dot_general_body_rs.12
  %while.4 = (f32[4]{0}, s32[]) while(%tuple.8), condition=%cond_fun.2, body=%body_fun.2
  %fusion.1 = bf16[8,64]{1,0} fusion(%p), kind=kLoop, calls=%windowed_dot_general_helper
}
"""
  assert tpu_target.collective_matmul_loops(hlo) == 2
