"""Deterministic, resumable batch streams: examples -> objective -> packed rows -> batches.

The order of examples in epoch ``e`` is a permutation drawn from ``(seed, e)``; each example's
objective randomness comes from ``(seed, example id, epoch)``. The stream's whole state is
``{"epoch", "cursor"}`` (the next example to place), saved with every checkpoint, so a resumed
run sees exactly the batches an uninterrupted one would. Every host builds the same global batch
and keeps its own rows (``host_rows``), which keeps multi-host runs in lockstep.
"""
from typing import Callable, Iterator

import numpy as np

from raptr_jax.data import corpus, objectives, packing
from raptr_jax.data.vocab import load_vocabulary

BATCH_FIELDS = ("inputs", "targets", "weights", "prefix", "segment_ids", "positions")


class PackedStream:
  """Global batches of packed rows from a list of (id, tokens) examples."""

  def __init__(self, examples, objective: Callable, seq_len: int, batch_size: int, seed: int,
               shuffle: bool, repeat: bool, max_segments: int = 64):
    if not examples:
      raise ValueError("the data stream has no examples")
    self.examples = examples
    self.objective = objective
    self.seq_len = seq_len
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    self.repeat = repeat
    self.max_segments = max_segments
    self.epoch, self.cursor = 0, 0
    self._order = self._epoch_order(0)

  def _epoch_order(self, epoch):
    if not self.shuffle:
      return np.arange(len(self.examples))
    return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self.examples))

  def get_state(self) -> dict:
    return {"epoch": int(self.epoch), "cursor": int(self.cursor)}

  def set_state(self, state: dict) -> None:
    self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
    self._order = self._epoch_order(self.epoch)

  def _next_example(self):
    if self.cursor >= len(self._order):
      if not self.repeat:
        return None
      self.set_state({"epoch": self.epoch + 1, "cursor": 0})
    example_id, tokens = self.examples[self._order[self.cursor]]
    rng = objectives.example_rng(self.seed, example_id, self.epoch)
    return example_id, self.objective(tokens, self.seq_len, rng)

  def next_batch(self) -> dict[str, np.ndarray] | None:
    """The next global batch, or None when a non-repeating stream is exhausted."""
    rows, packer = [], packing.RowPacker(self.seq_len)
    while len(rows) < self.batch_size:
      state = (self.epoch, self.cursor)
      item = self._next_example()
      if item is None:
        break
      example_id, example = item
      if not packer.empty and not packer.fits(example):
        rows.append(packer.pop())
        self.epoch, self.cursor = state  # this example starts the next row
        self._order = self._epoch_order(self.epoch)
        continue
      packer.add(example, example_id)
      self.cursor += 1
    if len(rows) < self.batch_size and not packer.empty:
      rows.append(packer.pop())
    if not rows:
      return None
    while len(rows) < self.batch_size:  # end of a finite stream: empty rows carry no loss
      rows.append(packing.RowPacker(self.seq_len).pop())
    return packing.stack_rows(rows, self.max_segments)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    while (batch := self.next_batch()) is not None:
      yield batch


def host_rows(batch: dict[str, np.ndarray], process_index: int, process_count: int):
  """This host's contiguous slice of a global batch."""
  n = len(batch["inputs"])
  if n % process_count:
    raise ValueError(f"global batch {n} is not divisible by the {process_count} hosts")
  per = n // process_count
  return {k: v[process_index * per:(process_index + 1) * per] for k, v in batch.items()}


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0):
  """Uniform random tokens, one causal segment per row (benchmarks; no corpus, no TF)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab_size, size=(batch_size, seq_len + 1), dtype=np.int32)
  return {
      "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
      "weights": np.ones((batch_size, seq_len), np.float32),
      "prefix": np.zeros((batch_size, seq_len), np.int32),
      "segment_ids": np.ones((batch_size, seq_len), np.int32),
      "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy(),
      "example_ids": np.arange(batch_size, dtype=np.int64)[:, None],
  }


def build_stream(data_cfg, split: str, batch_size: int, seed: int, train: bool) -> PackedStream:
  """The stream a config asks for. Only the built-in corpus is wired in the core."""
  if data_cfg.source != "builtin":
    raise ValueError(
        f"data.source={data_cfg.source!r} is not available; the decoder core reads the built-in "
        "corpus ('builtin'). Benchmarks use synthetic tokens (bench/bench_step.py).")
  vocab = load_vocabulary(data_cfg.vocab_path)
  denoisers = [objectives.Denoiser(**d) for d in data_cfg.denoisers] if data_cfg.denoisers else None
  objective = objectives.build_objective(data_cfg.objective, vocab, denoisers)
  examples = corpus.chunked_examples(split, data_cfg.vocab_path, data_cfg.seq_len)
  return PackedStream(examples, objective, data_cfg.seq_len, batch_size, seed,
                      shuffle=train, repeat=train)


class Prefetcher:
  """Builds the next batches on a background thread while the device computes.

  Each queued batch travels with the stream state *after* it, so ``get_state()`` always names
  the position after the last batch handed out, however far the thread has read ahead.
  """

  def __init__(self, stream: PackedStream, depth: int = 2):
    import queue  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    self._stream = stream
    self._state = stream.get_state()
    self._queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, daemon=True)
    self._thread.start()

  def _fill(self):
    try:
      while not self._stop.is_set():
        batch = self._stream.next_batch()
        self._queue.put((batch, self._stream.get_state(), None))
        if batch is None:
          return
    except Exception as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      self._queue.put((None, None, e))

  def next_batch(self):
    batch, state, error = self._queue.get()
    if error is not None:
      raise error
    self._state = state
    return batch

  def get_state(self) -> dict:
    return dict(self._state)

  def close(self):
    self._stop.set()
    while self._thread.is_alive():
      try:
        self._queue.get_nowait()
      except Exception:  # pylint: disable=broad-except
        pass
      self._thread.join(timeout=0.05)
