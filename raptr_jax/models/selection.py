"""Selections: the only way a training method changes what the transformer core computes.

A method builds a ``Selection`` inside the jitted step (indices sampled from the step's key) and
passes it to the model; the full model is ``selection=None``. Static fields (counts, where token
dropping starts) fix the compiled shape, so one compile serves a whole stage.

* ``LayerSelection``: run k of the L stacked layers, ``indices`` sorted ascending, each layer's
  residual branches multiplied by its ``scales`` entry. The core gathers the stacked parameters
  by ``indices`` (RaPTr's linear-combination shared subnetwork, Appendix G); the gradient of a
  gather is a scatter-add, so unselected layers receive exactly zero gradient.
* ``TokenSelection``: for ``num_layers`` consecutive selected layers starting at selected-layer
  position ``start``, each example keeps ``r`` of its S positions (``indices`` [num_layers, B, r],
  sorted so causal and prefix masks stay valid); dropped positions pass through unchanged.
"""
import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerSelection:
  indices: jax.Array   # [k] int32, ascending layer indices into the stack
  scales: jax.Array    # [k] float32, residual-branch output scale of each selected layer

  @staticmethod
  def full(num_layers: int) -> "LayerSelection":
    return LayerSelection(jnp.arange(num_layers, dtype=jnp.int32), jnp.ones(num_layers, jnp.float32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenSelection:
  indices: jax.Array                                  # [num_layers, B, r] int32, ascending
  start: int = dataclasses.field(default=0, metadata=dict(static=True))

  @property
  def num_layers(self) -> int:
    return self.indices.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selection:
  layers: LayerSelection | None = None
  tokens: TokenSelection | None = None
