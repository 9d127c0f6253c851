"""Selections: the only way a training method changes what the transformer core computes.

A method builds a ``Selection`` inside the jitted step (``select(key, batch, progress)``: indices
sampled from the step's key; ``progress`` is the budget fraction, for time schedules such as
progressive layer dropping) and passes it to the model; the full model is ``selection=None``. Static fields (counts, where token
dropping starts) fix the compiled shape, so one compile serves a whole stage.

* ``LayerSelection``: run k of the L stacked layers, ``indices`` sorted ascending (None: all
  layers in order, no gather), each layer's residual branches multiplied by its ``scales`` entry. The core gathers the stacked parameters
  by ``indices`` (RaPTr's linear-combination shared subnetwork, Appendix G); the gradient of a
  gather is a scatter-add, so unselected layers receive exactly zero gradient. ``active`` [k]
  bool (optional) makes the count dynamic: a layer whose entry is False is skipped by
  ``lax.cond`` (no compute in the forward or backward pass; progressive layer dropping,
  Bernoulli RaPTr).
* ``WidthSelection``: per selected layer, ``heads`` [k, h] (h of the N attention heads, in
  self- and cross-attention) and/or ``mlp`` [k, m] (m of the ``mlp_parts`` equal slices of the
  MLP's hidden units). The block gathers those weight slices, so the matmuls really shrink;
  the attention / MLP outputs are multiplied by ``head_scale`` / ``mlp_scale``. Growth masks
  (MSG): ``head_mask`` [k, N] multiplies each head's attention output, ``mlp_mask`` [k, F]
  each hidden unit's activation.
* ``Selection.hidden`` [d]: a mask over the hidden (residual) dimensions (MSG's hidden-size
  growth): embeddings and every residual branch are multiplied by it, and RMSNorm takes its
  statistics weighted by it (``layers.rms_norm``), so at 0 on the new dimensions the model is
  exactly the narrower one.
* ``TokenSelection``: for ``num_layers`` selected layers (the positions ``layers``, or the
  consecutive ones from ``start``), each example keeps ``r`` of its S positions (``indices``
  [num_layers, B, r], sorted so causal and prefix masks stay valid): the layer runs on the kept
  tokens with their original positions, segment ids and prefix flags, its outputs are scattered
  back, and dropped positions pass through unchanged (random-LTD).
* ``EncoderDecoderSelection``: one ``Selection`` per stack of an encoder-decoder model (either
  may be None: that stack runs in full), so a method can act on the encoder, the decoder or both.

``layer_selections()`` names the stacked parameter collection each layer selection indexes
(``layers``; ``encoder_layers`` / ``decoder_layers``), which is what optimizer freezing keys on.
"""
import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerSelection:
  indices: jax.Array | None   # [k] int32, ascending layer indices into the stack; None: all
  scales: jax.Array    # [k] float32, residual-branch output scale of each selected layer
  active: jax.Array | None = None   # [k] bool: False = skip this layer (lax.cond); None = all run

  @staticmethod
  def full(num_layers: int) -> "LayerSelection":
    return LayerSelection(jnp.arange(num_layers, dtype=jnp.int32), jnp.ones(num_layers, jnp.float32))

  def mask(self, num_layers: int) -> jax.Array:
    """[num_layers] bool: the stack's layers this selection runs."""
    run = True if self.active is None else self.active
    if self.indices is None:
      return jnp.zeros((num_layers,), bool).at[:self.scales.shape[0]].set(run)
    return jnp.zeros((num_layers,), bool).at[self.indices].set(run)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WidthSelection:
  heads: jax.Array | None = None     # [k, h] int32, ascending head indices of each selected layer
  mlp: jax.Array | None = None       # [k, m] int32, ascending MLP part indices of each layer
  mlp_parts: int = dataclasses.field(default=1, metadata=dict(static=True))
  head_scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
  mlp_scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
  head_mask: jax.Array | None = None   # [k, N] float: each head's output multiplier (growth)
  mlp_mask: jax.Array | None = None    # [k, F] float: each hidden unit's multiplier (growth)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenSelection:
  indices: jax.Array                                  # [num_layers, B, r] int32, ascending
  start: int = dataclasses.field(default=0, metadata=dict(static=True))
  # The selected-layer positions the rows of ``indices`` apply to (ascending, any spacing);
  # None: the consecutive positions start, start + 1, ...
  layers: tuple[int, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))

  @property
  def num_layers(self) -> int:
    return self.indices.shape[0]

  def positions(self) -> tuple[int, ...]:
    """The selected-layer positions that see only their kept tokens, ascending."""
    if self.layers is not None:
      if len(self.layers) != self.num_layers:
        raise ValueError(f"token selection names {len(self.layers)} layers but has indices for "
                         f"{self.num_layers}")
      return tuple(self.layers)
    return tuple(range(self.start, self.start + self.num_layers))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selection:
  layers: LayerSelection | None = None
  tokens: TokenSelection | None = None
  width: WidthSelection | None = None
  hidden: jax.Array | None = None      # [d] float: hidden-dimension mask (growth)

  def layer_selections(self, prefix: str = "") -> dict[str, LayerSelection]:
    return {} if self.layers is None else {prefix + "layers": self.layers}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EncoderDecoderSelection:
  encoder: Selection | None = None
  decoder: Selection | None = None

  def layer_selections(self) -> dict[str, LayerSelection]:
    out = {}
    for name in ("encoder", "decoder"):
      sel = getattr(self, name)
      if sel is not None:
        out |= sel.layer_selections(name + "_")
    return out


