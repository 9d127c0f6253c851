"""Deterministic, resumable batch streams: examples -> objective -> packed rows -> batches.

The order of examples in epoch ``e`` is a permutation drawn from ``(seed, e)``; each example's
objective randomness comes from ``(noise seed, example id, epoch)`` (``data.noise_seed``, -1: the
run's seed), or from ``(noise seed, example id)`` alone with ``data.resample_noise=False``, so an
example is masked the same way in every epoch and by every run (RHO loss needs that). The stream's whole state is
``{"epoch", "cursor"}`` (the next example to place), saved with every checkpoint, so a resumed
run sees exactly the batches an uninterrupted one would.

The training stream can be read as ``data.shards`` independent shards (default one per host):
shard ``k`` of ``n`` packs the examples at positions ``k, k + n, ...`` of each epoch's order into
``batch_size / n`` rows, and a global batch is the shards' rows in shard order. Each host builds
only its own shards (``HostStream``; seqio / tfds read only their file shards, files and the
built-in corpus only their examples), so no host reads the others' rows; example ids stay global.
The batches depend on the shard count, not on the host count, so a run with ``data.shards``
fixed gives the same batches on any number of hosts that divides it. Validation streams and
batch selection's candidate stream are read whole by every host, which keeps their row
selection and finite ends in lockstep (``run.device_batch`` gives each device its rows of a
global batch).
"""
from typing import Iterator

import numpy as np

from raptr_jax.data import corpus, objectives, packing
from raptr_jax.data.build import build_objective
from raptr_jax.data.vocab import load_vocabulary


class ListSource:
  """Examples held in memory: ``[(id, tokens)]``, shuffled per epoch by ``(seed, epoch)``."""
  stable_ids = True  # an example's id is the same in every run (batch selection joins on it)

  def __init__(self, examples, seed: int, shuffle: bool):
    if not examples:
      raise ValueError("the data stream has no examples")
    self.examples, self.seed, self.shuffle = examples, seed, shuffle

  def iterate(self, epoch: int, start: int, shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, np.ndarray]]:
    """The epoch's examples from ``start`` on; ``shard`` (k, n): only positions k, k + n, ... of
    its order (``start`` counts within the shard)."""
    order = np.arange(len(self.examples))
    if self.shuffle:
      order = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self.examples))
    for i in order[shard[0]::shard[1]][start:]:
      yield self.examples[i]


MAX_SEGMENTS = 64  # packed examples per row whose stable ids a batch carries


