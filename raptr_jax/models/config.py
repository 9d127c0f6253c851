"""The static description of a transformer: sizes, dtypes, every architecture option, remat policy.

Each architecture choice is one field, read by the layers (never a family name): norm kind,
placement and eps; biases; the attention logit scale; activation and gating; position scheme and
rotary base; key/value heads; token types and an embedding norm; tied or untied head, its
output rescale and the MLM transform head; the initialisation scheme. ``models/presets.py``
(the architecture table) names the combinations that equal public implementations.

Fields added after the first release carry ``identity="when_set"``: at their default they are
left out of ``identity()``, so the RST table keys and checkpoint metadata of every model that
does not use them stay what they were.
"""
import dataclasses

import jax
import jax.numpy as jnp

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,
}


ACTIVATIONS = ("gelu", "gelu_exact", "silu", "relu")  # gelu: tanh approximation (gelu_new); gelu_exact: erf


def _new(default):
  """A field that ``identity()`` records only when it differs from ``default``."""
  return dataclasses.field(default=default, metadata={"identity": "when_set"})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  gated_mlp: bool = True
  activation: str = "gelu"
  position: str = "rotary"          # rotary | learned | relative (T5 buckets, shared per stack) |
                                    # sinusoidal (x a learned scale, crammed BERT)
  max_len: int = 2048               # learned positions only
  relative_buckets: int = 32        # relative positions only (T5 defaults)
  relative_max_distance: int = 128
  num_decoder_layers: int = 0       # encoder-decoder families: 0 means num_layers
  max_predictions: int = 0          # MLM sparse prediction: head on this many positions per row
  tied_embeddings: bool = False
  dtype: str = "bfloat16"           # compute dtype; params are kept in param_dtype
  param_dtype: str = "float32"
  remat: str = "none"               # none | full | dots | dots_all
  scan_layers: bool = True
  norm_eps: float = 1e-6
  init_std: float = 0.02
  attention_impl: str | None = None  # None: cuDNN on GPU in bf16/fp16, else XLA | xla | cudnn
  # Fields below are set by a method (``Method.model_fields``), not the ``model`` section, and are
  # recorded (RST keys, checkpoint meta) only when they differ from their default (``identity``).
  aux_heads: int = dataclasses.field(default=0, metadata={"identity": "when_set"})  # interlocking
  aux_head_layers: int = dataclasses.field(default=2, metadata={"identity": "when_set"})
  # Architecture options (models/presets.py names the public architectures they make up).
  norm: str = _new("rms")                 # rms (RMSNorm) | layer (LayerNorm with a bias)
  norm_position: str = _new("pre")        # pre: x + f(norm(x)), a final norm | post: norm(x + f(x))
  biases: bool = _new(False)              # biases in every attention and MLP projection
  attention_scale: str = _new("head_dim")  # head_dim: logits / sqrt(head_dim) | none (T5: 1)
  num_kv_heads: int = _new(0)             # grouped-query attention: key/value heads; 0 = num_heads
  rotary_base: float = _new(10000.0)      # rotary positions: theta (Llama's rope_theta)
  token_types: int = _new(0)              # > 0: a token-type embedding of this many types (BERT 2)
  embedding_norm: bool = _new(False)      # a norm after the embeddings (BERT, crammed BERT)
  head_transform: bool = _new(False)      # BERT's MLM head: dense + activation + norm before the output
  output_bias: bool = _new(False)         # a bias on the output logits (BERT's MLM decoder bias)
  tied_output_scale: bool = _new(False)   # tied head reads the final states x d_model^-1/2 (T5 1.0)
  init: str = _new("normal")              # normal: N(0, init_std), GPT-2 scaled outputs | t5: T5's
                                          # fan-in scaled normals (embedding std 1)

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "mlp_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
    if self.position not in ("rotary", "learned", "relative", "sinusoidal"):
      raise ValueError(f"model.position must be 'rotary', 'learned', 'relative' or 'sinusoidal', got {self.position!r}")
    if self.position == "sinusoidal" and self.d_model % 2:
      raise ValueError(f"sinusoidal positions need an even model.d_model, got {self.d_model}")
    if self.num_decoder_layers < 0 or self.max_predictions < 0:
      raise ValueError("model.num_decoder_layers and max_predictions must be >= 0")
    if self.position == "rotary" and self.head_dim % 2:
      raise ValueError(f"rotary positions need an even model.head_dim, got {self.head_dim}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"model.activation must be one of {ACTIVATIONS} (gelu is the tanh approximation), "
                       f"got {self.activation!r}")
    for name, allowed in (("norm", ("rms", "layer")), ("norm_position", ("pre", "post")),
                          ("attention_scale", ("head_dim", "none")), ("init", ("normal", "t5"))):
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if self.num_kv_heads < 0 or (self.num_kv_heads and self.num_heads % self.num_kv_heads):
      raise ValueError(f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads} "
                       "(grouped-query attention: each key/value head serves num_heads / num_kv_heads query "
                       "heads); 0 means num_heads")
    if self.token_types < 0:
      raise ValueError(f"model.token_types must be >= 0, got {self.token_types}")
    if not self.rotary_base > 0:
      raise ValueError(f"model.rotary_base must be positive, got {self.rotary_base}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"model.{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
    if self.aux_heads < 0 or self.aux_head_layers < 0:
      raise ValueError("model.aux_heads and aux_head_layers must be >= 0")
    if self.attention_impl not in (None, "xla", "cudnn"):
      raise ValueError(f"model.attention_impl must be None, 'xla' or 'cudnn', got {self.attention_impl!r}")

  def identity(self) -> dict:
    """The fields that say which model this is (RST table keys, checkpoint meta): every field,
    except method-set ones still at their default, so adding such a field keeps old keys."""
    out = dataclasses.asdict(self)
    for f in dataclasses.fields(self):
      if f.metadata.get("identity") == "when_set" and out[f.name] == f.default:
        del out[f.name]
    return out

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def pre_norm(self) -> bool:
    return self.norm_position == "pre"

  @property
  def decoder_layers(self) -> int:
    return self.num_decoder_layers or self.num_layers

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def params_dtype(self):
    return DTYPES[self.param_dtype]


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
  return -(-vocab_size // multiple) * multiple
