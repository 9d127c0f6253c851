"""Model families over one stacked-layer core.

A family is its module class, its ``loss_fn(model, batch, selection, packed) -> (loss, aux)``,
its ``logits_fn`` (same arguments, fp32 logits; Sophia-G samples labels from them), the batch
fields its step reads, the objectives it trains with, and how a method's per-stack
``select(key, batch) -> Selection`` is applied to it (``wrap_select``).

* ``decoder``: GPT / UL2 decoder-only LM (causal LM, UL2 prefix-LM denoisers).
* ``bert``: encoder-only masked LM (BERT, crammed BERT).
* ``t5``: encoder-decoder (T5 v1.1 span corruption).
"""
import dataclasses
from typing import Callable

from flax import nnx

from raptr_jax.models import decoder, encdec, encoder
from raptr_jax.models.config import ModelConfig, padded_vocab_size
from raptr_jax.models.selection import (EncoderDecoderSelection, LayerSelection, Selection, TokenSelection,
                                        for_stacks)


@dataclasses.dataclass(frozen=True)
class Family:
  module: type
  loss_fn: Callable
  logits_fn: Callable
  batch_fields: tuple[str, ...]
  objectives: tuple[str, ...]
  wrap_select: Callable = lambda select, model_cfg: select
  # One stack split into pieces (interlocking backprop): ``layer_inputs(batch, packed)`` ->
  # (positions, segment_ids, prefix) of the stacked layers, ``head_loss(cfg, x, norm_scale, w,
  # batch, packed)`` -> the objective from final hidden states. None: the family has no single stack.
  layer_inputs: Callable | None = None
  head_loss: Callable | None = None
  # Values of the model fields a config leaves empty ("": the family's): T5 divides no attention
  # logits by sqrt(head_dim) and initialises as T5 does.
  defaults: dict = dataclasses.field(default_factory=lambda: {"attention_scale": "head_dim", "init": "normal"})


FAMILIES = {
    "decoder": Family(decoder.DecoderLM, decoder.loss_fn, decoder.logits_fn, decoder.BATCH_FIELDS,
                      ("ul2", "causal_lm"), layer_inputs=decoder.layer_inputs, head_loss=decoder.head_loss),
    "bert": Family(encoder.EncoderMLM, encoder.loss_fn, encoder.logits_fn, encoder.BATCH_FIELDS, ("mlm",),
                   layer_inputs=encoder.layer_inputs, head_loss=encoder.head_loss),
    "t5": Family(encdec.EncoderDecoderLM, encdec.loss_fn, encdec.logits_fn, encdec.BATCH_FIELDS,
                 ("span_corruption",),
                 wrap_select=lambda select, model_cfg: for_stacks(select, model_cfg.select_stacks),
                 defaults={"attention_scale": "none", "init": "t5"}),
}


def get_family(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f"unknown model.family {name!r}; available: {sorted(FAMILIES)}")
  return FAMILIES[name]


def model_config(model_cfg, vocab_size: int, **derived) -> ModelConfig:
  """ModelConfig from the ``model`` section of a run config (vocab padded to a multiple of
  ``vocab_multiple``, 128; fields left "" take the family's ``defaults``);
  ``derived`` sets fields that follow from the data (e.g. ``max_predictions``)."""
  skip = ("family", "vocab_size", "vocab_multiple", "select_stacks")
  fields = {k: v for k, v in model_cfg.items() if k not in skip}
  family = get_family(model_cfg.get("family", "decoder"))
  fields |= {k: v for k, v in family.defaults.items() if fields.get(k, "") == ""}
  return ModelConfig(vocab_size=padded_vocab_size(model_cfg.get("vocab_size") or vocab_size,
                                                 model_cfg.get("vocab_multiple", 128)), **fields | derived)


def build_model(family: str, cfg: ModelConfig, seed: int):
  fam = get_family(family)
  return fam.module(cfg, rngs=nnx.Rngs(params=seed)), fam.loss_fn

__all__ = ["FAMILIES", "EncoderDecoderSelection", "Family", "LayerSelection", "ModelConfig", "Selection",
           "TokenSelection", "build_model", "for_stacks", "get_family", "model_config", "padded_vocab_size"]
