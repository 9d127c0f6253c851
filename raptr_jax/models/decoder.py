"""Decoder-only language model (GPT / UL2 prefix-LM): embeddings, the stacked core, the head.

``loss_fn`` is the family's objective: token cross-entropy at positions with weight > 0 (causal
LM everywhere; UL2 targets only), averaged over those positions, computed in fp32.
"""
from flax import nnx

from raptr_jax.models import embeddings
from raptr_jax.models.aux_heads import AuxHeads
from raptr_jax.models.config import ModelConfig
from raptr_jax.models.core import StackedLayers
from raptr_jax.models.selection import Selection

BATCH_FIELDS = ("inputs", "targets", "weights", "prefix", "segment_ids", "positions")


class DecoderLM(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    embeddings.init_embeddings(self, cfg, rngs)
    self.layers = StackedLayers(cfg, rngs=rngs, causal=True)
    embeddings.init_output(self, cfg, rngs)
    if cfg.aux_heads:  # interlocking backprop (methods/interlocking.py)
      self.aux_heads = AuxHeads(cfg, rngs=rngs, causal=True)

  def __call__(self, inputs, positions=None, segment_ids=None, prefix=None,
               selection: Selection | None = None):
    """Token ids [B, T] -> fp32 logits [B, T, V]."""
    positions = embeddings.default_positions(inputs, positions)
    hidden = selection.hidden if selection is not None else None
    x = embeddings.embed(self, inputs, positions, hidden)
    x = self.layers(x, positions, segment_ids, prefix, selection)
    return embeddings.output_logits(self, x, "final_norm", hidden)


def layer_inputs(batch, packed: bool = True):
  """(positions, segment_ids, prefix) the stacked layers read from a batch."""
  return (batch["positions"], batch["segment_ids"] if packed else None, batch["prefix"] if packed else None)


def head_loss(cfg: ModelConfig, x, norm_scale, w, batch, packed: bool = True, hidden=None, extras=None):
  """The objective from final hidden states x [B, T, d] through the final norm ``norm_scale``
  and the projection ``w`` [d, V] (``embeddings.project``): the model's head, or an auxiliary
  head (interlocking backprop)."""
  return embeddings.token_mean_loss(embeddings.project(cfg, x, norm_scale, w, hidden, extras), batch["targets"],
                                    batch["weights"], batch["segment_ids"] if packed else None)


def logits_fn(model: DecoderLM, batch, selection: Selection | None = None, packed: bool = True):
  """fp32 logits of a batch. ``packed=False``: one causal row per example, no masks."""
  return model(batch["inputs"], batch["positions"],
               batch["segment_ids"] if packed else None,
               batch["prefix"] if packed else None, selection)


def loss_fn(model: DecoderLM, batch, selection: Selection | None = None, packed: bool = True):
  """Mean token loss and aux metrics for one batch."""
  logits = logits_fn(model, batch, selection, packed)
  return embeddings.token_mean_loss(logits, batch["targets"], batch["weights"],
                                    batch["segment_ids"] if packed else None)
