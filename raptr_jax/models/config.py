"""The static description of a transformer: sizes, dtypes, position scheme, remat policy."""
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
  position: str = "rotary"          # rotary | learned | relative (T5 buckets, shared per stack)
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

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "mlp_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
    if self.position not in ("rotary", "learned", "relative"):
      raise ValueError(f"model.position must be 'rotary', 'learned' or 'relative', got {self.position!r}")
    if self.num_decoder_layers < 0 or self.max_predictions < 0:
      raise ValueError("model.num_decoder_layers and max_predictions must be >= 0")
    if self.position == "rotary" and self.head_dim % 2:
      raise ValueError(f"rotary positions need an even model.head_dim, got {self.head_dim}")
    if self.activation not in ("gelu", "silu", "relu"):
      raise ValueError(f"model.activation must be gelu, silu or relu, got {self.activation!r}")
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
