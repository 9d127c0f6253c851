"""A held-out share of the training examples, chosen by stable example id.

RHO loss (Mindermann et al. 2022, as No Train No Gain ran it) trains its irreducible-loss model
on a held-out share of the training data (NTNG: 20%) and the target model on the rest. The split
is a hash of each example's stable id (``holdout_draw``, uniform in [0, 1)), so an example is on
the same side of it in every epoch, in any shuffle order and on any number of hosts.
"""
from typing import Iterator

import numpy as np

PARTS = ("rest", "holdout")
SALT = 0x5EEDF00D


def holdout_draw(ids, salt: int = SALT) -> np.ndarray:
  """A uniform [0, 1) number per example id (SplitMix64 of the id xor ``salt``), fixed for all
  time (another salt: an independent split)."""
  with np.errstate(over="ignore"):
    z = np.asarray(ids, np.int64).astype(np.uint64) ^ np.uint64(salt)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
  return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def in_holdout(ids, share: float) -> np.ndarray:
  return holdout_draw(ids) < share


class HoldoutSplit:
  """One side (``part``: "rest" or "holdout") of a source's examples, split by id at ``share``.

  ``iterate(epoch, start)`` counts ``start`` in the examples of this side, as ``PackedStream``
  expects of a source."""

  def __init__(self, source, share: float, part: str):
    if not 0.0 < share < 1.0:
      raise ValueError(f"data.holdout_share must be in (0, 1) to split the data, got {share}")
    if part not in PARTS:
      raise ValueError(f"data.holdout_part must be one of {PARTS}, got {part!r}")
    if not getattr(source, "stable_ids", False):
      raise ValueError(f"the data source {type(source).__name__} has no stable example ids, so a "
                       "held-out share cannot be split from it; use a source that has them "
                       "(builtin, the tfds corpora)")
    self.source, self.share, self.part = source, share, part
    self.stable_ids = True
    self.version = getattr(source, "version", None)

  def iterate(self, epoch: int, start: int, shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, np.ndarray]]:
    want = self.part == "holdout"
    position = 0
    inner = self.source.iterate(epoch, 0) if shard == (0, 1) else self.source.iterate(epoch, 0, shard=shard)
    for example_id, tokens in inner:
      if bool(in_holdout(example_id, self.share)) != want:
        continue
      if position >= start:
        yield example_id, tokens
      position += 1
