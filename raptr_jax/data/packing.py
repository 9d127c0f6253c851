"""Sequential greedy packing of aligned examples into fixed-length rows with segment ids.

Examples are placed in order; when the next one does not fit in the current row, the row is
closed (padded) and the example starts the next one. An example longer than a row is cut. So
the rows depend only on the example order, and "index of the next example" is an exact resume
point at every row boundary.
"""
import numpy as np

FIELDS = ("inputs", "targets", "weights", "prefix")


class RowPacker:
  """Packs aligned examples into rows of ``seq_len``: fields + segment_ids + positions."""

  def __init__(self, seq_len: int):
    self.seq_len = seq_len
    self._parts: list[dict] = []
    self._used = 0

  def fits(self, example) -> bool:
    return self._used + min(len(example["inputs"]), self.seq_len) <= self.seq_len

  def add(self, example, example_id: int) -> None:
    n = min(len(example["inputs"]), self.seq_len - self._used)
    if n <= 0:
      raise ValueError("row is full; call pop() first")
    self._parts.append({k: example[k][:n] for k in FIELDS} | {"id": example_id, "n": n})
    self._used += n

  @property
  def empty(self) -> bool:
    return not self._parts

  def pop(self) -> dict[str, np.ndarray]:
    """Closes the current row: returns it padded to seq_len and starts a new one."""
    row = {k: np.zeros(self.seq_len, np.float32 if k == "weights" else np.int32) for k in FIELDS}
    row["segment_ids"] = np.zeros(self.seq_len, np.int32)
    row["positions"] = np.zeros(self.seq_len, np.int32)
    ids = []
    pos = 0
    for seg, part in enumerate(self._parts, start=1):
      n = part["n"]
      for k in FIELDS:
        row[k][pos:pos + n] = part[k]
      row["segment_ids"][pos:pos + n] = seg
      row["positions"][pos:pos + n] = np.arange(n)
      ids.append(part["id"])
      pos += n
    self._parts, self._used = [], 0
    row["example_ids"] = ids
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
