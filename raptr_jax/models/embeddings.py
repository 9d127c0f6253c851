"""Token/position embeddings, the output head and the token loss, shared by every family."""
import jax
import jax.numpy as jnp

from flax import nnx

from raptr_jax.models import layers
from raptr_jax.models.config import ModelConfig
from raptr_jax.models.core import logical_param
from raptr_jax.sharding import constrain


def init_embeddings(module, cfg: ModelConfig, rngs):
  """Adds ``embedding`` [V, d], ``pos_embedding`` [max_len, d] (learned positions), an untied
  ``head`` [d, V], ``type_embedding`` [token_types, d] and ``embedding_norm`` (when the config
  has them) to ``module``. T5's init draws the token embedding from N(0, 1) and the untied head
  from N(0, 1 / d) (transformers draws the head from N(0, 1), which gives logits of std sqrt(d)
  at initialisation; T5X's fan-in scaling is what we follow)."""
  pd = cfg.params_dtype
  t5 = cfg.init == "t5"
  module.embedding = logical_param(rngs.params(), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                                   1.0 if t5 else cfg.init_std, pd)
  if cfg.position == "learned":
    module.pos_embedding = logical_param(rngs.params(), (cfg.max_len, cfg.d_model), ("length", "embed"),
                                         cfg.init_std, pd)
  if not cfg.tied_embeddings:
    module.head = logical_param(rngs.params(), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                cfg.d_model ** -0.5 if t5 else cfg.init_std, pd)
  if cfg.position == "sinusoidal":  # crammed BERT's scaled sinusoid: its scale starts at d^-1/2
    module.pos_scale = nnx.Param(jnp.full((), cfg.d_model ** -0.5, pd), logical_axes=())
  if cfg.token_types:
    module.type_embedding = logical_param(rngs.params(), (cfg.token_types, cfg.d_model), ("token_types", "embed"),
                                          cfg.init_std, pd)
  if cfg.embedding_norm:
    add_norm(module, "embedding_norm", rngs, cfg)


def add_norm(module, name: str, rngs, cfg: ModelConfig):
  """A norm's scale ``name`` [d] (ones) and, for LayerNorm, its bias ``name_bias`` (zeros)."""
  setattr(module, name, norm_param(rngs, cfg))
  if cfg.norm == "layer":
    setattr(module, name + "_bias", logical_param(rngs.params(), (cfg.d_model,), ("norm",), None, cfg.params_dtype))


def init_output(module, cfg: ModelConfig, rngs, final_norm: str = "final_norm"):
  """The output side of a family module: the final norm ``final_norm`` (pre-norm models;
  post-norm blocks end in their own norm), BERT's MLM transform (``head_dense`` [d, d] + bias,
  the activation, ``head_norm``) and the output bias [V]."""
  if cfg.pre_norm:
    add_norm(module, final_norm, rngs, cfg)
  if cfg.head_transform:
    module.head_dense = logical_param(rngs.params(), (cfg.d_model, cfg.d_model), ("embed", "embed"), cfg.init_std,
                                      cfg.params_dtype)
    module.head_dense_bias = logical_param(rngs.params(), (cfg.d_model,), ("norm",), None, cfg.params_dtype)
    add_norm(module, "head_norm", rngs, cfg)
  if cfg.output_bias:
    module.output_bias = logical_param(rngs.params(), (cfg.vocab_size,), ("vocab",), None, cfg.params_dtype)


def norm_param(rngs, cfg: ModelConfig):
  return logical_param(rngs.params(), (cfg.d_model,), ("norm",), 0.0, cfg.params_dtype)


def relative_table(rngs, cfg: ModelConfig):
  """T5's relative-position bias table of one stack, [buckets, heads]."""
  return logical_param(rngs.params(), (cfg.relative_buckets, cfg.num_heads), ("relpos_buckets", "heads"),
                       cfg.d_model ** -0.5 if cfg.init == "t5" else cfg.init_std, cfg.params_dtype)


def default_positions(inputs, positions):
  return jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape) if positions is None else positions


EMBEDDING_PARAMS = ("embedding", "pos_embedding", "pos_scale", "type_embedding", "embedding_norm",
                    "embedding_norm_bias")  # what ``embed_tokens`` reads
# The output side's parameters besides the final norm scale and the output matrix (``project``).
HEAD_EXTRAS = ("head_dense", "head_dense_bias", "head_norm", "head_norm_bias", "output_bias")


def params_of(module, names) -> dict:
  """{name: value} of the parameters ``names`` that ``module`` has."""
  return {n: getattr(module, n).value for n in names if hasattr(module, n)}


def embed(module, inputs, positions, hidden=None, token_types=None):
  """Token ids [B, T] -> [B, T, d] in the compute dtype (plus learned positions and token types
  if the model has them, then the embedding norm), times the hidden-dimension growth mask
  ``hidden`` [d] when given."""
  return embed_tokens(module.cfg, params_of(module, EMBEDDING_PARAMS), inputs, positions, hidden, token_types)