def take_layers(stacked, layer_sel: LayerSelection):
  """The selected layers of stacked parameters (a pytree of [L, ...] arrays) as [k, ...]: RaPTr's
  linear-combination shared subnetwork is this gather (its gradient, a scatter-add, is exactly
  zero on the layers left out). ``indices`` None: the stack unchanged."""
  if layer_sel.indices is None:
    return stacked
  return jax.tree.map(lambda p: jnp.take(p, layer_sel.indices, axis=0), stacked)


def gather_tokens(x, indices):
  """x [B, S, ...], indices [B, r] -> [B, r, ...]: each example's kept positions (random-LTD)."""
  return jax.vmap(lambda a, i: jnp.take(a, i, axis=0))(x, indices)


def scatter_tokens(x, indices, updates):
  """x [B, S, ...] with each example's kept positions ``indices`` [B, r] set to ``updates``
  [B, r, ...]; the dropped positions pass through unchanged (random-LTD)."""
  return jax.vmap(lambda a, i, u: a.at[i].set(u))(x, indices, updates)


def selection_rows(selection, index, count: int):
  """The selection of microbatch ``index`` of ``count`` (the rows index, index + count, ...:
  ``step.split_microbatches``): token selections keep those rows; layer, width and hidden
  selections have no batch dimension and are shared by every microbatch."""
  if selection is None:
    return None
  if isinstance(selection, EncoderDecoderSelection):
    return EncoderDecoderSelection(selection_rows(selection.encoder, index, count),
                                   selection_rows(selection.decoder, index, count))
  if selection.tokens is None:
    return selection
  idx = selection.tokens.indices  # [n, B, r]
  n, b, r = idx.shape
  rows = jnp.take(idx.reshape(n, b // count, count, r), index, axis=2)
  return dataclasses.replace(selection, tokens=dataclasses.replace(selection.tokens, indices=rows))


STACK_CHOICES = ("encoder", "decoder", "both")


def for_stacks(select, stacks: str = "both"):
  """Turns a method's ``select(key, batch, progress) -> Selection`` into one for an
  encoder-decoder model acting on ``stacks`` ("encoder", "decoder" or "both": independent draws
  per stack)."""
  if stacks not in STACK_CHOICES:
    raise ValueError(f"model.select_stacks must be one of {STACK_CHOICES}, got {stacks!r}")

  def select_both(key, batch, progress):
    enc_key, dec_key = jax.random.split(key)
    encoder = select(enc_key, batch, progress) if stacks in ("encoder", "both") else None
    decoder = select(dec_key, batch, progress) if stacks in ("decoder", "both") else None
    for chosen in (encoder, decoder):
      if isinstance(chosen, EncoderDecoderSelection):  # the method chose per stack itself (random-LTD)
        return chosen
    return EncoderDecoderSelection(encoder=encoder, decoder=decoder)

  return select_both