class PackedStream:
  """Global batches of packed rows from a source of (id, tokens) examples.

  ``source.iterate(epoch, start)`` yields the examples of an epoch from position ``start`` on,
  in an order fixed by the seed; the stream's state is the position of the next example not yet
  placed in a row, so resuming re-creates exactly the rows that would have followed."""

  def __init__(self, source, objective, batch_size: int, seed: int, repeat: bool,
               max_segments: int = MAX_SEGMENTS, noise_seed: int | None = None, resample_noise: bool = True,
               shard: tuple[int, int] = (0, 1)):
    if not isinstance(objective, objectives.Objective):
      raise TypeError("PackedStream needs an objectives.Objective (see data.build.build_objective)")
    self.source = source
    self.objective = objective
    self.batch_size = batch_size
    self.seed = seed
    self.repeat = repeat
    self.max_segments = max_segments
    self.noise_seed = seed if noise_seed is None else noise_seed
    self.resample_noise = resample_noise
    self.shard = tuple(shard)  # (k, n): this stream reads shard k of n of the source
    self.set_state({"epoch": 0, "cursor": 0})

  @property
  def seq_len(self) -> int:
    return self.objective.groups[0].length

  def get_state(self) -> dict:
    state = {"epoch": int(self.epoch), "cursor": int(self.cursor)}
    version = getattr(self.source, "version", None)
    return state | ({"source": version} if version else {})

  def set_state(self, state: dict, allow_changed_source: bool = False) -> None:
    """Positions the stream at ``state``; a source whose content changed since (files a
    ``version`` tells apart, e.g. files added to a glob) is refused unless allowed."""
    if "shards" in state:
      raise ValueError(f"the checkpoint's data position is for the training stream read as {state['shards']} shards, "
                       f"this run reads it whole: resume with --config.data.shards={state['shards']}, or use a "
                       "fresh --workdir")
    version = getattr(self.source, "version", None)
    if version and state.get("source", version) != version and not allow_changed_source:
      raise ValueError(f"the training data changed since this position was saved ({state['source']} there, "
                       f"{version} here: files were added, removed or edited); resuming would continue at the "
                       "same position of other data. Restore the files, use a fresh --workdir, or pass "
                       "--config.train.allow_config_changes=True to continue on the new data")
    self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
    self._iter, self._pending = None, None

  def _iterate(self, epoch: int, start: int):
    if self.shard == (0, 1):
      return self.source.iterate(epoch, start)
    return self.source.iterate(epoch, start, shard=self.shard)

  def _next_example(self):
    """The next example not yet placed (the same one until it is), or None at the end."""
    if self._pending is None:
      if self._iter is None:
        self._iter = self._iterate(self.epoch, self.cursor)
      item = next(self._iter, None)
      if item is None and self.repeat and self.cursor > 0:
        self.epoch, self.cursor = self.epoch + 1, 0
        self._iter = self._iterate(self.epoch, 0)
        item = next(self._iter, None)
      if item is None:
        return None
      example_id, tokens = item
      rng = objectives.example_rng(self.noise_seed, example_id, self.epoch if self.resample_noise else 0)
      self._pending = (example_id, self.objective(tokens, self.seq_len, rng))
    return self._pending

  def next_batch(self) -> dict[str, np.ndarray] | None:
    """The next global batch, or None when a non-repeating stream is exhausted."""
    new_packer = lambda: packing.RowPacker(self.objective.groups, self.objective.max_row_weight)
    rows, packer = [], new_packer()
    while len(rows) < self.batch_size:
      item = self._next_example()
      if item is None:
        break
      example_id, example = item
      if not packer.empty and not packer.fits(example):
        rows.append(packer.pop())  # this example starts the next row
        continue
      packer.add(example, example_id)
      self._pending = None
      self.cursor += 1
    if len(rows) < self.batch_size and not packer.empty:
      rows.append(packer.pop())
    if not rows:
      return None
    while len(rows) < self.batch_size:  # end of a finite stream: empty rows carry no loss
      rows.append(new_packer().pop())
    return packing.stack_rows(rows, self.max_segments)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    while (batch := self.next_batch()) is not None:
      yield batch


class HostStream:
  """This host's shards of a sharded training stream (see the module doc): each batch is the
  host's rows only, its shards' rows in shard order. Its state names every shard of the run
  (``gather_state`` collects the other hosts' at a checkpoint)."""

  def __init__(self, streams: dict[int, PackedStream], num_shards: int):
    self.streams, self.num_shards = dict(sorted(streams.items())), num_shards
    self.source = next(iter(self.streams.values())).source

  @property
  def seq_len(self) -> int:
    return next(iter(self.streams.values())).seq_len

  def next_batch(self):
    parts = [s.next_batch() for s in self.streams.values()]
    empty = [k for k, p in zip(self.streams, parts) if p is None]
    if empty:  # a repeating stream ends only when its shard of the source is empty
      raise ValueError(f"shard(s) {empty} of the training stream's {self.num_shards} have no examples: the training "
                       f"data has fewer examples than data.shards; use fewer shards (data.shards) or more data")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict:
    return {"shards": self.num_shards, "states": {str(k): s.get_state() for k, s in self.streams.items()}}

  def set_state(self, state: dict, allow_changed_source: bool = False) -> None:
    saved = int(state.get("shards", 1))
    if saved != self.num_shards:
      raise ValueError(f"the checkpoint's data position is for the training stream read as {saved} shard(s), this run "
                       f"reads it as {self.num_shards} (data.shards=0 is one per host): resume with "
                       f"--config.data.shards={saved} on a number of hosts that divides {saved}, or use a fresh --workdir")
    for k, stream in self.streams.items():
      stream.set_state(state["states"][str(k)], allow_changed_source)

  def __iter__(self):
    while (batch := self.next_batch()) is not None:
      yield batch


