"""train/benchmark.py: XLA's count of the compiled train step stays near the model FLOPs."""

import importlib.util

import jax
import jax.numpy as jnp
import pytest

from cav_mae_jax import models
from cav_mae_jax.train import array_input
from cav_mae_jax.train import benchmark
from cav_mae_jax.train import flops
from configs import pretrain
import target_runs
import xla_flags

# XLA counts the elementwise work too (LayerNorm, GELU, softmax, noise, Adam): about 7% above the
# model FLOPs for the tiny model on short inputs, 2% for base. An extra forward, dense work on
# masked tokens or a recomputation (remat) goes beyond the band.
FLOPS_BAND = (1.0, 1.12)


def _tiny_config(**model):
  config = pretrain.get_config("tiny")
  config.model.audio_length, config.model.image_size = 256, 64
  config.data.noise_on_device = True  # the accelerator recipes' step
  for key, value in model.items():
    config.model[key] = value
  return config


def test_xla_flops_counts_a_matmul():
  compiled = jax.jit(jnp.matmul).lower(jax.ShapeDtypeStruct((8, 16), jnp.float32),
                                       jax.ShapeDtypeStruct((16, 4), jnp.float32)).compile()
  assert flops.xla_flops(compiled) == 2 * 8 * 16 * 4


@pytest.fixture(scope="module")
def plain_step():
  """The tiny train step compiled for one device as users' programs compile (XLA's default
  emitters, not the suite's cheaper ones), and its setup (compiled once per module)."""
  setup = benchmark.setup_train_step(_tiny_config(), 8, jax.devices()[:1])
  return setup, setup.compile(xla_flags.native_compile_options())


def test_compiled_step_flops_stay_near_the_model_flops(plain_step):
  cost = benchmark.step_cost(plain_step[1], plain_step[0])
  assert cost["model_gflop_per_sample_step"] == pytest.approx(
      flops.pretrain_step_flops(_tiny_config().model) / 1e9)
  assert FLOPS_BAND[0] <= cost["xla_over_model_flops"] <= FLOPS_BAND[1], cost


def _forward_flops_ratio(**variant):
  """XLA's FLOPs of the tiny pretraining forward (audio 64 frames, image 32 pixels) over the
  model's count."""
  config = pretrain.get_config("tiny")
  config.model.update(audio_length=64, image_size=32, **variant)
  model_config = models.ModelConfig.from_config(config.model)
  model, batch = models.CAVMAE(model_config), 4
  clips = array_input.random_clips(batch, 64, model_config.num_mel_bins, 32)
  params = jax.eval_shape(lambda rng: models.init_params(model_config, rng),
                          jax.random.PRNGKey(0))
  forward = jax.jit(lambda p, a, i, rng: model.apply({"params": p}, a, i, rngs={"mask": rng}))
  compiled = forward.lower(params, clips["audio"], clips["image"], jax.random.PRNGKey(1)).compile()
  return flops.xla_flops(compiled) / batch / flops.pretrain_forward_flops(config.model)


def test_the_model_flops_of_a_variant_count_what_it_runs():
  """A variant runs only the streams its losses need; the count had every stream of CAV-MAE
  (vanilla AV-MAE's MFU came out 1.4x too high at base size). XLA's count of a variant's forward
  sits above the model FLOPs by the elementwise work, as CAV-MAE's does: here 1.17 for CAV-MAE,
  AV-MAE and vanilla AV-MAE, 1.13 for CAV (1.01, 0.80 and 0.92 when every stream was counted)."""
  reference = _forward_flops_ratio()
  for variant in (dict(lambda_c=0.0),  # AV-MAE
                  dict(lambda_c=0.0, modality_specific_depth=0),  # vanilla AV-MAE
                  dict(lambda_mae=0.0)):  # CAV
    assert abs(_forward_flops_ratio(**variant) - reference) < 0.08, variant


