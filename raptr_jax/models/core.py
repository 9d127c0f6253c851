"""The stacked-layer transformer core: L pre-LN blocks held as one pytree, run by ``lax.scan``.

Every parameter has a leading layer axis and a ``logical_axes`` annotation (``sharding.py`` maps
those names to mesh axes). A ``Selection`` (selection.py) gathers a subset of layers and/or
tokens; without one, the full stack runs.
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from raptr_jax.models import layers
from raptr_jax.models.config import REMAT_POLICIES, ModelConfig
from raptr_jax.models.selection import LayerSelection, Selection, TokenSelection


def logical_param(key, shape, axes, std, dtype):
  value = std * jax.random.normal(key, shape, jnp.float32) if std else jnp.ones(shape, jnp.float32)
  return nnx.Param(value.astype(dtype), logical_axes=axes)


class StackedLayers(nnx.Module):
  """L transformer blocks; parameters have shape [L, ...]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    L, d, n, h, f = cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    std, out_std = cfg.init_std, cfg.init_std / (2 * L) ** 0.5
    specs = {
        "attn_norm": ((L, d), ("layers", "norm"), 0.0),
        "q": ((L, d, n, h), ("layers", "embed", "heads", "head_dim"), std),
        "k": ((L, d, n, h), ("layers", "embed", "heads", "head_dim"), std),
        "v": ((L, d, n, h), ("layers", "embed", "heads", "head_dim"), std),
        "o": ((L, n, h, d), ("layers", "heads", "head_dim", "embed"), out_std),
        "mlp_norm": ((L, d), ("layers", "norm"), 0.0),
        "wi": ((L, d, f), ("layers", "embed", "mlp"), std),
        "wo": ((L, f, d), ("layers", "mlp", "embed"), out_std),
    }
    if cfg.gated_mlp:
      specs["wg"] = ((L, d, f), ("layers", "embed", "mlp"), std)
    self.param_names = tuple(specs)
    for name, (shape, axes, s) in specs.items():
      setattr(self, name, logical_param(rngs.params(), shape, axes, s, cfg.params_dtype))

  def stacked(self) -> dict[str, jax.Array]:
    return {name: getattr(self, name).value for name in self.param_names}

  def __call__(self, x, positions, segment_ids=None, prefix=None, selection: Selection | None = None):
    """x [B, T, d] -> [B, T, d]. ``segment_ids`` None means one causal sequence per row."""
    params = self.stacked()
    layer_sel = selection.layers if selection is not None else None
    token_sel = selection.tokens if selection is not None else None
    if layer_sel is None:
      layer_sel = LayerSelection.full(self.cfg.num_layers)
    else:
      params = jax.tree.map(lambda p: jnp.take(p, layer_sel.indices, axis=0), params)
    scales = layer_sel.scales
    mask = None if segment_ids is None else layers.attention_mask(segment_ids, prefix)
    if token_sel is None:
      return self._scan(params, scales, x, positions, mask)
    a, b = token_sel.start, token_sel.start + token_sel.num_layers
    k = scales.shape[0]
    if not 0 <= a < b <= k:
      raise ValueError(f"token selection covers selected layers [{a}, {b}) of {k}")
    part = lambda lo, hi: jax.tree.map(lambda p: p[lo:hi], params)
    x = self._scan(part(0, a), scales[:a], x, positions, mask)
    x = self._scan_dropped(part(a, b), scales[a:b], token_sel, x, positions, segment_ids, prefix)
    return self._scan(part(b, k), scales[b:], x, positions, mask)

  def _body(self):
    body = functools.partial(layers.block, cfg=self.cfg)
    policy = REMAT_POLICIES[self.cfg.remat]
    if self.cfg.remat != "none":
      body = jax.checkpoint(body, policy=policy, prevent_cse=not self.cfg.scan_layers)
    return body

  def _scan(self, params, scales, x, positions, mask):
    if scales.shape[0] == 0:
      return x
    body = self._body()

    def step(h, layer):
      p, s = layer
      return body(p, h, positions, mask, s), None

    if self.cfg.scan_layers:
      return jax.lax.scan(step, x, (params, scales))[0]
    for i in range(scales.shape[0]):
      x = step(x, jax.tree.map(lambda a: a[i], (params, scales)))[0]
    return x

  def _scan_dropped(self, params, scales, token_sel: TokenSelection, x, positions, segment_ids, prefix):
    """Layers that see only the selected tokens of each example; the rest pass through."""
    body = self._body()
    if segment_ids is None:
      segment_ids = jnp.ones(x.shape[:2], jnp.int32)
    gather = jax.vmap(lambda a, i: jnp.take(a, i, axis=0))
    scatter = jax.vmap(lambda a, i, u: a.at[i].set(u))

    def step(h, layer):
      p, s, idx = layer
      seg = gather(segment_ids, idx)
      pre = None if prefix is None else gather(prefix, idx)
      out = body(p, gather(h, idx), gather(positions, idx), layers.attention_mask(seg, pre), s)
      return scatter(h, idx, out), None

    return jax.lax.scan(step, x, (params, scales, token_sel.indices))[0]
