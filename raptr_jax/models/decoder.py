"""Decoder-only language model (GPT / UL2 prefix-LM): embeddings, the stacked core, the head.

``loss_fn`` is the family's objective: token cross-entropy at positions with weight > 0 (causal
LM everywhere; UL2 targets only), averaged over those positions, computed in fp32.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from raptr_jax.models import layers
from raptr_jax.models.config import ModelConfig
from raptr_jax.models.core import StackedLayers, logical_param
from raptr_jax.models.selection import Selection


class DecoderLM(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.params_dtype
    self.embedding = logical_param(rngs.params(), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pd)
    if cfg.position == "learned":
      self.pos_embedding = logical_param(rngs.params(), (cfg.max_len, cfg.d_model), ("length", "embed"), cfg.init_std, pd)
    self.layers = StackedLayers(cfg, rngs=rngs)
    self.final_norm = logical_param(rngs.params(), (cfg.d_model,), ("norm",), 0.0, pd)
    if not cfg.tied_embeddings:
      self.head = logical_param(rngs.params(), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pd)

  def __call__(self, inputs, positions=None, segment_ids=None, prefix=None,
               selection: Selection | None = None):
    """Token ids [B, T] -> fp32 logits [B, T, V]."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    x = jnp.take(self.embedding.value, inputs, axis=0).astype(dt)
    if cfg.position == "learned":
      x = x + jnp.take(self.pos_embedding.value, positions, axis=0).astype(dt)
    x = self.layers(x, positions, segment_ids, prefix, selection)
    x = layers.rms_norm(x, self.final_norm.value, cfg.norm_eps)
    if cfg.tied_embeddings:
      w = self.embedding.value.astype(dt).T
    else:
      w = self.head.value.astype(dt)
    return jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)


def cross_entropy(logits, targets, weights):
  """Sum of weighted token losses and the weight total (fp32)."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((logz - gold) * weights), jnp.sum(weights)


def logits_fn(model: DecoderLM, batch, selection: Selection | None = None, packed: bool = True):
  """fp32 logits of a batch. ``packed=False``: one causal row per example, no masks."""
  return model(batch["inputs"], batch["positions"],
               batch["segment_ids"] if packed else None,
               batch["prefix"] if packed else None, selection)


def loss_fn(model: DecoderLM, batch, selection: Selection | None = None, packed: bool = True):
  """Mean token loss and aux metrics for one batch."""
  total, count = cross_entropy(logits_fn(model, batch, selection, packed), batch["targets"], batch["weights"])
  loss = total / jnp.maximum(count, 1.0)
  return loss, {"loss_sum": total, "loss_tokens": count}
