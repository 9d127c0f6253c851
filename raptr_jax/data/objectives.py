"""Pretraining objectives, as deterministic numpy transforms of one example's token ids.

Decoder-only objectives map one example (raw token ids) to an *aligned* record of equal-length arrays:
``inputs`` (fed to the model), ``targets`` (the next token at each position), ``weights`` (1
where the loss is taken) and ``prefix`` (1 where attention is bidirectional, the prefix-LM mask
of UL2's decoder-only form). Randomness comes only from ``example_rng(seed, id, epoch)``, so the
same example is corrupted the same way on every host, after resumption, and in any order.

* Causal LM: ``tokens + [eos]``, loss everywhere; with a vocabulary that has a bos (Llama's
  convention) ``[bos] + tokens + [eos]``, so a chunk holds one raw token fewer.
* UL2 mixture of denoisers (Tay et al. 2022, "UL2: Unifying Language Learning Paradigms",
  Section 3.1): each example draws one denoiser and is prefixed with its paradigm token.
  R-denoisers (regular span corruption, ``[NLU]``), X-denoisers (extreme: long spans or high
  rate, ``[NLG]``) use T5 span corruption with sentinels; the S-denoiser (``[S2S]``) is prefix LM:
  the last ``rate`` fraction of the example is the target. Decoder-only form: the sequence is
  ``[paradigm] inputs targets``; the paradigm token and inputs form the bidirectional prefix,
  the loss is on targets only. Defaults: the paper's seven denoisers with equal weight
  (R: mu=3 r=0.15, mu=8 r=0.15; X: mu=3 r=0.5, mu=8 r=0.5, mu=64 r=0.15, mu=64 r=0.5; S: r=0.25).

The encoder-only and encoder-decoder objectives live in ``corruption.py`` (MLM, T5 span
corruption); ``data/build.py``'s ``build_objective`` returns any of them by name. Special ids
(eos, bos, sentinels, paradigm tokens) come from the run's vocabulary (``data/vocab.py``).
"""
import dataclasses
from typing import Callable, Sequence

import numpy as np

from raptr_jax.data.vocab import BaseVocabulary

PARADIGM = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}


@dataclasses.dataclass(frozen=True)
class Objective:
  """An objective as the data pipeline uses it.

  ``transform(tokens, seq_len, rng)`` makes one example's record; ``groups`` say how records
  are packed (one group of aligned fields, or an encoder and a decoder group of their own
  lengths); examples are cut from documents ``chunk_length`` raw tokens at a time;
  ``max_row_weight`` (if set) caps the loss positions of one packed row (MLM sparse prediction).
  """
  transform: Callable
  groups: tuple
  chunk_length: int
  max_row_weight: int = 0

  def __call__(self, tokens, seq_len, rng):
    return self.transform(tokens, seq_len, rng)


@dataclasses.dataclass(frozen=True)
class Denoiser:
  kind: str                 # "R", "X" (span corruption) or "S" (prefix LM)
  rate: float               # noise density (R/X) or target fraction (S)
  mean_span: float = 3.0    # mean noise span length (R/X)
  weight: float = 1.0

  def __post_init__(self):
    if self.kind not in PARADIGM:
      raise ValueError(f"unknown denoiser kind {self.kind!r}; use one of {sorted(PARADIGM)}")
    if not 0.0 < self.rate < 1.0:
      raise ValueError(f"denoiser rate must be in (0, 1), got {self.rate}")
    if self.mean_span < 1:
      raise ValueError(f"mean span must be >= 1, got {self.mean_span}")


UL2_DENOISERS = (
    Denoiser("R", 0.15, 3), Denoiser("R", 0.15, 8),
    Denoiser("X", 0.5, 3), Denoiser("X", 0.5, 8), Denoiser("X", 0.15, 64), Denoiser("X", 0.5, 64),
    Denoiser("S", 0.25),
)


def example_rng(seed: int, example_id: int, epoch: int = 0) -> np.random.Generator:
  example_id = int(example_id)
  return np.random.default_rng([seed, example_id & 0xFFFFFFFF, example_id >> 32, epoch])


def aligned(sequence: np.ndarray, predict: np.ndarray, prefix_len: int) -> dict[str, np.ndarray]:
  """Shifts a full sequence into aligned (inputs, targets, weights, prefix) of length n - 1."""
  n = len(sequence) - 1
  return {
      "inputs": sequence[:-1].astype(np.int32),
      "targets": sequence[1:].astype(np.int32),
      "weights": predict[1:].astype(np.float32),
      "prefix": (np.arange(n) < prefix_len).astype(np.int32),
  }


def causal_lm_length(vocab: BaseVocabulary, seq_len: int) -> int:
  """Raw tokens of one causal-LM example of ``seq_len`` positions: eos takes the shift's extra
  position, a bos one of the ``seq_len``."""
  return max(seq_len - (vocab.bos_id is not None), 0)


