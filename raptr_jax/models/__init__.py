"""Model families over one stacked-layer core. ``build_model(cfg)`` -> (module, loss_fn)."""
from flax import nnx

from raptr_jax.models import decoder
from raptr_jax.models.config import ModelConfig, padded_vocab_size
from raptr_jax.models.selection import LayerSelection, Selection, TokenSelection

FAMILIES = {"decoder": (decoder.DecoderLM, decoder.loss_fn)}


def model_config(model_cfg, vocab_size: int) -> ModelConfig:
  """ModelConfig from the ``model`` section of a run config (vocab padded to a multiple of 128)."""
  fields = {k: v for k, v in model_cfg.items() if k not in ("family", "vocab_size")}
  return ModelConfig(vocab_size=padded_vocab_size(model_cfg.get("vocab_size") or vocab_size), **fields)


def build_model(family: str, cfg: ModelConfig, seed: int):
  if family not in FAMILIES:
    raise ValueError(f"unknown model.family {family!r}; available: {sorted(FAMILIES)}")
  cls, loss = FAMILIES[family]
  return cls(cfg, rngs=nnx.Rngs(params=seed)), loss

__all__ = ["FAMILIES", "LayerSelection", "ModelConfig", "Selection", "TokenSelection", "build_model",
           "model_config", "padded_vocab_size"]
