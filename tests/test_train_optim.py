"""Tests of the optimizer, schedules, mesh shapes/shardings and FLOP counts."""

import collections

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cav_mae_jax.models.config import model_config
from cav_mae_jax.train import flops
from cav_mae_jax.train import mesh as mesh_lib
from cav_mae_jax.train import optim


def _optim_config(**overrides):
  values = dict(b1=0.95, b2=0.999, eps=1e-8, weight_decay=5e-7, grad_clip_norm=0.0)
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def test_multistep_matches_torch_multisteplr_per_epoch():
  # torch: MultiStepLR(milestones=range(10, 1000, 5), gamma=0.5), scheduler.step() after each
  # epoch, so epochs 0..9 (0-based) use lr, 10..14 lr/2, 15..19 lr/4, 20..24 lr/8.
  schedule = optim.multistep_schedule(1.0, steps_per_epoch=3, first_decay_epoch=10,
                                      decay_every_epochs=5, decay_factor=0.5)
  expected = {0: 1.0, 29: 1.0, 30: 0.5, 44: 0.5, 45: 0.25, 60: 0.125, 74: 0.125}
  for step, lr in expected.items():
    assert float(schedule(step)) == pytest.approx(lr), step


def test_adam_with_coupled_l2_matches_hand_computation():
  params = {"w": jnp.array([1.0, -2.0]), "pos": jnp.array([3.0])}
  grads = {"w": jnp.array([0.5, 0.25]), "pos": jnp.array([7.0])}
  trainable = {"w": True, "pos": False}
  wd, lr = 0.1, 0.01
  tx = optim.make_optimizer(_optim_config(weight_decay=wd), lr, trainable)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  # First Adam step: m_hat = g', v_hat = g'^2 with g' = g + wd * p  =>  update = -lr * sign(g').
  g = np.array([0.5, 0.25]) + wd * np.array([1.0, -2.0])
  np.testing.assert_allclose(updates["w"], -lr * g / (np.abs(g) + 1e-8), rtol=1e-4)
  np.testing.assert_array_equal(updates["pos"], [0.0])  # frozen: no update, no decay
  updates, _ = tx.update(grads, state, params)
  g2 = g  # same gradient and params: m_hat = g, v_hat = g^2 again
  np.testing.assert_allclose(updates["w"], -lr * g2 / (np.abs(g2) + 1e-8), rtol=1e-4)


def test_gradient_clipping_ignores_frozen():
  params = {"w": jnp.zeros(2), "pos": jnp.zeros(1)}
  grads = {"w": jnp.array([3.0, 4.0]), "pos": jnp.array([100.0])}
  trainable = {"w": True, "pos": False}
  # b1 = b2 = 0 and a huge eps make Adam linear: update = -lr * g / (|g| + eps) ~ -g here.
  tx = optim.make_optimizer(
      _optim_config(grad_clip_norm=1.0, weight_decay=0.0, b1=0.0, b2=0.0, eps=1e6), 1e6,
      trainable)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Clipped to norm 1 over the trainable gradients only (the frozen 100 would give 0.03, 0.04).
  np.testing.assert_allclose(updates["w"], [-0.6, -0.8], rtol=1e-5)
  np.testing.assert_array_equal(updates["pos"], [0.0])
  assert float(optim.trainable_global_norm(grads, trainable)) == pytest.approx(5.0)


def test_warmup_cosine():
  config = ml_collections.ConfigDict(dict(
      optim=dict(learning_rate=2.0),
      schedule=dict(kind="warmup_cosine", warmup_epochs=1.0, final_lr_fraction=0.0)))
  schedule = optim.make_schedule(config, steps_per_epoch=10, total_steps=110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(2.0)
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("data,fsdp,expected", [
    (-1, 1, (8, 1)), (4, 2, (4, 2)), (-1, 2, (4, 2)), (1, -1, (1, 8))])
def test_mesh_shape(data, fsdp, expected):
  config = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp))
  assert mesh_lib.mesh_shape(config, 8) == expected


@pytest.mark.parametrize("data,fsdp,field", [
    (3, 2, "config.mesh"), (-1, 3, "config.mesh"), (-1, -1, "config.mesh.data"),
    (0, 8, "config.mesh.data")])
