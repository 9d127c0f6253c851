"""Model families over one stacked-layer core.

A family is its module class, its ``loss_fn(model, batch, selection, packed) -> (loss, aux)`` and
its ``logits_fn`` (same arguments, fp32 logits; Sophia-G samples labels from them).
"""
import dataclasses
from typing import Callable

from flax import nnx

from raptr_jax.models import decoder
from raptr_jax.models.config import ModelConfig, padded_vocab_size
from raptr_jax.models.selection import LayerSelection, Selection, TokenSelection



@dataclasses.dataclass(frozen=True)
class Family:
  module: type
  loss_fn: Callable
  logits_fn: Callable


FAMILIES = {"decoder": Family(decoder.DecoderLM, decoder.loss_fn, decoder.logits_fn)}


def model_config(model_cfg, vocab_size: int) -> ModelConfig:
  """ModelConfig from the ``model`` section of a run config (vocab padded to a multiple of 128)."""
  fields = {k: v for k, v in model_cfg.items() if k not in ("family", "vocab_size")}
  return ModelConfig(vocab_size=padded_vocab_size(model_cfg.get("vocab_size") or vocab_size), **fields)


def build_model(family: str, cfg: ModelConfig, seed: int):
  if family not in FAMILIES:
    raise ValueError(f"unknown model.family {family!r}; available: {sorted(FAMILIES)}")
  fam = FAMILIES[family]
  return fam.module(cfg, rngs=nnx.Rngs(params=seed)), fam.loss_fn

__all__ = ["FAMILIES", "Family", "LayerSelection", "ModelConfig", "Selection", "TokenSelection", "build_model",
           "model_config", "padded_vocab_size"]