def gather_state(state: dict) -> dict:
  """A sharded stream's state with every host's shards (a collective: every host calls it at
  the same step); anything else as it is."""
  import jax  # pylint: disable=g-import-not-at-top  (the data pipeline does not need jax otherwise)
  if "shards" not in state or jax.process_count() == 1:
    return state
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  n, base = int(state["shards"]), 1 << 30
  table = np.full((n, 3), -1, np.int32)  # epoch, cursor // 2^30, cursor % 2^30 (int32 collectives)
  for k, s in state["states"].items():
    table[int(k)] = (s["epoch"], s["cursor"] // base, s["cursor"] % base)
  table = np.max(np.asarray(multihost_utils.process_allgather(table)), axis=0).astype(np.int64)
  extra = {k: v for k, v in next(iter(state["states"].values())).items() if k not in ("epoch", "cursor")}
  return {"shards": n, "states": {str(k): {"epoch": int(e), "cursor": int(hi) * base + int(lo)} | extra
                                  for k, (e, hi, lo) in enumerate(table)}}


def build_train_stream(data_cfg, batch_size: int, seed: int, num_shards: int, process_index: int,
                       process_count: int, holdout_part: str | None = None):
  """The training stream of this host: the whole stream (``num_shards`` 1, every host builds the
  global batch) or its own shards (``HostStream``, this host's rows only)."""
  if num_shards == 1:
    return build_stream(data_cfg, "train", batch_size, seed, train=True, holdout_part=holdout_part)
  if num_shards % process_count or batch_size % num_shards:
    raise ValueError(f"the training stream in {num_shards} shards over {process_count} hosts of batch {batch_size}: "
                     "the shard count must be a multiple of the hosts and divide data.batch_size; set data.shards")
  per_host = num_shards // process_count
  mine = range(process_index * per_host, (process_index + 1) * per_host)
  return HostStream({k: build_stream(data_cfg, "train", batch_size // num_shards, seed, train=True,
                                     holdout_part=holdout_part, shard=(k, num_shards)) for k in mine}, num_shards)


def host_rows(batch: dict[str, np.ndarray], process_index: int, process_count: int):
  """This host's contiguous slice of a global batch."""
  n = len(batch["example_ids"])
  if n % process_count:
    raise ValueError(f"global batch {n} is not divisible by the {process_count} hosts")
  per = n // process_count
  return {k: v[process_index * per:(process_index + 1) * per] for k, v in batch.items()}


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0,
                    family: str = "decoder", target_len: int = 0):
  """Uniform random tokens, one segment per row, in the batch layout of ``family`` (benchmarks;
  no corpus, no TF). MLM rows carry loss weight at 15% of positions, T5 rows have
  ``target_len`` (default seq_len / 4) decoder tokens."""
  rng = np.random.default_rng(seed)
  tokens = lambda n: rng.integers(3, vocab_size, size=(batch_size, n), dtype=np.int32)
  ones = lambda n: np.ones((batch_size, n), np.int32)
  arange = lambda n: np.broadcast_to(np.arange(n, dtype=np.int32), (batch_size, n)).copy()
  ids = {"example_ids": np.arange(batch_size, dtype=np.int64)[:, None]}
  if family == "t5":
    t = target_len or max(1, seq_len // 4)
    targets = tokens(t)
    return {"encoder_inputs": tokens(seq_len), "encoder_segment_ids": ones(seq_len),
            "encoder_positions": arange(seq_len),
            "decoder_inputs": np.concatenate([np.zeros((batch_size, 1), np.int32), targets[:, :-1]], 1),
            "targets": targets, "weights": np.ones((batch_size, t), np.float32),
            "decoder_segment_ids": ones(t), "decoder_positions": arange(t)} | ids
  seq = tokens(seq_len + 1)
  batch = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "weights": np.ones((batch_size, seq_len), np.float32),
           "prefix": np.zeros((batch_size, seq_len), np.int32), "segment_ids": ones(seq_len),
           "positions": arange(seq_len)} | ids
  if family == "bert":  # exactly round(15%) predicted positions per row, as the MLM objective makes
    batch["targets"] = batch["inputs"]
    picks = np.argsort(rng.random((batch_size, seq_len)), axis=1)[:, :max(1, round(0.15 * seq_len))]
    batch["weights"] = np.zeros((batch_size, seq_len), np.float32)
    np.put_along_axis(batch["weights"], picks, 1.0, axis=1)
  return batch