def test_mesh_shape_errors_name_the_field(data, fsdp, field):
  with pytest.raises(ValueError, match=field):
    mesh_lib.mesh_shape(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp)), 8)


def test_process_major_groups_each_process_s_devices_in_order():
  """Hosts of a TPU torus interleaved along the batch (data=4 x fsdp=2 over 4 hosts of 2)."""
  fake = collections.namedtuple("FakeDevice", "id process_index")

  def grid_of(devices):
    grid = np.empty(len(devices), dtype=object)
    grid[:] = devices
    return grid.reshape(4, 2)

  grid = mesh_lib.process_major(grid_of([fake(i, p) for i, p in
                                         enumerate([0, 1, 0, 1, 2, 3, 2, 3])]))
  assert grid.shape == (4, 2)
  assert [(d.process_index, d.id) for d in grid.reshape(-1)] == [
      (0, 0), (0, 2), (1, 1), (1, 3), (2, 4), (2, 6), (3, 5), (3, 7)]
  ordered = grid_of([fake(i, i // 2) for i in range(8)])
  assert mesh_lib.process_major(ordered) is ordered


def test_param_shardings_split_over_fsdp():
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=2)))
  tree = {"big": jax.ShapeDtypeStruct((64, 96), jnp.float32),
          "conv": jax.ShapeDtypeStruct((4, 4, 3, 512), jnp.float32),
          "stream": jax.ShapeDtypeStruct((4, 512, 64), jnp.float32),
          "odd": jax.ShapeDtypeStruct((63, 65), jnp.float32),
          "small": jax.ShapeDtypeStruct((8,), jnp.float32)}
  shardings = mesh_lib.tree_shardings(mesh, tree)
  assert shardings["big"].spec == jax.sharding.PartitionSpec("fsdp", None)  # a kernel's `in`
  # A conv kernel [h, w, in, out] along `out` (along h XLA's partitioner changed the forward),
  # any array other than 2-D along its largest dimension.
  assert shardings["conv"].spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
  assert shardings["stream"].spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert shardings["odd"].spec == jax.sharding.PartitionSpec()
  assert shardings["small"].spec == jax.sharding.PartitionSpec()
  batch = mesh_lib.global_batch({"x": np.arange(16.0).reshape(8, 2)}, mesh)
  assert batch["x"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  assert len(batch["x"].addressable_shards) == 8


def test_base_flops_match_reference():
  model = model_config("base")
  # docs/original.md: encoder 33.4 + decoder 43.8 + embeddings/heads ~0.9 = 78.1 GFLOP per sample.
  assert flops.pretrain_forward_flops(model) / 1e9 == pytest.approx(78.1, abs=0.1)
  assert flops.pretrain_step_flops(model) / 1e9 == pytest.approx(234.3, abs=0.3)
  # CAV runs no decoder and no joint audio+video stream (the decoder's input): one joint block
  # on 128 + 49 kept tokens, 2.6 GFLOP; AV-MAE runs no audio-only and video-only streams (the
  # contrastive loss's): one block on 128 and one on 49 tokens, 2.56 GFLOP.
  cav = model_config("base", lambda_mae=0.0)
  assert flops.pretrain_forward_flops(cav) / 1e9 == pytest.approx(78.1 - 43.8 - 0.43 - 2.6,
                                                                  abs=0.1)
  avmae = model_config("base", lambda_c=0.0)
  assert flops.pretrain_forward_flops(avmae) / 1e9 == pytest.approx(78.1 - 2.56, abs=0.1)
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("cpu") is None


def test_checkpointer_accepts_a_relative_workdir(tmp_path, monkeypatch):
  """tools/demo.sh and users pass relative workdirs; orbax itself needs absolute paths."""
  from cav_mae_jax.train import checkpoint
  monkeypatch.chdir(tmp_path)
  config = ml_collections.ConfigDict(dict(every_steps=1, keep=2, async_save=True, every_epoch=False))
  ckpt = checkpoint.Checkpointer("relative/checkpoints", config)
  state = {"w": jnp.arange(4.0)}
  ckpt.save(3, state, {"epoch": 0})
  ckpt.wait()
  restored, input_state = ckpt.restore(3, jax.eval_shape(lambda: state))
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert input_state == {"epoch": 0} and (tmp_path / "relative/checkpoints/3").is_dir()
  ckpt.close()
