"""Sequential greedy packing of examples into fixed-length rows with segment ids.

Examples are placed in order; when the next one does not fit in the current row, the row is
closed (padded) and the example starts the next one. An example longer than a row is cut. So
the rows depend only on the example order, and "index of the next example" is an exact resume
point at every row boundary.

A row has one or more *groups* of aligned fields, each with its own length, segment ids and
positions: one group for decoder-only and encoder-only models, an encoder group and a decoder
group for encoder-decoder models (an example fits only if every group has room).
"""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Group:
  length: int
  fields: tuple[str, ...]
  segment_field: str = "segment_ids"
  position_field: str = "positions"


def single_group(fields, seq_len: int) -> tuple[Group]:
  return (Group(seq_len, tuple(fields)),)


class RowPacker:
  """Packs examples into rows: each group's fields + its segment ids + positions.

  ``max_weight`` > 0 also closes a row before its ``weights`` would sum past it."""

  def __init__(self, groups, max_weight: float = 0):
    if isinstance(groups, int):  # one decoder-style group of this length
      groups = single_group(("inputs", "targets", "weights", "prefix"), groups)
    self.groups = tuple(groups)
    self.max_weight = max_weight
    self._parts: list[dict] = []
    self._used = [0] * len(self.groups)
    self._weight = 0.0

  @property
  def seq_len(self) -> int:
    return self.groups[0].length

  def _weight_of(self, example) -> float:
    return float(np.sum(example["weights"])) if self.max_weight else 0.0

  def fits(self, example) -> bool:
    for g, used in zip(self.groups, self._used):
      if used + min(len(example[g.fields[0]]), g.length) > g.length:
        return False
    return not self.max_weight or self._weight + self._weight_of(example) <= self.max_weight

  def add(self, example, example_id: int) -> None:
    part = {"id": example_id, "n": []}
    for i, g in enumerate(self.groups):
      n = min(len(example[g.fields[0]]), g.length - self._used[i])
      if n <= 0:
        raise ValueError("row is full; call pop() first")
      part |= {k: example[k][:n] for k in g.fields}
      part["n"].append(n)
      self._used[i] += n
    self._weight += self._weight_of(example)
    if self.max_weight and self._weight > self.max_weight:
      raise ValueError(f"one example carries {self._weight_of(example):g} loss positions, more than "
                       f"the {self.max_weight:g} a row may hold; raise data.max_predictions")
    self._parts.append(part)

  @property
  def empty(self) -> bool:
    return not self._parts

  def pop(self) -> dict[str, np.ndarray]:
    """Closes the current row: returns it padded and starts a new one."""
    row = {}
    for i, g in enumerate(self.groups):
      for k in g.fields:
        row[k] = np.zeros(g.length, np.float32 if k == "weights" else np.int32)
      row[g.segment_field] = np.zeros(g.length, np.int32)
      row[g.position_field] = np.zeros(g.length, np.int32)
      pos = 0
      for seg, part in enumerate(self._parts, start=1):
        n = part["n"][i]
        for k in g.fields:
          row[k][pos:pos + n] = part[k]
        row[g.segment_field][pos:pos + n] = seg
        row[g.position_field][pos:pos + n] = np.arange(n)
        pos += n
    row["example_ids"] = [part["id"] for part in self._parts]
    self._parts, self._used, self._weight = [], [0] * len(self.groups), 0.0
    return row


def stack_rows(rows: list[dict], max_segments: int) -> dict[str, np.ndarray]:
  """Stacks rows into a batch; ``example_ids[b, s-1]`` is the stable id of segment s (or -1)."""
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "example_ids"}
  ids = np.full((len(rows), max_segments), -1, np.int64)
  for b, r in enumerate(rows):
    n = min(len(r["example_ids"]), max_segments)
    ids[b, :n] = r["example_ids"][:n]
  batch["example_ids"] = ids
  return batch
