"""Pure layer functions of the transformer core (pre-LN block, RMSNorm, RoPE, attention, MLP).

Parameters arrive as one layer's slice of the stacked pytree; compute runs in ``dtype`` (bf16 by
default) with fp32 normalisation statistics; attention is ``jax.nn.dot_product_attention`` (the
cuDNN flash kernel on GPU when the mask allows it).
"""
import jax
import jax.numpy as jnp


def rms_norm(x, scale, eps: float):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rotary(x, positions, base: float = 10000.0):
  """Rotary position embedding of x [B, T, N, H] at integer positions [B, T] (half rotation)."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None, None] * freq     # [B, T, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(segment_ids, prefix):
  """[B, 1, T, T] bool: same non-padding segment, and causal or both in the bidirectional prefix."""
  t = segment_ids.shape[-1]
  same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
  causal = jnp.tril(jnp.ones((t, t), bool))[None]
  if prefix is not None:
    bidir = (prefix[:, :, None] > 0) & (prefix[:, None, :] > 0)
    causal = causal | bidir
  return (same & causal)[:, None]


def attention_backend(cfg, dtype):
  """``cfg.attention_impl``, or for None: cuDNN flash attention on GPU in bf16/fp16, else XLA.

  (``jax.nn.dot_product_attention``'s own None means XLA everywhere.)
  """
  if cfg.attention_impl is not None:
    return cfg.attention_impl
  if jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


def attention(p, x, positions, mask, cfg):
  """Multi-head self-attention; ``mask`` None means plain causal (the flash-attention path)."""
  dt = cfg.dtype
  q = jnp.einsum("btd,dnh->btnh", x, p["q"].astype(dt))
  k = jnp.einsum("btd,dnh->btnh", x, p["k"].astype(dt))
  v = jnp.einsum("btd,dnh->btnh", x, p["v"].astype(dt))
  if cfg.position == "rotary":
    q, k = rotary(q, positions), rotary(k, positions)
  out = jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=mask is None, implementation=attention_backend(cfg, q.dtype))
  return jnp.einsum("btnh,nhd->btd", out, p["o"].astype(dt))


def mlp(p, x, cfg):
  dt = cfg.dtype
  act = {"gelu": jax.nn.gelu, "silu": jax.nn.silu, "relu": jax.nn.relu}[cfg.activation]
  h = act(jnp.einsum("btd,df->btf", x, p["wi"].astype(dt)))
  if cfg.gated_mlp:
    h = h * jnp.einsum("btd,df->btf", x, p["wg"].astype(dt))
  return jnp.einsum("btf,fd->btd", h, p["wo"].astype(dt))


def block(p, x, positions, mask, scale, cfg):
  """Pre-LN transformer block; both residual branches are multiplied by ``scale``."""
  scale = scale.astype(x.dtype)
  x = x + scale * attention(p, rms_norm(x, p["attn_norm"], cfg.norm_eps), positions, mask, cfg)
  x = x + scale * mlp(p, rms_norm(x, p["mlp_norm"], cfg.norm_eps), cfg)
  return x
