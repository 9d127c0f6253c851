"""Token/position embeddings, the output head and the token loss, shared by every family."""
import jax
import jax.numpy as jnp

from raptr_jax.models import layers
from raptr_jax.models.config import ModelConfig
from raptr_jax.models.core import logical_param
from raptr_jax.sharding import constrain


def init_embeddings(module, cfg: ModelConfig, rngs):
  """Adds ``embedding`` [V, d], ``pos_embedding`` [max_len, d] (learned positions) and an untied
  ``head`` [d, V] to ``module``."""
  pd = cfg.params_dtype
  module.embedding = logical_param(rngs.params(), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                                   cfg.init_std, pd)
  if cfg.position == "learned":
    module.pos_embedding = logical_param(rngs.params(), (cfg.max_len, cfg.d_model), ("length", "embed"),
                                         cfg.init_std, pd)
  if not cfg.tied_embeddings:
    module.head = logical_param(rngs.params(), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                cfg.init_std, pd)


def norm_param(rngs, cfg: ModelConfig):
  return logical_param(rngs.params(), (cfg.d_model,), ("norm",), 0.0, cfg.params_dtype)


def relative_table(rngs, cfg: ModelConfig):
  """T5's relative-position bias table of one stack, [buckets, heads]."""
  return logical_param(rngs.params(), (cfg.relative_buckets, cfg.num_heads), ("relpos_buckets", "heads"),
                       cfg.init_std, cfg.params_dtype)


def default_positions(inputs, positions):
  return jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape) if positions is None else positions


EMBEDDING_PARAMS = ("embedding", "pos_embedding")  # what ``embed_tokens`` reads


def embed(module, inputs, positions, hidden=None):
  """Token ids [B, T] -> [B, T, d] in the compute dtype (plus learned positions if present),
  times the hidden-dimension growth mask ``hidden`` [d] when given."""
  params = {"embedding": module.embedding.value}
  if hasattr(module, "pos_embedding"):
    params["pos_embedding"] = module.pos_embedding.value
  return embed_tokens(module.cfg, params, inputs, positions, hidden)


def embed_tokens(cfg: ModelConfig, params: dict, inputs, positions, hidden=None):
  """``embed`` on a pure parameter dict (``EMBEDDING_PARAMS`` it holds)."""
  dt = cfg.compute_dtype
  # The tables' fsdp shards are gathered first (as every FSDP weight is), so the lookup is
  # batch-sharded and its gradient a scatter-add then reduce-scatter; looking up into a table
  # sharded along the model dimension would re-shard the [B, T, d] cotangent along d instead,
  # by replicating it.
  table = lambda name, axes: constrain(params[name], axes)
  x = jnp.take(table("embedding", ("vocab", "embed")), inputs, axis=0).astype(dt)
  if "pos_embedding" in params:
    x = x + jnp.take(table("pos_embedding", ("length", "embed")), positions, axis=0).astype(dt)
  x = constrain(x, layers.TOKENS)
  return x if hidden is None else x * hidden.astype(dt)


def output_matrix(params: dict, cfg: ModelConfig):
  """The output projection [d, V] of a family's pure parameter dict: the token embedding
  transposed (tied) or the untied ``head``."""
  return params["embedding"].T if cfg.tied_embeddings else params["head"]


def project(cfg: ModelConfig, x, norm_scale, w, hidden=None):
  """RMSNorm with ``norm_scale`` [d] and the output projection ``w`` [d, V]: [B, T, d] -> fp32
  logits [B, T, V] (``hidden``: the growth mask of ``Selection.hidden``)."""
  dt = cfg.compute_dtype
  x = layers.rms_norm(constrain(x, layers.TOKENS), norm_scale, cfg.norm_eps, hidden)
  logits = jnp.einsum("btd,dv->btv", x, w.astype(dt), preferred_element_type=jnp.float32)
  return constrain(logits, ("batch", "length", "vocab"))


def head_weight(module):
  """``output_matrix`` of a family module."""
  return module.embedding.value.T if module.cfg.tied_embeddings else module.head.value


def output_logits(module, x, norm, hidden=None):
  """Final RMSNorm and the (tied or untied) head: [B, T, d] -> fp32 logits [B, T, V]
  (``hidden``: the growth mask of ``Selection.hidden``)."""
  return project(module.cfg, x, norm.value, head_weight(module), hidden)


def token_losses(logits, targets, weights):
  """Weighted cross-entropy at every position ([..., T], fp32) and the weights."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  losses = (logz - gold) * weights
  return (constrain(losses, ("batch", "length")) if losses.ndim == 2 else losses), weights


def cross_entropy(logits, targets, weights):
  """Sum of weighted token losses and the weight total (fp32)."""
  losses, weights = token_losses(logits, targets, weights)
  return jnp.sum(losses), jnp.sum(weights)


def mean_loss(total, count):
  loss = total / jnp.maximum(count, 1.0)
  return loss, {"loss_sum": total, "loss_tokens": count}


def token_mean_loss(logits, targets, weights, segment_ids=None):
  """Mean token loss over weighted positions, with the per-position losses in ``aux``
  (``token_loss``, ``token_weight`` and ``token_segment``, the packed segment each position
  belongs to, 1 when rows are not packed): batch selection scores examples from them, and XLA
  drops them from steps that do not read them."""
  losses, weights = token_losses(logits, targets, weights)
  loss, aux = mean_loss(jnp.sum(losses), jnp.sum(weights))
  segments = jnp.ones(weights.shape, jnp.int32) if segment_ids is None else segment_ids
  return loss, aux | {"token_loss": losses, "token_weight": weights, "token_segment": segments}
