"""Corruption objectives of encoder-only and encoder-decoder models, written in this repository.

* Masked LM (BERT, Devlin et al. 2019; crammed BERT, Geiping & Goldstein 2022): an example is
  ``tokens[:seq_len - 1] + [eos]``; exactly ``max(1, round(rate * n))`` positions are chosen,
  of which 80% become the mask token, 10% a random ordinary token (``random_token_ids``), 10%
  stay; the loss is taken at the chosen positions only. The mask token is the vocabulary's
  ``[MASK]``; T5 vocabularies have none, so it is the sentinel ``<extra_id_0>``. A vocabulary
  with a bos (BERT's [CLS]) makes ``[cls] + tokens[:seq_len - 2] + [sep]``, as BERT does, and
  never chooses those two positions (Hugging Face's collator masks no special token). Default
  rate 0.15.
* T5 span corruption (Raffel et al. 2020, section 3.1.4): a document chunk of exactly the raw
  length that ``t5_span_lengths`` computes for the requested input length is noised
  (``noise_density`` 0.15, mean span 3); each noise span becomes one sentinel in the inputs and
  leads its tokens in the targets; both end with eos. A full chunk gives exactly the requested
  input length and the computed target length (512 -> raw 568, targets 114 for T5's defaults).
  Decoder inputs are the targets shifted right, starting with the pad id (T5's decoder start, 0).

Randomness comes only from the example's ``rng`` (``objectives.example_rng(seed, id, epoch)``).
"""
import math

import numpy as np

from raptr_jax.data import packing
from raptr_jax.data.objectives import Objective, noise_span_counts, random_spans_noise_mask, span_corruption
from raptr_jax.data.vocab import BaseVocabulary


class MaskedLM:
  """BERT's masked LM of one example (see the module docstring)."""

  def __init__(self, vocab: BaseVocabulary, rate: float = 0.15):
    if not 0.0 < rate < 1.0:
      raise ValueError(f"data.mlm_rate must be in (0, 1), got {rate}")
    if vocab.mask_id is None and vocab.extra_ids < 1:
      raise ValueError(f"MLM needs a mask token: {vocab.model_path} has no [MASK] token, and no extra ids for the "
                       "sentinel <extra_id_0> that stands in for it; set data.extra_ids >= 1")
    self.rate = rate
    self.mask_id = vocab.mask_id if vocab.mask_id is not None else vocab.sentinel(0)
    self.bos_id, self.eos_id = vocab.bos_id, vocab.eos_id
    self.random_ids = vocab.random_token_ids()  # the built-in vocabulary: pieces 3..V-1
    if not len(self.random_ids):
      raise ValueError(f"{vocab.model_path} has no ordinary token for MLM's random replacements")

  def num_masked(self, n: int) -> int:
    return max(1, int(round(self.rate * n)))

  def __call__(self, tokens, seq_len: int, rng: np.random.Generator):
    if self.bos_id is None:  # every position may be chosen, eos included
      body = np.asarray(tokens[:seq_len - 1], np.int32)
      seq = np.concatenate([body, [self.eos_id]]).astype(np.int32)
      n = len(seq)
      chosen = rng.choice(n, size=self.num_masked(n), replace=False)
    else:  # [cls] tokens [sep]: the two special positions are never chosen
      body = np.asarray(tokens[:seq_len - 2], np.int32)
      seq = np.concatenate([[self.bos_id], body, [self.eos_id]]).astype(np.int32)
      n = len(body)
      chosen = 1 + rng.choice(n, size=self.num_masked(n), replace=False) if n else np.zeros(0, np.int64)
    how = rng.random(len(chosen))
    inputs = seq.copy()
    inputs[chosen[how < 0.8]] = self.mask_id
    swap = chosen[(how >= 0.8) & (how < 0.9)]
    inputs[swap] = self.random_ids[rng.integers(0, len(self.random_ids), size=len(swap))]
    weights = np.zeros(len(seq), np.float32)
    weights[chosen] = 1.0
    return {"inputs": inputs, "targets": seq, "weights": weights}


def mlm_max_predictions(seq_len: int, rate: float, requested: int = -1) -> int:
  """Sparse-prediction width P: ``requested`` if >= 0 (0 = dense head), else enough for one
  full-length example plus a little room for rounding when short examples share a row."""
  if requested >= 0:
    return requested
  return min(seq_len, math.ceil(rate * seq_len) + 2)


