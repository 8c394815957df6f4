"""ViT building blocks with the original CAV-MAE's parameter names and numerics.

Numerics follow the original (torch defaults): LayerNorm eps 1e-5 with two-pass variance, exact
erf GELU, xavier-uniform Linear weights with zero bias, attention softmax in float32; the
patch-embedding convs keep torch's default bias init.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

Dtype = Any
LAYER_NORM_EPS = 1e-5


def _half_precision(dtype: Dtype) -> bool:
  """Whether `dtype` is a half-precision float (bfloat16, float16): what `LayerNorm`, `gelu` and
  `mean_tokens` compute differently from float32."""
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4


dense_init = nn.initializers.xavier_uniform()
# The original initializes the patch-embedding conv like a Linear on the flattened kernel:
# fan_in = p * p * C, fan_out = D (not the conv default that multiplies fan_out by p * p).
patch_kernel_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                                     out_axis=-1)


def patch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """torch's default Conv2d bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = p * p * C.

  The original re-initializes only the patch convs' kernels (and every Linear and LayerNorm), so
  their biases keep this draw: +-1/16 for audio (C = 1), +-1/sqrt(768) for video (C = 3).
  """
  bound = fan_in**-0.5

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class LayerNorm(nn.LayerNorm):
  """flax's `nn.LayerNorm`: the same parameters, initial values and forward (bit for bit), whose
  backward on a half-precision output is written out (`_layer_norm_rows`): in float32, keeping
  only the input and its float32 row mean and 1/std; on float32 (or with options other than a
  two-pass LayerNorm over the last axis with scale and bias) it is flax's, with autodiff's
  gradient.

  Autodiff's backward through flax's LayerNorm recomputes the row mean, which stops XLA fusing
  the scale gradient's product into its sum over the rows: it writes the product (float32, twice
  the input's bytes) and reads it back. Compiled for an H200 (base pretraining in bfloat16,
  batch 120, cuDNN attention) a decoder LayerNorm's backward moved 0.96 GB in four kernels, here
  0.53 in two (one also adds the residual's gradient), forward and backward 1.22 GB against 0.88;
  the step's roofline model 49.0 -> 47.1 ms. The input gradient is as close to float32's as
  autodiff's or closer (x ~ N(1, 9): 0.16% against 0.24%).
  """

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None) -> jax.Array:
    plain = (self.reduction_axes in (-1, (-1,)) and self.feature_axes in (-1, (-1,))
             and self.use_scale and self.use_bias and not self.use_fast_variance
             and self.axis_name is None and mask is None)
    # A half-precision output only where `dtype` says so (flax's default promotes to float32).
    if not (_half_precision(self.dtype) and plain):
      return _flax_layer_norm(self, x, mask=mask)
    features = (x.shape[-1],)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    return _layer_norm_rows(x, scale, bias, self.epsilon, jnp.dtype(self.dtype))


# flax's LayerNorm body, run inside our own call: through `super().__call__` flax would count a
# second call of the module (`capture_intermediates` records both).
_flax_layer_norm = getattr(nn.LayerNorm.__call__, "__wrapped__", nn.LayerNorm.__call__)


def layer_norm(name: str, dtype: Dtype) -> LayerNorm:
  """A torch-equivalent LayerNorm (eps 1e-5, exact two-pass variance, float32 params)."""
  return LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype,
                   param_dtype=jnp.float32, name=name)


def _row_stats(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x in float32, its last axis's mean and 1 / sqrt(two-pass variance + eps), computed as
  flax's `nn.LayerNorm(use_fast_variance=False)` computes them."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jax.lax.square(x - mean).mean(-1, keepdims=True)
  return x, mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm_rows(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float,
                     dtype: Dtype) -> jax.Array:
  """LayerNorm over x's last axis with float32 `scale` and `bias`, computed in float32 and cast
  to `dtype` (flax's order of operations)."""
  return _layer_norm_fwd(x, scale, bias, eps, dtype)[0]


def _layer_norm_fwd(x, scale, bias, eps, dtype):
  x32, mean, rstd = _row_stats(x, eps)
  return ((x32 - mean) * (rstd * scale) + bias).astype(dtype), (x, mean, rstd, scale)


def _layer_norm_bwd(eps, dtype, residuals, g):
  del eps, dtype
  # The barrier keeps XLA from reusing the forward's float32 values here (it would keep them
  # from the forward instead of x, and its kernels came out slower: 48.8 ms against 47.1).
  x, mean, rstd, scale = jax.lax.optimization_barrier(residuals)
  g = g.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mean) * rstd
  rows = tuple(range(x.ndim - 1))
  d_scale, d_bias = jnp.sum(g * xhat, rows), jnp.sum(g, rows)
  gs = g * scale
  dx = rstd * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
  return dx.astype(x.dtype), d_scale, d_bias


_layer_norm_rows.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def add_param(x: jax.Array, param: jax.Array) -> jax.Array:
  """`x + param`, `param` (float32) broadcast over `x`'s leading axes in float32 and then cast to
  `x`'s dtype.

  The forward is `x + param.astype(x.dtype)`. The order matters for the gradient: the transpose
  of a broadcast is a sum over the broadcast axes, and cast-then-broadcast sums the cotangent in
  `x`'s dtype, where XLA accumulates a bfloat16 sum in bfloat16 (the base model's bias gradients
  came out 5% off float32's at batch 8 on a CPU, the audio patch embedding's 15%), while
  broadcast-then-cast casts the cotangent to float32 first and sums in float32 (0.5-0.9% off, as
  every other gradient), as torch's autocast does.
  """
  return x + jnp.broadcast_to(param, x.shape).astype(x.dtype)


def _product(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x @ kernel over x's last axis (a Linear's product, in the operands' dtype)."""
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


class Dense(nn.Module):
  """A torch-equivalent Linear (xavier-uniform kernel, zero bias, float32 params), computed in
  `dtype`: flax's `nn.Dense` with the bias added by `add_param` (its bias gradient is summed
  in float32 under bfloat16 compute; parameters, their initial values and the forward are
  `nn.Dense`'s)."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", dense_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return add_param(_product(x.astype(self.dtype), kernel.astype(self.dtype)), bias)


class SplitDense(nn.Module):
  """A torch-equivalent Linear to `parts * features` whose output is used in `parts` equal
  pieces (the attention's fused qkv projection): `Dense(parts * features)`'s parameters and
  initial values; returns the pieces, each [..., features].

  In float32 it is `Dense`'s one product, split (bit for bit as before). In half precision each
  piece is its own product with its slice of the kernel, so that no [..., parts * features]
  output is written and then copied apart: compiled for an H200 (base pretraining in bfloat16,
  batch 120, cuDNN attention) a decoder block's q/k/v split moved 0.52 GB forward and its
  backward concatenation as much, and the step's roofline model goes from 47.1 to 45.7 ms. The
  products' operands pass an optimization barrier first (`_apart_products`), or XLA's dot merger
  would merge them back into one (those sharing the input, and the joint block's calls on its
  three streams, which share the kernel). Over an `fsdp` mesh the pieces are each device's own
  because `mesh.fsdp_spec` splits the kernel along its input features.
  """

  features: int
  parts: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    total = self.parts * self.features
    kernel = self.param("kernel", dense_init, (x.shape[-1], total), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (total,), jnp.float32)
    if not _half_precision(self.dtype):
      y = add_param(_product(x.astype(self.dtype), kernel.astype(self.dtype)), bias)
      return jnp.split(y, self.parts, axis=-1)
    # Slices, not jnp.split: split's lowering compiled the base step 0.2 ms slower (H200 roofline).
    pieces = [slice(i * self.features, (i + 1) * self.features) for i in range(self.parts)]
    kernel = kernel.astype(self.dtype)
    products = _apart_products(x.astype(self.dtype), tuple(kernel[:, p] for p in pieces))
    return [add_param(y, bias[p]) for y, p in zip(products, pieces)]


@jax.custom_vjp
def _apart_products(x: jax.Array, kernels: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  """x @ kernel for each kernel, each its own product: x (once per kernel) and the kernels pass
  one optimization barrier, values XLA cannot tell are equal, so its dot merger leaves each
  product on its own. The gradients are autodiff's of the products, with x kept once for the
  backward (autodiff would keep each product's copy of x), and passed through a barrier again
  there, where the weight gradients' products share it."""
  return _apart_products_fwd(x, kernels)[0]


def _apart_products_fwd(x, kernels):
  xs, kernels = jax.lax.optimization_barrier(((x,) * len(kernels), kernels))
  return tuple(_product(x_i, k_i) for x_i, k_i in zip(xs, kernels)), (x, kernels)


def _apart_products_bwd(residuals, cotangents):
  x, kernels = residuals
  xs = jax.lax.optimization_barrier((x,) * len(kernels))
  grads = [jax.vjp(_product, x_i, k_i)[1](g) for x_i, k_i, g in zip(xs, kernels, cotangents)]
  return functools.reduce(jnp.add, [dx for dx, _ in grads]), tuple(dk for _, dk in grads)


_apart_products.defvjp(_apart_products_fwd, _apart_products_bwd)


def dense(features: int, name: str, dtype: Dtype) -> Dense:
  """A torch-equivalent Linear named `name` (see `Dense`)."""
  return Dense(features, dtype=dtype, name=name)


class PatchConv(nn.Module):
  """The original's patch-embedding Conv2d (kernel = stride = p, no padding) on NHWC input:
  flax's `nn.Conv` (the same parameters, initial values and forward) with the bias added by
  `add_param`."""

  features: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    kernel = self.param("kernel", patch_kernel_init, (p, p, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", patch_bias_init(p * p * x.shape[-1]), (self.features,),
                      jnp.float32)
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (p, p),
                                     "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return add_param(y, bias)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches of an NHWC input -> [B, rows * cols, D] (row-major)."""

  embed_dim: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = PatchConv(self.embed_dim, self.patch_size, self.dtype, name="proj")(x)
    return x.reshape(x.shape[0], -1, self.embed_dim)


def _attention_core(q: jax.Array, k: jax.Array, v: jax.Array, dtype: Dtype) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v on [B, N, H, hd] inputs; logits and softmax in float32."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits * q.shape[-1]**-0.5, axis=-1).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    implementation: str = "cudnn") -> jax.Array:
  """softmax(q k^T / sqrt(d)) v on [B, N, H, hd] by `jax.nn.dot_product_attention`.

  JAX's cuDNN attention refuses an odd N under autodiff ("Unsupported sequence length"), and
  CAV-MAE's masked streams have odd lengths (base at mask ratio 0.75 keeps 49 video tokens; the
  joint stream is 128 + 49). An odd N is padded with one token that no query attends to (cuDNN's
  padding mask from `query_seq_lengths`/`key_value_seq_lengths`), and the padded row is dropped:
  the same attention, whose gradients reach only the real tokens.
  """
  batch, length = q.shape[:2]
  scale = q.shape[-1]**-0.5
  if length % 2 == 0:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
  pad = ((0, 0), (0, 1), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
  lengths = jnp.full((batch,), length, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, scale=scale, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths, implementation=implementation)
  return out[:, :length]


# The core recomputed in the backward pass from its inputs: the same operations run again, so
# the gradients are those of the plain core; only q, k and v are kept, not the [B, H, N, N]
# scores (float32) and probabilities (`config.model.remat_policy='attention_only'`).
_recomputed_attention_core = jax.checkpoint(_attention_core, static_argnums=(3,),
                                            policy=jax.checkpoint_policies.nothing_saveable)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (timm layout).

  `recompute`: the XLA attention core keeps nothing for the backward pass but its inputs
  (`_recomputed_attention_core`); cuDNN's attention keeps no scores in any case.
  """

  dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  impl: str = "xla"
  recompute: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, _ = x.shape
    head_dim = self.dim // self.num_heads
    q, k, v = (t.reshape(batch, length, self.num_heads, head_dim)  # [B, N, H, hd]
               for t in SplitDense(self.dim, 3, self.dtype, name="qkv")(x))
    if self.impl == "cudnn":
      out = fused_attention(q, k, v)
    elif self.recompute:
      out = _recomputed_attention_core(q, k, v, self.dtype)
    else:
      out = _attention_core(q, k, v, self.dtype)
    out = out.reshape(batch, length, self.dim)
    return dense(self.dim, "proj", self.dtype)(out)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU. On half-precision `x` it is computed in float32 and rounded once to `x`'s
  dtype, forward and backward, as torch computes it for half-precision inputs, and its backward
  keeps only `x`; on float32 (or float64) `x` it is `jax.nn.gelu(x, approximate=False)` with
  autodiff's gradient.

  `jax.nn.gelu` on bfloat16 computes in bfloat16 around its float32 erf: 22% of its outputs are
  not the correctly rounded value, its gradient is 0.86% off on average and 6.6% at the 99th
  percentile (x ~ N(0, 4)), and its backward keeps two bfloat16 arrays per input. Here every
  output is correctly rounded and the gradient within 0.4% (the whole model's bfloat16 gradients
  stay as far from float32's as before, 0.95% in the median, other roundings dominating), and
  the backward keeps what the forward read: the base pretraining step keeps 627 MiB per sample
  against 698, and compiled for an H200 at batch 120 with cuDNN attention XLA plans 19.8 GiB
  against 24.4 (its roofline model 51.2 ms against 52.4).
  """
  if not _half_precision(x.dtype):
    return jax.nn.gelu(x, approximate=False)
  return _gelu_rounded_once(x)


@jax.custom_vjp
def _gelu_rounded_once(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def _gelu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return _gelu_rounded_once(x), x


def _gelu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  # The barriers keep XLA from sharing the forward's float32 erf with this recomputation (it
  # would keep that float32 array from the forward instead of `x`) and from keeping the float32
  # product for the bias gradient's sum: only bfloat16 arrays cross them.
  x = jax.lax.optimization_barrier(x)
  _, vjp = jax.vjp(lambda v: jax.nn.gelu(v, approximate=False), x.astype(jnp.float32))
  return jax.lax.optimization_barrier(vjp(g.astype(jnp.float32))[0].astype(x.dtype)),


_gelu_rounded_once.defvjp(_gelu_fwd, _gelu_bwd)


def _row_major_constraint() -> Optional[Callable[[jax.Array], jax.Array]]:
  """`x -> x` constrained to the row-major layout, or None where JAX has no layout constraints
  (before `jax.experimental.layout.Layout(major_to_minor)`) or no `jax.shard_map`."""
  try:
    from jax.experimental import layout  # pylint: disable=g-import-not-at-top
    layout.Layout(major_to_minor=(0,))
    constrain = layout.with_layout_constraint
  except (ImportError, AttributeError, TypeError):
    return None
  if not hasattr(jax, "shard_map"):
    return None
  return lambda x: constrain(x, layout.Layout(major_to_minor=tuple(range(x.ndim))))


_ROW_MAJOR = _row_major_constraint()
_BATCH_SHARDING: contextvars.ContextVar[Optional[NamedSharding]] = contextvars.ContextVar(
    "batch_sharding", default=None)


@contextlib.contextmanager
def batch_split_over(sharding: NamedSharding) -> Iterator[None]:
  """While tracing under it, the model's activations have their batch (leading) axis split as
  `sharding` splits the train step's batch (`mesh.batch_sharding`): `mean_tokens` may then pin
  the layout of the stream it pools, shard by shard."""
  token = _BATCH_SHARDING.set(sharding)
  try:
    yield
  finally:
    _BATCH_SHARDING.reset(token)


def mean_tokens(x: jax.Array) -> jax.Array:
  """The mean of x [B, N, D] over its tokens (axis 1), in float32. Under `batch_split_over`, a
  half-precision x and its gradient are kept in the row-major layout.

  The layout is a compiler hint and changes no value. Without it XLA:GPU lays out a reduction's
  operand with the reduced axis minor-most, and that layout spreads through every elementwise
  producer, forward and backward: pooling the contrastive streams over their tokens had the
  encoder's whole residual stream kept token-minor ([B, D, N]), with a transpose at each of its
  matrix products and LayerNorms (274 transposes in the base pretraining step in bfloat16
  compiled for an H200, 20 with the constraint; its roofline model at batch 120 with cuDNN
  attention 51.2 -> 49.0 ms). The constraint is applied to each device's shard (`jax.shard_map`
  over the batch's mesh axes): XLA's partitioner does not see through a layout constraint and
  would gather the whole batch's stream onto every device. A float32 x is left as it was: on the
  CPU the constraint moves fusion boundaries, which changes float32 gradients in their last bits.
  """
  sharding = _BATCH_SHARDING.get()
  if _ROW_MAJOR is not None and sharding is not None and _half_precision(x.dtype):
    axes = sharding.spec[0] if sharding.spec else None
    axes = (axes,) if isinstance(axes, str) else axes or ()
    if x.shape[0] % math.prod(sharding.mesh.shape[a] for a in axes) == 0:
      x = jax.shard_map(_ROW_MAJOR, mesh=sharding.mesh, in_specs=sharding.spec,
                        out_specs=sharding.spec)(x)
  return x.astype(jnp.float32).mean(axis=1)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""

  hidden_dim: int
  out_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = dense(self.hidden_dim, "fc1", self.dtype)(x)
    x = gelu(x)
    return dense(self.out_dim, "fc2", self.dtype)(x)


class Block(nn.Module):
  """Pre-norm Transformer block with three LayerNorm pairs over shared attention and MLP.

  `modality=None` uses `norm1`/`norm2` (the joint audio+video stream), 'a' uses
  `norm1_a`/`norm2_a`, 'v' uses `norm1_v`/`norm2_v`. As in the original, every block owns all
  six LayerNorms, including modality-specific and decoder blocks that only use the first pair,
  so parameter counts and state dicts match the original exactly.
  """

  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"
  recompute_attention: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, modality: Optional[str] = None) -> jax.Array:
    if modality not in _SUFFIX:
      raise ValueError(f"modality must be one of {list(_SUFFIX)}, got {modality!r}")
    norms1 = {m: layer_norm(f"norm1{s}", self.dtype) for m, s in _SUFFIX.items()}
    norms2 = {m: layer_norm(f"norm2{s}", self.dtype) for m, s in _SUFFIX.items()}
    if self.is_initializing():
      for m in _SUFFIX:  # Create all six LayerNorms' parameters, as the original has them.
        norms1[m](x), norms2[m](x)
    attn = Attention(self.dim, self.num_heads, self.dtype, self.attention_impl,
                     self.recompute_attention, name="attn")
    mlp = Mlp(int(self.dim * self.mlp_ratio), self.dim, self.dtype, name="mlp")
    x = x + attn(norms1[modality](x))
    return x + mlp(norms2[modality](x))


_SUFFIX = {None: "", "a": "_a", "v": "_v"}