def test_recomputed_work_leaves_the_band(plain_step):
  """remat recomputes most of the forward in the backward pass: the band catches such work.

  Keeping the matmul outputs (remat_policy='dots_saveable') recomputes only the elementwise
  work, so it costs fewer FLOPs than full remat.
  """
  plain = benchmark.step_cost(plain_step[1], plain_step[0])
  full = benchmark.compiled_step_cost(_tiny_config(remat=True), batch_size=8)
  dots = benchmark.compiled_step_cost(
      _tiny_config(remat=True, remat_policy="dots_saveable"), batch_size=8)
  assert full["xla_over_model_flops"] > FLOPS_BAND[1], full
  assert plain["xla_over_model_flops"] < dots["xla_over_model_flops"] < full[
      "xla_over_model_flops"], (plain, dots, full)


def test_compiled_step_donates_the_state_and_moves_tokens_without_scatter(plain_step):
  """Every state buffer is donated (updated in place), and the masking's token gathers have
  gathers as their gradient: the one scatter left is the contrast diagonal's ([G, g, g])."""
  setup, compiled = plain_step
  hlo = compiled.as_text()
  header = hlo.splitlines()[0]
  assert header.count("-alias)") == len(jax.tree.leaves(setup.abstract_state)) > 100
  scatters = [line for line in hlo.splitlines() if " scatter(" in line]
  assert len(scatters) <= 1 and all("diagonal" in line for line in scatters), scatters


