"""Auxiliary heads (interlocking backprop, ``methods/interlocking.py``): one per component but
the last, each ``aux_head_layers`` transformer blocks (the paper's Appendix B.3: 2) and an
RMSNorm; the output projection is the model's own (tied embedding or untied head).

The towers are one stacked parameter tree of ``aux_heads x aux_head_layers`` blocks (tower k is
blocks [k * n, (k + 1) * n)), so they shard, checkpoint and optimize like the main stack; their
output projections are initialised for a tower's depth. With ``aux_head_layers = 0`` a head is
the norm and the projection only (the paper's linear head of its convolutional experiments).
Evaluation, generation and every other method ignore them: they exist when a method asks for
them (``Method.model_fields``).
"""
import jax
from flax import nnx

from raptr_jax.models.config import ModelConfig
from raptr_jax.models.core import StackedLayers, logical_param


class AuxHeads(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, causal: bool):
    self.count, self.blocks = cfg.aux_heads, cfg.aux_head_layers
    if self.blocks:
      self.layers = StackedLayers(cfg, rngs=rngs, causal=causal, num_layers=self.count * self.blocks,
                                  init_depth=self.blocks, layer_axis="aux_layers")
    self.norms = logical_param(rngs.params(), (self.count, cfg.d_model), ("aux_layers", "norm"), 0.0,
                               cfg.params_dtype)


def tower(params: dict, k, blocks: int) -> dict:
  """Head k's parameters from the ``aux_heads`` pure dict: its blocks' slice and its norm (``k``
  an int, or traced: a pipeline stage's own head)."""
  out = {"norm": params["norms"][k]}
  if blocks:
    out["layers"] = {n: jax.lax.dynamic_slice_in_dim(p, k * blocks, blocks) for n, p in params["layers"].items()}
  return out


def head_hidden(stack: StackedLayers | None, head: dict, x, positions, segment_ids=None, prefix=None):
  """Head's blocks on x [B, T, d] (identity without blocks); its norm is applied by the loss."""
  if stack is None or "layers" not in head:
    return x
  return stack.run_layers(head["layers"], x, positions, segment_ids, prefix)
