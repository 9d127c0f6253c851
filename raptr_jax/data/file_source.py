"""``data.source="files"``: the examples of your own files, for ``pipeline.PackedStream``.

The files (``data/files.py``) are tokenized once into a memory-mapped cache (``token_cache.py``);
each document is cut into chunks of the objective's raw length, as the built-in corpus is, and
each chunk is one example with the stable id ``document id * 4096 + chunk``. Epoch ``e`` visits
the examples in a permutation drawn from ``(seed, e)`` (the whole corpus, not a buffer), so a
resumed run, at any position, even the middle of a file, continues with exactly the examples an
uninterrupted one would.

Validation: ``data.files.validation`` names its own files; left empty, a share
``data.files.validation_share`` of the training documents is held out by a hash of the
document id (never by position), so the two sides never share a document, nor a copy of one,
whatever the file order, the seed or the number of hosts.
"""
import os
from typing import Iterator

import numpy as np

from raptr_jax.data import corpus
from raptr_jax.data import files as files_lib
from raptr_jax.data import token_cache
from raptr_jax.data.holdout import holdout_draw
from raptr_jax.data.vocab import load_vocabulary

VALIDATION_SALT = 0x7A11DA7E  # the validation hold-out's hash, independent of RHO loss's hold-out


def read_args(files_cfg) -> dict:
  return {"fmt": files_cfg.format, "field": files_cfg.field, "documents": files_cfg.documents,
          "errors": files_cfg.encoding_errors}


def split_spec(files_cfg, split: str) -> tuple[str, str, str | None]:
  """(config key, file spec, hold-out side or None) of ``split``."""
  if split == "train":
    held = "rest" if not files_cfg.validation and files_cfg.validation_share > 0 else None
    return "data.files.train", files_cfg.train, held
  if split != "validation":
    raise ValueError(f"unknown split {split!r} for data.source='files' (train, validation)")
  if files_cfg.validation:
    return "data.files.validation", files_cfg.validation, None
  if not files_cfg.validation_share > 0:
    raise ValueError("data.source='files' needs validation data: set data.files.validation to files, or "
                     "data.files.validation_share to the share of training documents to hold out (e.g. 0.01)")
  return "data.files.train", files_cfg.train, "holdout"


def chunk_table(lengths: np.ndarray, chunk: int):
  """(document index, chunk index, start offset in the document, length) of every chunk of at
  least ``corpus.MIN_CHUNK_TOKENS`` tokens (at most ``MAX_CHUNKS_PER_DOC`` per document)."""
  per_doc = np.minimum(-(-lengths // chunk), corpus.MAX_CHUNKS_PER_DOC).astype(np.int64)
  doc = np.repeat(np.arange(len(lengths)), per_doc)
  first = np.concatenate([[0], np.cumsum(per_doc)[:-1]]).astype(np.int64)
  index = np.arange(len(doc)) - np.repeat(first, per_doc)
  start = index * chunk
  length = np.minimum(chunk, lengths[doc] - start)
  keep = length >= corpus.MIN_CHUNK_TOKENS
  return doc[keep], index[keep], start[keep], length[keep]


class FileSource:
  """``iterate(epoch, start)`` over the (id, tokens) chunks of one split of a files source."""
  stable_ids = True

  def __init__(self, data_cfg, split: str, chunk_length: int, seed: int, shuffle: bool, progress: bool = True):
    f = data_cfg.files
    key, spec, side = split_spec(f, split)
    self.paths = files_lib.expand(spec, key)
    vocab = load_vocabulary(data_cfg.vocab_path, data_cfg.extra_ids)
    self.cache = token_cache.load_or_build(self.paths, read_args(f), vocab, data_cfg.token_cache, key, progress)
    docs = np.arange(len(self.cache.doc_ids))
    if side is not None:
      held = holdout_draw(self.cache.doc_ids, salt=VALIDATION_SALT) < f.validation_share
      docs = docs[held] if side == "holdout" else docs[~held]
      if not len(docs):
        n = len(self.cache.doc_ids)
        raise ValueError(f"data.files.validation_share={f.validation_share} holds out "
                         + (f"none of the {n} documents of {key}; raise it" if side == "holdout" else
                            f"all {n} documents of {key}, leaving none to train on; lower it")
                         + ", or give data.files.validation files")
    doc, index, start, length = chunk_table(self.cache.lengths[docs], chunk_length)
    self.ids = self.cache.doc_ids[docs][doc] * corpus.MAX_CHUNKS_PER_DOC + index
    self.offsets = self.cache.starts[docs][doc] + start
    self.lengths = length
    if not len(self.ids):
      raise ValueError(f"{key}: no document has {corpus.MIN_CHUNK_TOKENS} tokens or more")
    self.seed, self.shuffle = seed, shuffle
    self.version = f"files:{os.path.basename(self.cache.path)}"  # the files' identities, for resume checks

  def __len__(self) -> int:
    return len(self.ids)

  def iterate(self, epoch: int, start: int, shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, np.ndarray]]:
    """The epoch's chunks from ``start`` on (``shard`` (k, n): positions k, k + n, ... of the
    order only, so a host reads only its chunks' bytes of the memory-mapped cache)."""
    order = np.arange(len(self.ids))
    if self.shuffle:
      order = np.random.default_rng([self.seed, epoch, 0xF11E5]).permutation(len(self.ids))
    tokens = self.cache.tokens
    for i in order[shard[0]::shard[1]][start:]:
      yield int(self.ids[i]), np.asarray(tokens[self.offsets[i]:self.offsets[i] + self.lengths[i]], np.int32)


def texts(data_cfg, split: str) -> Iterator[str]:
  """The raw documents of ``split`` in file order (the vocabulary command trains on them); the
  hold-out side is chosen by the same document id as the tokenized source."""
  f = data_cfg.files
  key, spec, side = split_spec(f, split)
  for path in files_lib.expand(spec, key):
    for text in files_lib.read_documents(path, **read_args(f)):
      if side is not None:
        held = holdout_draw([token_cache.document_id(text)], salt=VALIDATION_SALT)[0] < f.validation_share
        if held != (side == "holdout"):
          continue
      yield text
