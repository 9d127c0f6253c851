"""A tokenized copy of a set of files, built once and memory-mapped by every run that reads them.

``load_or_build(files, ...)`` reads the documents of ``files`` (``data/files.py``), tokenizes
them with the run's vocabulary and writes, under ``data.token_cache`` (default
``~/.cache/raptr_jax/tokens``, or ``$XDG_CACHE_HOME/raptr_jax/tokens``) in a folder named by a
hash of what decides the result (each file's path, size and modification time, how documents are
read, the vocabulary's content and extra ids):

* ``tokens.bin``: every document's tokens, end to end (uint16 when the vocabulary fits, else
  int32), memory-mapped, so a corpus larger than memory costs no RAM;
* ``documents.npz``: per document its id, its first token and its length; per file its count.

A document's id is a 48-bit BLAKE2 hash of its text (chunk ids add the chunk index, as the tfds
corpora do): the same text has the same id in any file order, after renaming or splitting files,
and on every host, and an exact duplicate is one id, so the validation hold-out (by id) can
never put a copy of a training document in validation. The folder is written under a temporary
name, synced to disk and renamed into place, so a cache that exists is whole; a changed file gets
a new cache. A write that fails (disk full, permission, I/O error) removes the temporary folder
and stops with the folder, the file and the reason (``CacheWriteError``): nothing is left that a
later run would trust. A cache folder whose files do not match its meta (a damaged copy, a
crash before the sync reached the disk) is set aside and built again, with a warning.
"""
import contextlib
import hashlib
import json
import os
import shutil
import socket

import numpy as np
import tqdm

from raptr_jax.cache import cache_path
from raptr_jax.data import files as files_lib

VERSION = 1
ENCODE_BATCH = 256


def cache_root(configured: str = "") -> str:
  return cache_path("tokens", configured)


def document_id(text: str) -> int:
  """48 bits of BLAKE2b of the text: a document's stable id."""
  return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=6).digest(), "big")


class CacheWriteError(OSError):
  """The token cache could not be written; nothing of it was kept."""


class BrokenCache(ValueError):
  """A cache folder whose files do not match its meta."""


class TokenCache:
  """The memory-mapped tokens and document table of one cache folder (``BrokenCache`` when its
  files do not match its meta: a missing or unreadable file, tokens.bin of another size)."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open(os.path.join(path, "meta.json")) as f:
        self.meta = json.load(f)
      with np.load(os.path.join(path, "documents.npz")) as table:
        self.doc_ids, self.starts, self.lengths = table["ids"], table["starts"], table["lengths"]
        self.file_docs = table["file_docs"]
      tokens_bytes = os.path.getsize(os.path.join(path, "tokens.bin"))
    except Exception as e:  # pylint: disable=broad-except  (OSError, ValueError, zipfile.BadZipFile, KeyError)
      raise BrokenCache(f"{type(e).__name__}: {e}") from None
    total = int(self.lengths.sum())
    want = total * np.dtype(self.meta["dtype"]).itemsize
    if tokens_bytes != want or len(self.doc_ids) != self.meta.get("documents", len(self.doc_ids)):
      raise BrokenCache(f"tokens.bin holds {tokens_bytes} bytes, its table {want}")
    self.tokens = (np.memmap(os.path.join(path, "tokens.bin"), dtype=self.meta["dtype"], mode="r", shape=(total,))
                   if total else np.zeros((0,), self.meta["dtype"]))

  @property
  def files(self) -> list[str]:
    return self.meta["files"]

  def document(self, i: int) -> np.ndarray:
    return self.tokens[self.starts[i]:self.starts[i] + self.lengths[i]]


def _key(identities, read_args: dict, vocab) -> str:
  """The cache folder's name: a hash of the files, how they are read, and the content of the
  vocabulary's file (with the config files beside it that decided its ids, e.g. a WordPiece
  vocabulary's tokenizer_config.json) and extra ids."""
  what = {"version": VERSION, "files": [list(i) for i in identities], "read": read_args,
          "vocab": files_lib.content_digest(vocab.model_path), "extra_ids": vocab.extra_ids}
  others = [p for p in getattr(vocab, "files", ()) if p != vocab.model_path]
  if others:  # (none for a SentencePiece model: its existing caches keep their names)
    what["vocab_files"] = [[os.path.basename(p), files_lib.content_digest(p)] for p in others]
  return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def token_dtype(vocab_size: int):
  """uint16 when every id fits (``vocab_size`` <= 65536, e.g. T5's 32k), else int32 (e.g. a
  128k Llama 3 vocabulary)."""
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def load_or_build(paths: list[str], read_args: dict, vocab, cache_dir: str = "", what: str = "data.files",
                  progress: bool = True) -> TokenCache:
  """The cache of ``paths`` read with ``read_args`` (``files.read_documents``'s options) and
  tokenized with ``vocab``; built first when missing (``what`` names the config key in errors)."""
  identities = [files_lib.file_identity(p) for p in paths]
  root = cache_root(cache_dir)
  final = os.path.join(root, _key(identities, read_args, vocab))
  if os.path.exists(os.path.join(final, "meta.json")):
    try:
      return TokenCache(final)
    except BrokenCache as e:
      _set_aside(final, e)
  partial = f"{final}.partial-{socket.gethostname()}-{os.getpid()}"
  try:
    _build(paths, identities, read_args, vocab, partial, final, what, progress)
    try:
      os.rename(partial, final)
    except OSError as e:
      if not os.path.exists(os.path.join(final, "meta.json")):  # (else another host finished it first: use theirs)
        raise _WriteFailed(e, final) from None
      shutil.rmtree(partial, ignore_errors=True)
  except _WriteFailed as e:
    shutil.rmtree(partial, ignore_errors=True)
    raise CacheWriteError(
        f"{what}: the token cache {final} could not be written: {e.error.strerror or e.error} (writing "
        f"{e.path}). Nothing of it was kept (a later run builds it afresh). Free space or restore write access "
        "there, or set data.token_cache to another folder, then re-run the same command") from None
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return TokenCache(final)


