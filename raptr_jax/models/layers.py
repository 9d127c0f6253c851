"""Pure layer functions of the transformer core (pre- or post-norm block, RMSNorm / LayerNorm,
RoPE, T5 relative position buckets, self- and cross-attention with grouped key/value heads, MLP).

Parameters arrive as one layer's slice of the stacked pytree; compute runs in ``dtype`` (bf16 by
default) with fp32 normalisation statistics; attention is ``jax.nn.dot_product_attention`` (the
cuDNN flash kernel on GPU when the mask allows it). Every architecture choice is a field of the
``ModelConfig`` (norm kind and placement, biases, attention scale, key/value heads, activation),
so the same functions compute the decoder, BERT and T5 presets of ``models/presets.py``.
"""
import dataclasses

import jax
import jax.numpy as jnp

from raptr_jax.sharding import constrain

TOKENS = ("batch", "length", "embed")              # the residual stream [B, T, d]
HEADS = ("batch", "length", "heads", "head_dim")   # queries, keys, values [B, T, N, H]
UNITS = ("batch", "length", "mlp")                 # MLP hidden units [B, T, F]
ACTIVATIONS = {"gelu": jax.nn.gelu, "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
               "silu": jax.nn.silu, "relu": jax.nn.relu}


def norm(x, p, name: str, cfg, mask=None):
  """The norm ``name`` of params ``p`` (``p[name]`` scale, ``p[name + '_bias']`` for LayerNorm)
  in the kind ``cfg.norm`` says; ``mask`` [d]: MSG's hidden-size growth mask."""
  if cfg.norm == "layer":
    return layer_norm(x, p[name], p[name + "_bias"], cfg.norm_eps, mask)
  return rms_norm(x, p[name], cfg.norm_eps, mask)


def layer_norm(x, scale, bias, eps: float, mask=None):
  """LayerNorm (mean and variance in fp32); with a hidden-dimension ``mask`` [d] the
  statistics are over the masked dimensions only and the output is multiplied by the mask, so
  at mask 0 on new dimensions this is exactly the norm of the old ones."""
  x32 = x.astype(jnp.float32)
  if mask is None:
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)
  m = mask.astype(jnp.float32)
  mean = jnp.sum(x32 * m, axis=-1, keepdims=True) / jnp.sum(m)
  var = jnp.sum(jnp.square(x32 - mean) * m, axis=-1, keepdims=True) / jnp.sum(m)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return (y * m).astype(x.dtype)


def rms_norm(x, scale, eps: float, mask=None):
  """RMSNorm; with a hidden-dimension ``mask`` [d] (MSG growth) the statistics are weighted
  by it, sum_i m_i x_i^2 / sum_i m_i, and the output is multiplied by it, so where the new
  dimensions have mask 0 this is exactly the norm of the old dimensions."""
  x32 = x.astype(jnp.float32)
  if mask is None:
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)
  m = mask.astype(jnp.float32)
  ms = jnp.sum(x32 * x32 * m, axis=-1, keepdims=True) / jnp.sum(m)
  return (x32 * jax.lax.rsqrt(ms + eps) * scale.astype(jnp.float32) * m).astype(x.dtype)


def rotary(x, positions, base: float = 10000.0):
  """Rotary position embedding of x [B, T, N, H] at integer positions [B, T]: the half rotation
  (first half / second half of each head, transformers' ``rotate_half``), frequencies
  base^(-2i / H)."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None, None] * freq     # [B, T, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128):
  """T5's bucket of ``key_position - query_position``: exact for small distances, then
  logarithmic up to ``max_distance``; the bidirectional form spends half the buckets on each
  direction, the causal form only looks back."""
  n = -relative_position
  ret = 0
  if bidirectional:
    num_buckets //= 2
    ret = (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  large = max_exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
                       / jnp.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return ret + jnp.where(is_small, n, large)


def relative_bias(table, q_index, k_index, bidirectional: bool, max_distance: int):
  """Attention bias [B, N, Tq, Tk] from a [buckets, N] table at row indices [B, Tq], [B, Tk].

  Relative distances within a packed segment do not depend on where the segment starts in its
  row, so row indices (not per-segment positions) give T5's bias for packed rows too."""
  rel = k_index[:, None, :] - q_index[:, :, None]
  buckets = relative_position_bucket(rel, bidirectional, table.shape[0], max_distance)
  return jnp.transpose(jnp.take(table, buckets, axis=0), (0, 3, 1, 2))


