"""Objectives by name: ``build_objective`` returns the ``Objective`` (example transform and
packing layout) a run's ``data.objective`` names, from the decoder objectives (``objectives``)
and the corruption objectives of encoder and encoder-decoder models (``corruption``)."""
from raptr_jax.data import corruption, objectives, packing
from raptr_jax.data.vocab import BaseVocabulary


def build_objective(name: str, vocab: BaseVocabulary, data_cfg=None, denoisers=None):
  """The ``Objective`` (transform + packing layout) called ``name`` for a run's data config."""
  seq_len = data_cfg.seq_len if data_cfg is not None else 0
  decoder_layout = packing.single_group(("inputs", "targets", "weights", "prefix"), seq_len)
  if name == "causal_lm":
    return objectives.Objective(lambda tokens, n, rng: objectives.causal_lm(tokens, n, vocab), decoder_layout,
                                objectives.causal_lm_length(vocab, seq_len))
  if name == "ul2":
    return objectives.Objective(objectives.UL2(vocab, denoisers or objectives.UL2_DENOISERS), decoder_layout, seq_len)
  if name == "mlm":
    return corruption.masked_lm_objective(vocab, data_cfg)
  if name == "span_corruption":
    return corruption.span_corruption_objective(vocab, data_cfg)
  raise ValueError(f"unknown data.objective {name!r}; available: causal_lm, ul2 (decoder), "
                   "mlm (bert), span_corruption (t5)")