def causal_lm(tokens: np.ndarray, seq_len: int, vocab: BaseVocabulary) -> dict[str, np.ndarray]:
  """``[bos] + tokens + [eos]`` (bos only if the vocabulary has one), shifted: ``seq_len``
  positions at most, loss everywhere."""
  bos = [] if vocab.bos_id is None else [vocab.bos_id]
  body = np.asarray(tokens[:causal_lm_length(vocab, seq_len)], np.int32)
  seq = np.concatenate([np.asarray(bos, np.int32), body, [vocab.eos_id]]).astype(np.int32)
  return aligned(seq, np.ones(len(seq), np.float32), prefix_len=0)


def noise_span_counts(length: int, rate: float, mean_span: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of T5 span corruption of ``length`` tokens: round(length*rate)
  noise tokens (at least 1, at most length - 1) in about noise/mean_span spans."""
  num_noise = int(np.clip(round(length * rate), 1, length - 1))
  num_spans = min(max(1, int(round(num_noise / mean_span))), num_noise, length - num_noise)
  return num_noise, num_spans


def random_spans_noise_mask(length: int, rate: float, mean_span: float,
                            rng: np.random.Generator) -> np.ndarray:
  """T5's span-corruption mask: round(length*rate) noise tokens in about n/mean_span spans.

  Noise and non-noise lengths are random partitions; the mask alternates non-noise, noise, ...
  starting with non-noise, so the sequence never starts with a noise span.
  """
  num_noise, num_spans = noise_span_counts(length, rate, mean_span)

  def partition(total, parts):
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else []
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)

  noise = partition(num_noise, num_spans)
  keep = partition(length - num_noise, num_spans)
  mask = np.zeros(length, bool)
  pos = 0
  for k, z in zip(keep, noise):
    pos += k
    mask[pos:pos + z] = True
    pos += z
  return mask


def span_corruption(tokens: np.ndarray, noise_mask: np.ndarray, vocab: BaseVocabulary):
  """T5 inputs/targets: each noise span becomes one sentinel in inputs and leads it in targets."""
  inputs, targets, sentinel = [], [], 0
  prev = False
  for tok, noisy in zip(tokens, noise_mask):
    if noisy and not prev:
      s = vocab.sentinel(sentinel)
      sentinel += 1
      inputs.append(s)
      targets.append(s)
    (targets if noisy else inputs).append(int(tok))
    prev = noisy
  return np.asarray(inputs, np.int32), np.asarray(targets + [vocab.eos_id], np.int32)


def span_corruption_length(length: int, d: Denoiser) -> int:
  """Aligned length of a decoder-only span-corruption example from ``length`` raw tokens."""
  _, spans = noise_span_counts(length, d.rate, d.mean_span)
  return length + 2 * spans + 1  # paradigm token + sentinels twice + eos, minus the shift


class UL2:
  """The UL2 mixture of denoisers in decoder-only (prefix-LM) form."""

  def __init__(self, vocab: BaseVocabulary, denoisers: Sequence[Denoiser] = UL2_DENOISERS):
    if not denoisers:
      raise ValueError("UL2 needs at least one denoiser")
    self.vocab = vocab
    self.denoisers = tuple(denoisers)
    w = np.asarray([d.weight for d in self.denoisers], np.float64)
    if np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f"denoiser weights must be >= 0 with a positive sum, got {w.tolist()}")
    self.probs = w / w.sum()
    self.paradigm_ids = {k: vocab.piece_id(p) for k, p in PARADIGM.items()}

  def max_raw_length(self, d: Denoiser, seq_len: int) -> int:
    if d.kind == "S":
      return seq_len - 1  # paradigm + tokens + eos, minus the shift
    m = seq_len
    while m > 2 and span_corruption_length(m, d) > seq_len:
      m -= 1
    return m

  def __call__(self, tokens: np.ndarray, seq_len: int, rng: np.random.Generator):
    d = self.denoisers[rng.choice(len(self.denoisers), p=self.probs)]
    tokens = np.asarray(tokens[:self.max_raw_length(d, seq_len)], np.int32)
    mode = [self.paradigm_ids[d.kind]]
    if len(tokens) < 4:
      return causal_lm(tokens, seq_len, self.vocab)
    if d.kind == "S":
      n_target = max(1, int(round(len(tokens) * d.rate)))
      inputs, targets = tokens[:-n_target], np.concatenate([tokens[-n_target:], [self.vocab.eos_id]])
    else:
      mask = random_spans_noise_mask(len(tokens), d.rate, d.mean_span, rng)
      if np.sum(mask[1:] & ~mask[:-1]) > self.vocab.extra_ids:
        raise ValueError(f"denoiser {d} needs more than {self.vocab.extra_ids} sentinels at "
                         f"length {len(tokens)}; shorten data.seq_len or raise extra_ids")
      inputs, targets = span_corruption(tokens, mask, self.vocab)
    seq = np.concatenate([mode, inputs, targets]).astype(np.int32)
    prefix_len = 1 + len(inputs)
    predict = (np.arange(len(seq)) >= prefix_len).astype(np.float32)
    return aligned(seq, predict, prefix_len)
