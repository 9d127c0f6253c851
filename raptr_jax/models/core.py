"""The stacked-layer transformer core: L pre-LN blocks held as one pytree, run by ``lax.scan``.

Every parameter has a leading layer axis and a ``logical_axes`` annotation (``sharding.py`` maps
those names to mesh axes). A ``Selection`` (selection.py) gathers a subset of layers and/or
tokens, switches layers off per step (``lax.cond``) or narrows each layer to some of its
heads / MLP parts; without one, the full stack runs. The same core is the decoder-only stack (causal), the
BERT / T5 encoder stack (bidirectional) and the T5 decoder stack (causal, with cross-attention
to the encoder output); T5's relative-position bias table is shared by the layers of a stack,
as in T5, so it is passed in rather than stacked.
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from raptr_jax.models import layers
from raptr_jax.models.config import REMAT_POLICIES, ModelConfig
from raptr_jax.models.selection import LayerSelection, Selection, gather_tokens, scatter_tokens, take_layers


def logical_param(key, shape, axes, std, dtype):
  """A parameter with logical axes: N(0, std^2) entries, ones for ``std`` 0 (norm scales), or
  zeros for ``std`` None (biases)."""
  if std is None:
    value = jnp.zeros(shape, jnp.float32)
  else:
    value = std * jax.random.normal(key, shape, jnp.float32) if std else jnp.ones(shape, jnp.float32)
  return nnx.Param(value.astype(dtype), logical_axes=axes)


def layer_param_specs(cfg: ModelConfig, num_layers: int, cross_attention: bool, init_depth: int,
                      layer_axis: str = "layers") -> dict:
  """{name: (shape, logical axes, init std)} of L stacked blocks: norms (with biases for
  LayerNorm), q / k / v / o (k, v with ``cfg.kv_heads`` heads), the MLP, and every projection's
  bias when ``cfg.biases``. Init: ``normal`` is N(0, init_std) with output projections scaled
  by 1 / sqrt(2 depth) (GPT-2); ``t5`` is T5's (Mesh TensorFlow / transformers) fan-in normals:
  q std (d head_dim)^-1/2, k / v std d^-1/2, o std (N head_dim)^-1/2, wi / wg std d^-1/2,
  wo std F^-1/2."""
  L, d, n, kv, h, f = num_layers, cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim
  ax = layer_axis
  if cfg.init == "t5":
    std = {"q": (d * h) ** -0.5, "kv": d ** -0.5, "o": (n * h) ** -0.5, "wi": d ** -0.5, "wo": f ** -0.5}
  else:
    out_std = cfg.init_std / (2 * init_depth) ** 0.5
    std = {"q": cfg.init_std, "kv": cfg.init_std, "o": out_std, "wi": cfg.init_std, "wo": out_std}
  q = ((L, d, n, h), (ax, "embed", "heads", "head_dim"), std["q"])
  kv_ = ((L, d, kv, h), (ax, "embed", "kv_heads" if kv != n else "heads", "head_dim"), std["kv"])
  o = ((L, n, h, d), (ax, "heads", "head_dim", "embed"), std["o"])

  def norm(name):
    out = {name: ((L, d), (ax, "norm"), 0.0)}
    if cfg.norm == "layer":
      out[name + "_bias"] = ((L, d), (ax, "norm"), None)
    return out

  def attention(prefix):
    out = {prefix + "q": q, prefix + "k": kv_, prefix + "v": kv_, prefix + "o": o}
    if cfg.biases:
      out |= {prefix + "q_bias": ((L, n, h), (ax, "heads", "head_dim"), None),
              prefix + "k_bias": ((L, kv, h), (ax, kv_[1][2], "head_dim"), None),
              prefix + "v_bias": ((L, kv, h), (ax, kv_[1][2], "head_dim"), None),
              prefix + "o_bias": ((L, d), (ax, "embed"), None)}
    return out

  specs = norm("attn_norm") | attention("")
  if cross_attention:
    specs |= norm("cross_norm") | attention("cross_")
  specs |= norm("mlp_norm") | {"wi": ((L, d, f), (ax, "embed", "mlp"), std["wi"]),
                               "wo": ((L, f, d), (ax, "mlp", "embed"), std["wo"])}
  if cfg.gated_mlp:
    specs["wg"] = ((L, d, f), (ax, "embed", "mlp"), std["wi"])
  if cfg.biases:
    specs |= {"wi_bias": ((L, f), (ax, "mlp"), None), "wo_bias": ((L, d), (ax, "embed"), None)}
    if cfg.gated_mlp:
      specs["wg_bias"] = ((L, f), (ax, "mlp"), None)
  return specs


class StackedLayers(nnx.Module):
  """L transformer blocks; parameters have shape [L, ...]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, causal: bool = True,
               cross_attention: bool = False, num_layers: int | None = None, init_depth: int | None = None,
               layer_axis: str = "layers"):
    """``init_depth``: the depth the output projections' init std is scaled for (GPT-2's
    1 / sqrt(2 depth)); default the stack's own (auxiliary heads stack several short towers).
    ``layer_axis``: the logical name of the stacking axis (``sharding.RULES``; the main stack's
    ``layers`` split over pipeline stages, auxiliary heads' ``aux_layers`` do not)."""
    self.cfg = cfg
    self.causal = causal
    self.num_layers = L = num_layers or cfg.num_layers
    specs = layer_param_specs(cfg, L, cross_attention, init_depth or L, layer_axis)
    self.param_names = tuple(specs)
    self.record_outputs = False  # diagnostics: sow every layer's output (nnx.Intermediate)
    for name, (shape, axes, s) in specs.items():
      setattr(self, name, logical_param(rngs.params(), shape, axes, s, cfg.params_dtype))

  def stacked(self) -> dict[str, jax.Array]:
    return {name: getattr(self, name).value for name in self.param_names}

  def __call__(self, x, positions, segment_ids=None, prefix=None, selection: Selection | None = None,
               *, relative_table=None, context=None, context_segment_ids=None):
    """x [B, T, d] -> [B, T, d]. ``segment_ids`` None means one sequence per row, no padding.

    ``relative_table`` [buckets, N]: T5 relative-position bias; ``context`` [B, S, d] with
    ``context_segment_ids`` [B, S]: the encoder output this (decoder) stack cross-attends to."""
    params = self.stacked()
    layer_sel = selection.layers if selection is not None else None
    token_sel = selection.tokens if selection is not None else None
    if layer_sel is None:
      layer_sel = LayerSelection.full(self.num_layers)
    else:
      params = take_layers(params, layer_sel)
    # What each run layer scans over: its params, scale, whether it runs, its width slices.
    k = layer_sel.scales.shape[0]
    width = selection.width if selection is not None else None
    if width is not None:
      for name in ("heads", "mlp"):
        rows = getattr(width, name)
        if rows is not None and rows.shape[0] != k:
          raise ValueError(f"width selection has {name} for {rows.shape[0]} layers, but {k} layers run")
    per_layer = (params, layer_sel.scales, layer_sel.active, width)
    rows = jnp.arange(x.shape[1])[None]
    hidden = selection.hidden if selection is not None else None
    attend = self._attend(positions, segment_ids, prefix, rows, relative_table, context,
                          context_segment_ids, hidden)
    if token_sel is None:
      if self.record_outputs:  # y^(0..k): the stack's input and each run layer's output
        out, ys = self._scan(per_layer, x, attend, collect=True)
        self.sow(nnx.Intermediate, "layer_outputs", jnp.concatenate([x[None], ys]))
        return out
      return self._scan(per_layer, x, attend)
    wrapped = token_sel.positions()
    if any(b <= a for a, b in zip(wrapped, wrapped[1:])) or not 0 <= wrapped[0] <= wrapped[-1] < k:
      raise ValueError(f"token selection wraps selected layers {wrapped}: they must ascend within [0, {k})")
    part = lambda lo, hi: jax.tree.map(lambda p: p[lo:hi], per_layer)
    # Runs of consecutive wrapped positions share one scan; the layers between run in full.
    done, row = 0, 0
    for a, b in _runs(wrapped):
      x = self._scan(part(done, a), x, attend)
      tokens = jax.tree.map(lambda t: t[row:row + b - a], token_sel.indices)
      x = self._scan_dropped(part(a, b), tokens, x, positions, segment_ids, prefix,
                             relative_table, context, context_segment_ids, hidden)
      done, row = b, row + b - a
    return self._scan(part(done, k), x, attend)

  def run_layers(self, params, x, positions, segment_ids=None, prefix=None):
    """Runs the blocks of ``params`` (a slice of the stacked parameters, e.g. one component's
    contiguous layers; any leading count) in order on x [B, T, d], full width, no selection:
    the same computation as those layers inside ``__call__``."""
    count = jax.tree.leaves(params)[0].shape[0]
    attend = self._attend(positions, segment_ids, prefix, jnp.arange(x.shape[1])[None], None, None, None)
    return self._scan((params, jnp.ones((count,), jnp.float32), None, None), x, attend)

  def _attend(self, positions, segment_ids, prefix, rows, relative_table, context, context_segment_ids,
              hidden=None):
    cfg = self.cfg
    mask = None if segment_ids is None else layers.attention_mask(segment_ids, prefix, self.causal)
    bias = None
    if relative_table is not None:
      bias = layers.relative_bias(relative_table, rows, rows, not self.causal, cfg.relative_max_distance)
    context_mask = None
    if context is not None and segment_ids is not None:
      context_mask = layers.cross_attention_mask(segment_ids, context_segment_ids)
    return layers.AttentionInputs(positions, mask, bias, context, context_mask, hidden, self.causal)

  def _body(self):
    body = functools.partial(layers.block, cfg=self.cfg)
    policy = REMAT_POLICIES[self.cfg.remat]
    if self.cfg.remat != "none":
      body = jax.checkpoint(body, policy=policy, prevent_cse=not self.cfg.scan_layers)
    return body

  def _layer(self, body, layer, h, attend):
    """One scanned layer; an inactive one (``active`` False) is skipped by ``lax.cond``."""
    p, scale, active, width = layer
    run = lambda h: body(p, h, attend.positions, attend.mask, scale, attend=attend, width=width)
    if active is None:
      return run(h)
    return jax.lax.cond(active, run, lambda h: h, h)

  def _scan(self, per_layer, x, attend, collect: bool = False):
    """Runs the layers; ``collect`` also returns every layer's output [k, B, T, d]."""
    count = per_layer[1].shape[0]
    if count == 0:
      return (x, jnp.zeros((0,) + x.shape, x.dtype)) if collect else x
    body = self._body()

    def step(h, layer):
      h = self._layer(body, layer, h, attend)
      return h, (h if collect else None)

    if self.cfg.scan_layers:
      x, ys = jax.lax.scan(step, x, per_layer)
      return (x, ys) if collect else x
    outs = []
    for i in range(count):
      x, y = step(x, jax.tree.map(lambda a: a[i], per_layer))
      outs.append(y)
    return (x, jnp.stack(outs)) if collect else x

  def _scan_dropped(self, per_layer, indices, x, positions, segment_ids, prefix, relative_table,
                    context, context_segment_ids, hidden=None):
    """Layers that see only their kept tokens (``indices`` [n, B, r], one row per layer); the
    rest of each row passes through. The kept tokens keep their original positions (rotary),
    segment ids, prefix flags and row indices (T5's relative buckets), so every mask is the
    full layer's mask restricted to them; cross-attention reads the whole ``context``."""
    body = self._body()
    if segment_ids is None and prefix is None and context is None and relative_table is None and self.causal:
      gathered_segments = lambda idx: None  # sorted kept tokens of one row: plain causal attention
    else:
      if segment_ids is None:
        segment_ids = jnp.ones(x.shape[:2], jnp.int32)
        if context is not None and context_segment_ids is None:
          context_segment_ids = jnp.ones(context.shape[:2], jnp.int32)
      gathered_segments = lambda idx: gather_tokens(segment_ids, idx)

    def step(h, layer_and_tokens):
      layer, idx = layer_and_tokens
      pre = None if prefix is None else gather_tokens(prefix, idx)
      attend = self._attend(gather_tokens(positions, idx), gathered_segments(idx), pre, idx,
                            relative_table, context, context_segment_ids, hidden)
      out = self._layer(body, layer, gather_tokens(h, idx), attend)
      return scatter_tokens(h, idx, out), None

    return jax.lax.scan(step, x, (per_layer, indices))[0]


def _runs(positions):
  """[(a, b)]: the maximal runs a, a + 1, ..., b - 1 of ascending ``positions``."""
  out = []
  for p in positions:
    if out and out[-1][1] == p:
      out[-1] = (out[-1][0], p + 1)
    else:
      out.append((p, p + 1))
  return out
