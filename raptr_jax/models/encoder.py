"""Encoder-only masked language model (BERT; crammed BERT of Geiping & Goldstein, 2022).

Bidirectional attention within each packed example (padding and other examples masked out), the
stacked core and the output side (``embeddings.project``: the final norm of a pre-norm model,
BERT's MLM transform and output bias when configured, the head, tied to the token embedding by
default, as BERT). ``models/presets.py`` names the BERT (``BertForMaskedLM``) and crammed-BERT
settings of the options.
The loss is cross-entropy at the masked positions only (``weights`` > 0). With
``model.max_predictions`` = P > 0 the head runs on just the first P masked positions of each row
("sparse prediction", crammed BERT section 4.2), a static shape; the data pipeline closes a
packed row before it would hold more than P masked tokens, so no prediction is ever dropped.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from raptr_jax.models import embeddings
from raptr_jax.models.aux_heads import AuxHeads
from raptr_jax.models.config import ModelConfig
from raptr_jax.models.core import StackedLayers
from raptr_jax.models.selection import Selection

BATCH_FIELDS = ("inputs", "targets", "weights", "segment_ids", "positions")


class EncoderMLM(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    embeddings.init_embeddings(self, cfg, rngs)
    self.layers = StackedLayers(cfg, rngs=rngs, causal=False)
    embeddings.init_output(self, cfg, rngs)
    if cfg.aux_heads:  # interlocking backprop (methods/interlocking.py)
      self.aux_heads = AuxHeads(cfg, rngs=rngs, causal=False)

  def encode(self, inputs, positions=None, segment_ids=None, selection: Selection | None = None,
             token_types=None):
    """Token ids [B, T] -> final hidden states [B, T, d] (before the final norm, if any);
    ``token_types`` [B, T] (models with ``token_types``; default type 0)."""
    positions = embeddings.default_positions(inputs, positions)
    x = embeddings.embed(self, inputs, positions, selection.hidden if selection is not None else None, token_types)
    return self.layers(x, positions, segment_ids, None, selection)

  def __call__(self, inputs, positions=None, segment_ids=None, selection: Selection | None = None,
               token_types=None):
    """Token ids [B, T] -> fp32 logits [B, T, V] at every position."""
    return embeddings.output_logits(self, self.encode(inputs, positions, segment_ids, selection, token_types),
                                    "final_norm", selection.hidden if selection is not None else None)


def prediction_positions(weights, max_predictions: int):
  """[B, P] indices of the first P positions with weight > 0 in each row (then weight-0 ones)."""
  order = jnp.argsort(weights <= 0, axis=1, stable=True)
  return order[:, :max_predictions]


def logits_fn(model: EncoderMLM, batch, selection: Selection | None = None, packed: bool = True):
  return model(batch["inputs"], batch["positions"], batch["segment_ids"] if packed else None, selection)


def loss_fn(model: EncoderMLM, batch, selection: Selection | None = None, packed: bool = True):
  """Mean loss over the masked positions of a batch."""
  hidden = selection.hidden if selection is not None else None
  x = model.encode(batch["inputs"], batch["positions"], batch["segment_ids"] if packed else None, selection)
  return head_loss(model.cfg, x, embeddings.final_norm_scale(model), embeddings.head_weight(model), batch, packed,
                   hidden, embeddings.head_extras(model))


def layer_inputs(batch, packed: bool = True):
  """(positions, segment_ids, prefix) the stacked layers read from a batch (no prefix)."""
  return batch["positions"], batch["segment_ids"] if packed else None, None


def head_loss(cfg: ModelConfig, x, norm_scale, w, batch, packed: bool = True, hidden=None, extras=None):
  """The masked-token loss from final hidden states x [B, T, d] through the output side
  (``embeddings.project``: the final norm ``norm_scale``, ``extras``, the projection ``w`` [d, V]), on the first ``cfg.max_predictions`` masked positions of each
  row (all positions when 0): the model's head, or an auxiliary head (interlocking backprop)."""
  p = cfg.max_predictions
  if not p:
    return embeddings.token_mean_loss(embeddings.project(cfg, x, norm_scale, w, hidden, extras), batch["targets"],
                                      batch["weights"], batch["segment_ids"] if packed else None)
  idx = prediction_positions(batch["weights"], p)
  take = jax.vmap(lambda a, i: jnp.take(a, i, axis=0))
  logits = embeddings.project(cfg, take(x, idx), norm_scale, w, hidden, extras)
  loss, aux = embeddings.token_mean_loss(logits, take(batch["targets"], idx), take(batch["weights"], idx),
                                         take(batch["segment_ids"], idx) if packed else None)
  # Masked positions beyond P would be silently left out: count them (0 unless the data is wrong).
  aux["mlm/unpredicted"] = jnp.sum(batch["weights"] > 0) - jnp.sum(take(batch["weights"], idx) > 0)
  return loss, aux