class _WriteFailed(Exception):
  """An OSError of a cache write (``error``) and the file it wrote (``path``)."""

  def __init__(self, error: OSError, path: str):
    super().__init__(str(error))
    self.error, self.path = error, path


@contextlib.contextmanager
def _writing(path: str):
  """Turns an OSError inside into ``_WriteFailed`` naming ``path`` (reads stay what they are)."""
  try:
    yield
  except OSError as e:
    raise _WriteFailed(e, e.filename or path) from None


def _set_aside(final: str, error: Exception) -> None:
  """Moves a broken cache folder out of the way (then deletes it: it is a cache) and says so."""
  aside = f"{final}.broken-{socket.gethostname()}-{os.getpid()}"
  try:
    os.rename(final, aside)
  except OSError:  # another process moved it first
    return
  shutil.rmtree(aside, ignore_errors=True)
  print(f"warning: the token cache {final} was damaged ({error}); it was removed and is built again")


def _build(paths, identities, read_args, vocab, partial, final, what, progress) -> None:
  """Writes the cache of ``paths`` into the folder ``partial`` and syncs it to disk (a failed
  write raises ``_WriteFailed``)."""
  with _writing(partial):
    os.makedirs(os.path.dirname(partial), exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
  dtype = token_dtype(vocab.vocab_size)
  ids, lengths, file_docs = [], [], []
  total_bytes = sum(i[1] for i in identities)
  bar = tqdm.tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not progress,
                  desc=f"tokenizing {len(paths)} file(s) of {what} into {final}")
  tokens_path = os.path.join(partial, "tokens.bin")
  try:
    with _writing(tokens_path):
      out = open(tokens_path, "wb")  # pylint: disable=consider-using-with  (closed below)
    try:
      for path, identity in zip(paths, identities):
        count, batch = 0, []
        for text in files_lib.read_documents(path, **read_args):
          batch.append(text)
          if len(batch) == ENCODE_BATCH:
            count += _write(batch, vocab, dtype, out, ids, lengths, tokens_path)
            batch = []
        count += _write(batch, vocab, dtype, out, ids, lengths, tokens_path)
        if not count:
          raise ValueError(f"{what}: {path} holds no documents (empty, or only blank lines / empty texts); "
                           "remove it from the list or check data.files.format / field / documents")
        file_docs.append(count)
        bar.update(identity[1])
      with _writing(tokens_path):
        out.flush()
        os.fsync(out.fileno())
    finally:
      with _writing(tokens_path):
        out.close()
  finally:
    bar.close()
  lengths = np.asarray(lengths, np.int64)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  table = os.path.join(partial, "documents.npz")
  with _writing(table), open(table, "wb") as f:
    np.savez(f, ids=np.asarray(ids, np.int64), starts=starts, lengths=lengths,
             file_docs=np.asarray(file_docs, np.int64))
    f.flush()
    os.fsync(f.fileno())
  meta = os.path.join(partial, "meta.json")
  with _writing(meta), open(meta, "w") as f:  # last: a folder with meta.json is whole
    json.dump({"version": VERSION, "files": list(paths), "identities": [list(i) for i in identities],
               "read": read_args, "vocab": vocab.model_path, "extra_ids": vocab.extra_ids,
               "dtype": np.dtype(dtype).name, "documents": len(ids), "tokens": int(lengths.sum())}, f, indent=1)
    f.flush()
    os.fsync(f.fileno())


def _write(texts, vocab, dtype, out, ids, lengths, tokens_path) -> int:
  if not texts:
    return 0
  for text, tokens in zip(texts, vocab.encode_batch(texts)):
    with _writing(tokens_path):
      np.asarray(tokens, dtype).tofile(out)
    ids.append(document_id(text))
    lengths.append(len(tokens))
  return len(texts)