def attention_mask(segment_ids, prefix=None, causal: bool = True):
  """[B, 1, T, T] bool: same non-padding segment, and causal or both in the bidirectional prefix."""
  t = segment_ids.shape[-1]
  same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
  if not causal:
    return same[:, None]
  causal_mask = jnp.tril(jnp.ones((t, t), bool))[None]
  if prefix is not None:
    bidir = (prefix[:, :, None] > 0) & (prefix[:, None, :] > 0)
    causal_mask = causal_mask | bidir
  return (same & causal_mask)[:, None]


def cross_attention_mask(q_segment_ids, kv_segment_ids):
  """[B, 1, Tq, Tk] bool: a target token attends to the inputs of its own packed example."""
  same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return (same & (kv_segment_ids[:, None, :] > 0))[:, None]


def attention_backend(cfg, dtype):
  """``cfg.attention_impl``, or for None: cuDNN flash attention on GPU in bf16/fp16, else XLA.

  (``jax.nn.dot_product_attention``'s own None means XLA everywhere.)
  """
  if cfg.attention_impl is not None:
    return cfg.attention_impl
  if jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionInputs:
  """What every layer of a stack attends with, besides its own activations.

  ``mask`` None means no masking beyond ``causal`` (the flash-attention fast path); ``bias`` is
  T5's relative-position bias [B|1, N, T, T]; ``context`` [B, S, d] and ``context_mask``
  [B, 1, T, S] are the encoder output a decoder stack cross-attends to.
  """
  positions: jax.Array
  mask: jax.Array | None = None
  bias: jax.Array | None = None
  context: jax.Array | None = None
  context_mask: jax.Array | None = None
  hidden: jax.Array | None = None      # [d] hidden-dimension growth mask (Selection.hidden)
  causal: bool = dataclasses.field(default=True, metadata=dict(static=True))


def _dense(x, p, name, spec, dt):
  """``einsum(spec, x, p[name])`` plus ``p[name + '_bias']`` when the model has biases."""
  y = jnp.einsum(spec, x, p[name].astype(dt))
  bias = p.get(name + "_bias")
  return y if bias is None else y + bias.astype(dt)


def project_qkv(p, x, kv, positions, cfg, prefix=""):
  """Queries [B, T, N, H] from ``x`` and keys / values [B, S, K, H] from ``kv`` (K =
  ``cfg.kv_heads``), rotary applied in self-attention."""
  dt = cfg.dtype
  q = constrain(_dense(x, p, prefix + "q", "btd,dnh->btnh", dt), HEADS)
  k = constrain(_dense(kv, p, prefix + "k", "bsd,dnh->bsnh", dt), HEADS)
  v = constrain(_dense(kv, p, prefix + "v", "bsd,dnh->bsnh", dt), HEADS)
  if cfg.position == "rotary" and not prefix:
    q, k = rotary(q, positions, cfg.rotary_base), rotary(k, positions, cfg.rotary_base)
  return q, k, v


def attention_logit_scale(cfg) -> float | None:
  """1 for T5 (its 1 / sqrt(head_dim) is folded into the initialisation of the queries); None
  otherwise: ``dot_product_attention``'s own 1 / sqrt(head_dim)."""
  return 1.0 if cfg.attention_scale == "none" else None


def attend(q, k, v, cfg, *, mask=None, bias=None, causal=False, implementation=None):
  """``jax.nn.dot_product_attention`` with the model's logit scale; k / v may have fewer heads
  than q (grouped-query attention: query head j reads key/value head j // (N / K))."""
  if bias is not None:
    bias = bias.astype(q.dtype)
  return jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=mask, is_causal=causal and mask is None, scale=attention_logit_scale(cfg),
      implementation=implementation or attention_backend(cfg, q.dtype))


def attention_output(p, out, cfg, prefix="", head_mask=None):
  """Heads [B, T, N, H] -> [B, T, d] through ``{prefix}o``; ``head_mask`` [N] multiplies each
  head's output (growth)."""
  out = constrain(out, HEADS)
  if head_mask is not None:
    out = out * head_mask.astype(out.dtype)[:, None]
  return constrain(_dense(out, p, prefix + "o", "btnh,nhd->btd", cfg.dtype), TOKENS)


def attention(p, x, kv, positions, mask, cfg, *, causal=True, bias=None, prefix="", head_mask=None):
  """Multi-head attention of queries from ``x`` over ``kv`` (self-attention when they are the
  same array); parameters ``{prefix}q``, ``k``, ``v``, ``o`` (and their biases); rotary only in
  self-attention; ``head_mask`` [N] multiplies each head's output (growth)."""
  q, k, v = project_qkv(p, x, kv, positions, cfg, prefix)
  out = attend(q, k, v, cfg, mask=mask, bias=bias, causal=causal)
  return attention_output(p, out, cfg, prefix, head_mask)