def test_benchmark_tool_profiles_the_step(tmp_path):
  """`tools/benchmark.py --profile DIR`: the trace lands in DIR and the tables are printed."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(
      [sys.executable, os.path.join(root, "tools", "benchmark.py"),
       "--config=configs/pretrain.py:tiny", "--batch_size=8", "--steps=1", "--warmup=1",
       "--config.model.audio_length=256", "--config.model.image_size=64",
       f"--profile={tmp_path / 'trace'}"],
      cwd=tmp_path, env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu",
                             XLA_FLAGS=xla_flags.xla_flags()),  # one device: a cheaper compile
      capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "| category | ms/step | share |" in done.stdout and "| backward |" in done.stdout
  assert list((tmp_path / "trace").glob("**/perfetto_trace.json.gz"))


def test_benchmark_tool_prints_what_the_backward_keeps_and_xlas_plan(tmp_path):
  """`tools/benchmark.py --memory-analysis`: residuals per sample, for the batch and per device
  (the test session's 8 CPU devices), then XLA's plan over the config's mesh."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(
      [sys.executable, os.path.join(root, "tools", "benchmark.py"),
       "--config=configs/pretrain.py:tiny", "--batch_size=8", "--memory-analysis",
       "--config.model.audio_length=256", "--config.model.image_size=64",
       "--config.model.remat=True", "--config.model.remat_policy=attention_only"],
      cwd=tmp_path, env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  keeps, plan = done.stdout.strip().splitlines()[-2:]
  assert keeps.startswith("what the backward keeps (float32, remat attention_only): ")
  assert "GiB for the batch of 8, " in keeps and keeps.endswith(" GiB per device over 8 devices")
  assert plan.startswith("XLA's plan of the compiled step on cpu over mesh {'data': 8, 'fsdp': 1}")


_BAD_FLAGS = [
    # (arguments, the one error line's text): a range, a combination whose flag would be ignored
    (["--steps=-1", "--warmup=0"], "flag --steps=-1: -1 is not a positive integer"),
    (["--steps=0"], "flag --steps=0: 0 is not a positive integer"),  # was: 20 steps
    (["--batch_size=0"], "flag --batch_size=0: 0 is not a positive integer"),  # was: the config's
    (["--warmup=-1"], "flag --warmup=-1: -1 is not a non-negative integer"),
    (["--input-only", "--cost-analysis"], "--input-only, --cost-analysis: give at most one of "
     "--input-only, --cost-analysis, --memory-analysis"),
    (["--cost-analysis", "--profile=trace"], "--profile applies to the timed train step (no mode "
     "flag), not to --cost-analysis"),
    (["--samples=100"], "--samples applies to --input-only, not to the timed train step"),
    (["--memory-analysis", "--steps=5"], "--steps applies to the timed train step (no mode flag) "
     "and --input-only, not to --memory-analysis"),
    (["--gpu-target=h200"], "--gpu-target applies to --cost-analysis and --memory-analysis, not "
     "to the timed train step (no mode flag)"),
    (["--input-only", "--gpu-target=h100"], "--gpu-target applies to --cost-analysis and "
     "--memory-analysis, not to --input-only"),
    (["--memory-analysis", "--gpu-target=a100"], "flag --gpu-target=a100: value should be one of "
     "<h100|h200>"),
    (["--tpu-target=v5e"], "--tpu-target applies to --cost-analysis and --memory-analysis, not "
     "to the timed train step (no mode flag)"),
    (["--memory-analysis", "--tpu-target=v4"], "flag --tpu-target=v4: value should be one of "
     "<v5e|v5p|v6e>"),
    (["--memory-analysis", "--gpu-target=h100", "--tpu-target=v5e"], "--gpu-target, "
     "--tpu-target: give at most one"),
]


@pytest.mark.parametrize("args, line", _BAD_FLAGS, ids=[" ".join(a) for a, _ in _BAD_FLAGS])
def test_benchmark_tool_refuses_bad_flags_before_building_the_step(tmp_path, args, line):
  """One line `error: ...` naming the flag, exit 2, before the step is built: an `optax` on
  PYTHONPATH that ends the process stands for the train step's imports (and the input
  pipeline's TensorFlow comes later still)."""
  _check_refused_before_the_step(tmp_path, args, line)


_MISSING_COMPILERS = [
    # (the module a target needs, arguments, the one error line's text)
    ("jax_cuda12_plugin", ["--memory-analysis", "--gpu-target=h200"],
     "--gpu-target needs JAX's CUDA plugin (pip install -e \".[cuda]\"; no GPU is needed), "
     "which is not installed here"),
    ("libtpu", ["--cost-analysis", "--tpu-target=v5p"],
     "--tpu-target needs JAX's TPU library (pip install -e \".[tpu]\"; no TPU is needed), "
     "which is not installed here"),
]


@pytest.mark.parametrize("module, args, line", _MISSING_COMPILERS,
                         ids=[m for m, _, _ in _MISSING_COMPILERS])
def test_a_target_without_its_compiler_is_one_error_line(tmp_path, module, args, line):
  if importlib.util.find_spec(module) is not None:
    pytest.skip(f"{module} is installed here")
  _check_refused_before_the_step(tmp_path, args, line)


def _check_refused_before_the_step(tmp_path, args, line):
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  tripwire = tmp_path / "tripwire" / "optax"
  tripwire.mkdir(parents=True)
  (tripwire / "__init__.py").write_text("raise SystemExit('optax was imported')\n")
  done = subprocess.run(
      [sys.executable, os.path.join(root, "tools", "benchmark.py"),
       "--config=configs/pretrain.py:tiny", "--config.model.audio_length=256",
       "--config.model.image_size=64", *args],
      cwd=tmp_path, env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(tripwire.parent), root]),
                             JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=120, check=False)
  lines = done.stderr.splitlines()
  assert done.returncode == 2 and len(lines) == 1, (done.returncode, done.stderr[-3000:])
  assert lines[0].startswith(f"error: {line}"), lines[0]
  assert not done.stdout


def test_benchmark_refuses_no_timed_step_before_compiling():
  """steps=0 would divide by zero (and a negative count printed negative rates)."""
  with pytest.raises(ValueError, match=r"steps=0: must be >= 1"):
    benchmark.benchmark_train_step(_tiny_config(), batch_size=8, steps=0, warmup=1)
  with pytest.raises(ValueError, match=r"warmup=-1: must be >= 0"):
    benchmark.benchmark_torch(_tiny_config(), batch_size=8, steps=1, warmup=-1)


def test_a_step_out_of_device_memory_is_reported_not_raised(monkeypatch):
  """XLA's allocation failure while the step runs is the result `jax/does_not_fit` (in its own
  words, as the trainer reports it: `errors.out_of_memory`), with the compiled step's figures."""
  def run_out_of_memory(*args):
    del args
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                     "9.50GiB.\nBufferAssignment OOM Debugging.")
  monkeypatch.setattr(benchmark, "_time_compiled_step", run_out_of_memory)
  result = benchmark.benchmark_train_step(_tiny_config(), batch_size=8, steps=1, warmup=0)
  assert result["jax/does_not_fit"] == ("out of device memory: Out of memory while trying to "
                                        "allocate 9.50GiB.")
  assert result["jax/compile_s"] > 0 and "jax/samples_per_s" not in result