def noise_seed(data_cfg, seed: int) -> int:
  """The seed of the objectives' randomness (masks, spans, denoisers): ``data.noise_seed`` or
  the run's seed."""
  return seed if data_cfg.noise_seed < 0 else int(data_cfg.noise_seed)


def build_stream(data_cfg, split: str, batch_size: int, seed: int, train: bool,
                 holdout_part: str | None = None, shard: tuple[int, int] = (0, 1)) -> PackedStream:
  """The stream a config asks for: the built-in corpus, your own files (``file_source.py``), or
  prepared tfds datasets via seqio (``tfds_source.py``).

  With ``data.holdout_share > 0`` the training split is cut by example id (``data/holdout.py``)
  and the stream reads the ``data.holdout_part`` side (``holdout_part`` overrides it)."""
  vocab = load_vocabulary(data_cfg.vocab_path, data_cfg.extra_ids)
  denoisers = [objectives.Denoiser(**d) for d in data_cfg.denoisers] if data_cfg.denoisers else None
  objective = build_objective(data_cfg.objective, vocab, data_cfg, denoisers)
  if data_cfg.source == "builtin":
    examples = corpus.chunked_examples(split, data_cfg.vocab_path, objective.chunk_length)
    source = ListSource(examples, seed, shuffle=train)
  elif data_cfg.source == "files":
    from raptr_jax.data.file_source import FileSource  # pylint: disable=g-import-not-at-top
    source = FileSource(data_cfg, split, objective.chunk_length, seed, shuffle=train)
  elif data_cfg.source == "synthetic":
    raise ValueError("data.source='synthetic' has no stream; benchmarks make synthetic batches "
                     "(bench/bench_step.py)")
  else:
    from raptr_jax.data import tfds_source  # pylint: disable=g-import-not-at-top  (TensorFlow)
    source = tfds_source.CorpusSource(data_cfg, split, objective.chunk_length, seed, shuffle=train)
  if split == "train" and data_cfg.holdout_share > 0:
    from raptr_jax.data.holdout import HoldoutSplit  # pylint: disable=g-import-not-at-top
    source = HoldoutSplit(source, data_cfg.holdout_share, holdout_part or data_cfg.holdout_part)
  return PackedStream(source, objective, batch_size, seed, repeat=train,
                      noise_seed=noise_seed(data_cfg, seed), resample_noise=data_cfg.resample_noise, shard=shard)


def documents(data_cfg, split: str):
  """The raw text documents of a config's ``split`` (before tokenization and chunking), in
  corpus order: what a vocabulary is trained on (``raptr_jax.make_vocab``)."""
  if data_cfg.source == "builtin":
    return (d["text"] for d in corpus.read_documents(split))
  if data_cfg.source == "files":
    from raptr_jax.data import file_source  # pylint: disable=g-import-not-at-top
    return file_source.texts(data_cfg, split)
  if data_cfg.source == "synthetic":
    raise ValueError("data.source='synthetic' has no documents")
  from raptr_jax.data import tfds_source  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return tfds_source.texts(data_cfg, split)


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