def mlp(p, x, cfg, unit_mask=None):
  """The (gated) MLP: act(x wi) [* (x wg)] wo; ``unit_mask`` [F] multiplies each hidden unit's
  activation (growth)."""
  dt = cfg.dtype
  h = ACTIVATIONS[cfg.activation](constrain(_dense(x, p, "wi", "btd,df->btf", dt), UNITS))
  if cfg.gated_mlp:
    h = h * constrain(_dense(x, p, "wg", "btd,df->btf", dt), UNITS)
  if unit_mask is not None:
    h = h * unit_mask.astype(h.dtype)
  return constrain(_dense(h, p, "wo", "btf,fd->btd", dt), TOKENS)


def select_heads(p, heads):
  """One layer's params narrowed to the attention heads ``heads`` [h] (self- and cross-attention;
  key/value heads as many as query heads: grouped-query models are refused by the methods)."""
  out = dict(p)
  for prefix in ("", "cross_"):
    if prefix + "q" in p:
      for name in ("q", "k", "v"):
        out[prefix + name] = jnp.take(p[prefix + name], heads, axis=1)   # [d, h, head_dim]
        if prefix + name + "_bias" in p:
          out[prefix + name + "_bias"] = jnp.take(p[prefix + name + "_bias"], heads, axis=0)
      out[prefix + "o"] = jnp.take(p[prefix + "o"], heads, axis=0)       # [h, head_dim, d]
  return out


def select_mlp_parts(p, parts, num_parts: int):
  """One layer's MLP narrowed to ``parts`` [m] of its ``num_parts`` equal slices of hidden units."""
  out = dict(p)
  for name in ("wi", "wg"):
    if name in p:
      d, f = p[name].shape
      out[name] = jnp.take(p[name].reshape(d, num_parts, f // num_parts), parts, axis=1).reshape(d, -1)
      if name + "_bias" in p:
        out[name + "_bias"] = jnp.take(p[name + "_bias"].reshape(num_parts, f // num_parts), parts,
                                       axis=0).reshape(-1)
  f, d = p["wo"].shape
  out["wo"] = jnp.take(p["wo"].reshape(num_parts, f // num_parts, d), parts, axis=0).reshape(-1, d)
  return out


def block(p, x, positions, mask, scale, cfg, attend: AttentionInputs | None = None, width=None):
  """A transformer block; every residual branch is multiplied by ``scale``.

  Pre-norm (``cfg.norm_position='pre'``): x + s f(norm(x)) per branch; post-norm (BERT):
  norm(x + s f(x)). ``attend`` (when given) supplies the mask, relative bias, causality and
  cross-attention context; ``positions``/``mask`` alone describe a causal decoder block.
  ``width`` (a ``WidthSelection`` of this layer) narrows attention to some heads and the MLP to
  some parts, scaling those branches by its ``head_scale`` / ``mlp_scale``."""
  if attend is None:
    attend = AttentionInputs(positions, mask)
  x = constrain(x, TOKENS)
  scale = scale.astype(x.dtype)
  attn_scale = mlp_scale = scale
  bias = attend.bias
  if width is not None and width.heads is not None:
    p = select_heads(p, width.heads)
    attn_scale = scale * width.head_scale
    bias = None if bias is None else jnp.take(bias, width.heads, axis=1)
  if width is not None and width.mlp is not None:
    p = select_mlp_parts(p, width.mlp, width.mlp_parts)
    mlp_scale = scale * width.mlp_scale
  head_mask = width.head_mask if width is not None else None
  unit_mask = width.mlp_mask if width is not None else None
  hidden = attend.hidden
  if hidden is not None:  # growth: the residual stream's new dimensions follow the mask
    attn_scale = attn_scale * hidden.astype(x.dtype)
    mlp_scale = mlp_scale * hidden.astype(x.dtype)
  pre = cfg.norm_position == "pre"

  def branch(x, norm_name, f, branch_scale):
    y = x + branch_scale * f(norm(x, p, norm_name, cfg, hidden) if pre else x)
    return y if pre else norm(y, p, norm_name, cfg, hidden)

  x = branch(x, "attn_norm", lambda h: attention(p, h, h, attend.positions, attend.mask, cfg, causal=attend.causal,
                                                 bias=bias, head_mask=head_mask), attn_scale)
  if attend.context is not None:
    x = branch(x, "cross_norm", lambda h: attention(p, h, attend.context, attend.positions, attend.context_mask, cfg,
                                                    causal=False, prefix="cross_", head_mask=head_mask), attn_scale)
  x = branch(x, "mlp_norm", lambda h: mlp(p, h, cfg, unit_mask), mlp_scale)
  return constrain(x, TOKENS)