@pytest.mark.parametrize("arg", ["tiny", "tiny,probe"])
def test_finetuning_and_probe_steps_run_on_random_labels(arg):
  """The benchmark times any task: fine-tuning and probing get one-hot labels with the clips.

  The probe's step is the encoder's forward and the head's backward: on these short inputs the
  elementwise work is a larger share of it (x1.15; x1.02 for base), but a backward pass through
  the frozen encoder would more than double its FLOPs.
  """
  from configs import finetune  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  config = finetune.get_config(arg)
  config.model.audio_length, config.model.image_size = 256, 64
  # No warm-up step (warmup=0 once ended in an UnboundLocalError): the step is compiled first.
  result = benchmark.benchmark_train_step(config, batch_size=8, steps=1, warmup=0)
  assert result["jax/samples_per_s"] > 0 and result["jax/loss"] > 0
  assert 1.0 <= result["xla_over_model_flops"] <= 1.2, result


def _attention_scores_per_sample(model) -> int:
  """Elements of every [H, N, N] attention score array of one sample's pretraining forward."""
  p = model.patch_size
  audio = (model.num_mel_bins // p) * (model.audio_length // p)
  video = (model.image_size // p) ** 2
  kept_a, kept_v = int(audio * (1 - model.mask_ratio_a)), int(video * (1 - model.mask_ratio_v))
  specific = model.modality_specific_depth
  joint = model.encoder_depth - specific
  encoder = specific * (kept_a**2 + kept_v**2) + joint * (
      (kept_a + kept_v)**2 + kept_a**2 + kept_v**2)  # the joint blocks see three streams
  return (model.num_heads * encoder +
          model.decoder_num_heads * model.decoder_depth * (audio + video)**2)


def test_attention_only_remat_keeps_everything_but_the_attention_scores():
  """remat_policy='attention_only' drops, per sample, exactly the float32 softmax output and
  the bfloat16 probabilities of every attention (plus the softmax's small per-row statistics);
  full remat keeps far less. What the backward keeps grows linearly with the batch."""
  plain = benchmark.saved_activations(_tiny_config(dtype="bfloat16"))
  attention_only = benchmark.saved_activations(
      _tiny_config(dtype="bfloat16", remat=True, remat_policy="attention_only"))
  full = benchmark.saved_activations(_tiny_config(dtype="bfloat16", remat=True))
  scores = _attention_scores_per_sample(_tiny_config().model) * (4 + 2)
  dropped = (plain["saved_gib_per_sample"] - attention_only["saved_gib_per_sample"]) * 2**30
  assert scores <= dropped <= 1.02 * scores, (dropped, scores)
  assert attention_only["saved_fixed_gib"] == plain["saved_fixed_gib"]
  assert 0 < full["saved_gib_per_sample"] < attention_only["saved_gib_per_sample"] / 2


@target_runs.needs_cuda_plugin
def test_benchmark_tool_plans_the_step_on_a_gpu_it_does_not_have(tmp_path):
  """`--memory-analysis --gpu-target=h200` compiles the step for an H200 on this host and prints
  the GPU compiler's plan; cuDNN attention compiles for it on odd-length streams, which JAX's
  cuDNN path refuses untreated."""
  plans = {attention: target_runs.run_benchmark(
      tmp_path, target_runs.TINY_BF16_ODD + [
          "--memory-analysis", "--gpu-target=h200",
          f"--config.model.attention_impl={attention}"])[-1] for attention in ("xla", "cudnn")}
  for attention, plan in plans.items():
    assert plan.startswith("XLA's plan of the step compiled for NVIDIA H200 (140.4 GiB; no GPU "
                           "here) over mesh {'data': 1, 'fsdp': 1}, batch 8, bfloat16, no remat, "
                           f"attention {attention}: "), plan
    assert plan.endswith(": fits"), plan