def masked_lm_objective(vocab: BaseVocabulary, data_cfg) -> Objective:
  mlm = MaskedLM(vocab, data_cfg.mlm_rate)
  p = mlm_max_predictions(data_cfg.seq_len, data_cfg.mlm_rate, data_cfg.max_predictions)
  if p and mlm.num_masked(data_cfg.seq_len) > p:
    raise ValueError(f"data.max_predictions={p} is below the {mlm.num_masked(data_cfg.seq_len)} masked "
                     f"positions of a {data_cfg.seq_len}-token example; raise it or use -1 (auto)")
  groups = packing.single_group(("inputs", "targets", "weights"), data_cfg.seq_len)
  return Objective(mlm, groups, data_cfg.seq_len, max_row_weight=p)


def t5_lengths_of(raw_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
  """(inputs length, targets length) of span corruption of ``raw_length`` tokens, eos included."""
  num_noise, num_spans = noise_span_counts(raw_length, noise_density, mean_span)
  return raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def t5_span_lengths(inputs_length: int, noise_density: float = 0.15, mean_span: float = 3.0):
  """(raw tokens length, targets length): the longest raw chunk whose corrupted inputs fit
  ``inputs_length`` exactly, as T5's ``random_spans_helper`` computes it."""
  if inputs_length < 4:
    raise ValueError(f"span corruption needs data.seq_len (encoder inputs) >= 4, got {inputs_length}")
  raw = 2
  while t5_lengths_of(raw + 1, noise_density, mean_span)[0] <= inputs_length:
    raw += 1
  return raw, t5_lengths_of(raw, noise_density, mean_span)[1]


def target_length(data_cfg) -> int:
  """The decoder length of a span-corruption run (0 for other objectives)."""
  if data_cfg.objective != "span_corruption":
    return 0
  return data_cfg.target_len or t5_span_lengths(data_cfg.seq_len, data_cfg.noise_density,
                                                data_cfg.mean_noise_span)[1]


class SpanCorruption:

  def __init__(self, vocab: BaseVocabulary, raw_length: int, noise_density: float, mean_span: float):
    self.vocab, self.raw_length = vocab, raw_length
    self.noise_density, self.mean_span = noise_density, mean_span

  def __call__(self, tokens, seq_len: int, rng: np.random.Generator):
    tokens = np.asarray(tokens[:self.raw_length], np.int32)
    eos = self.vocab.eos_id
    if len(tokens) < 2:
      inputs, targets = np.concatenate([tokens, [eos]]), np.asarray([eos], np.int32)
    else:
      mask = random_spans_noise_mask(len(tokens), self.noise_density, self.mean_span, rng)
      inputs, targets = span_corruption(tokens, mask, self.vocab)
      inputs = np.concatenate([inputs, [eos]])
    targets = targets.astype(np.int32)
    return {"encoder_inputs": inputs.astype(np.int32),
            "decoder_inputs": np.concatenate([[self.vocab.pad_id], targets[:-1]]).astype(np.int32),
            "targets": targets, "weights": np.ones(len(targets), np.float32)}


def span_corruption_objective(vocab: BaseVocabulary, data_cfg) -> Objective:
  density, span = data_cfg.noise_density, data_cfg.mean_noise_span
  if not 0.0 < density < 1.0 or span < 1:
    raise ValueError(f"data.noise_density must be in (0, 1) and data.mean_noise_span >= 1, got "
                     f"{density} and {span}")
  raw, needed = t5_span_lengths(data_cfg.seq_len, density, span)
  target_len = data_cfg.target_len or needed
  if target_len < needed:
    raise ValueError(
        f"span corruption of {data_cfg.seq_len} input tokens (noise density {density}, mean span "
        f"{span}) makes targets of {needed} tokens, longer than data.target_len={target_len}; "
        f"set data.target_len >= {needed} (or 0 to use exactly {needed})")
  _, spans = noise_span_counts(raw, density, span)
  if spans > vocab.extra_ids:
    raise ValueError(f"span corruption of {raw} raw tokens makes {spans} noise spans but the "
                     f"vocabulary has {vocab.extra_ids} sentinel ids; raise data.extra_ids or "
                     "shorten data.seq_len")
  groups = (packing.Group(data_cfg.seq_len, ("encoder_inputs",), "encoder_segment_ids", "encoder_positions"),
            packing.Group(target_len, ("decoder_inputs", "targets", "weights"), "decoder_segment_ids",
                          "decoder_positions"))
  return Objective(SpanCorruption(vocab, raw, density, span), groups, chunk_length=raw)