def embed_tokens(cfg: ModelConfig, params: dict, inputs, positions, hidden=None, token_types=None):
  """``embed`` on a pure parameter dict (``EMBEDDING_PARAMS`` it holds); ``token_types`` [B, T]
  defaults to type 0 everywhere."""
  dt = cfg.compute_dtype
  # The tables' fsdp shards are gathered first (as every FSDP weight is), so the lookup is
  # batch-sharded and its gradient a scatter-add, then reduce-scatter; looking up into a table
  # sharded along the model dimension would re-shard the [B, T, d] cotangent along d instead,
  # by replicating it.
  table = lambda name, axes: constrain(params[name], axes)
  x = jnp.take(table("embedding", ("vocab", "embed")), inputs, axis=0).astype(dt)
  if "pos_embedding" in params:
    x = x + jnp.take(table("pos_embedding", ("length", "embed")), positions, axis=0).astype(dt)
  if "pos_scale" in params:
    x = x + (params["pos_scale"] * sinusoid(positions, cfg.d_model)).astype(dt)
  if "type_embedding" in params:
    types = jnp.zeros_like(inputs) if token_types is None else token_types
    x = x + jnp.take(table("type_embedding", ("token_types", "embed")), types, axis=0).astype(dt)
  if "embedding_norm" in params:
    x = layers.norm(x, params, "embedding_norm", cfg, hidden)
  x = constrain(x, layers.TOKENS)
  return x if hidden is None else x * hidden.astype(dt)


def sinusoid(positions, d: int):
  """[B, T] -> [B, T, d] sinusoidal positions (Vaswani et al.; sin on even, cos on odd features)."""
  freq = jnp.exp(jnp.arange(0, d, 2, dtype=jnp.float32) * (-jnp.log(10000.0) / d))
  angle = positions.astype(jnp.float32)[..., None] * freq
  return jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1).reshape(*positions.shape, d)


def output_matrix(params: dict, cfg: ModelConfig):
  """The output projection [d, V] of a family's pure parameter dict: the token embedding
  transposed (tied) or the untied ``head``."""
  return params["embedding"].T if cfg.tied_embeddings else params["head"]


def project(cfg: ModelConfig, x, norm_scale, w, hidden=None, extras=None):
  """The output side: [B, T, d] -> fp32 logits [B, T, V]. The final norm with ``norm_scale``
  [d] (None: none, post-norm models; its bias ``final_norm_bias`` in ``extras`` for LayerNorm),
  BERT's MLM transform (``head_dense``, activation, ``head_norm``) when the model has one, the
  d_model^-1/2 rescale of T5's tied head, the projection ``w`` [d, V] and the output bias.
  ``extras``: the ``HEAD_EXTRAS`` parameters; ``hidden``: the growth mask of ``Selection.hidden``."""
  dt = cfg.compute_dtype
  extras = extras or {}
  x = constrain(x, layers.TOKENS)
  if norm_scale is not None:
    x = layers.norm(x, {"n": norm_scale, "n_bias": extras.get("final_norm_bias")}, "n", cfg, hidden)
  if cfg.head_transform:
    x = jnp.einsum("btd,de->bte", x, extras["head_dense"].astype(dt)) + extras["head_dense_bias"].astype(dt)
    x = layers.norm(layers.ACTIVATIONS[cfg.activation](x), extras, "head_norm", cfg, hidden)
  if cfg.tied_output_scale:
    x = x * jnp.asarray(cfg.d_model ** -0.5, x.dtype)
  logits = jnp.einsum("btd,dv->btv", x, w.astype(dt), preferred_element_type=jnp.float32)
  if "output_bias" in extras:
    logits = logits + extras["output_bias"].astype(jnp.float32)
  return constrain(logits, ("batch", "length", "vocab"))


def head_weight(module):
  """``output_matrix`` of a family module."""
  return module.embedding.value.T if module.cfg.tied_embeddings else module.head.value


def head_extras(module, final_norm: str = "final_norm") -> dict:
  """The ``extras`` of ``project`` a family module holds (its final norm's bias included)."""
  out = params_of(module, HEAD_EXTRAS)
  if hasattr(module, final_norm + "_bias"):
    out["final_norm_bias"] = getattr(module, final_norm + "_bias").value
  return out


def final_norm_scale(module, final_norm: str = "final_norm"):
  """The final norm's scale, or None (post-norm models have none)."""
  return getattr(module, final_norm).value if hasattr(module, final_norm) else None


def output_logits(module, x, final_norm: str = "final_norm", hidden=None):
  """The module's output side on its final hidden states: [B, T, d] -> fp32 logits [B, T, V]
  (``hidden``: the growth mask of ``Selection.hidden``)."""
  return project(module.cfg, x, final_norm_scale(module, final_norm), head_weight(module), hidden,
                 head_extras(module, final_norm))


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
