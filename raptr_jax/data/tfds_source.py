"""Real corpora through seqio and tensorflow-datasets: C4, Wikipedia + BookCorpus, MiniPile.

Each corpus is one or more seqio Tasks over prepared tfds datasets, read from
``data.tfds_data_dir`` (a local path or gs://), each named with its version (seqio reads one
fixed version): ``c4/en:3.1.0``, ``wikipedia/20230601.en:1.0.0`` + ``bookcorpus:1.0.0``,
``minipile:1.0.0``; ``data.tfds_names`` overrides them. BookCorpus and MiniPile are not in the
TFDS catalog: ``data/tfds_builders.py`` defines their builders and prepares them from the
downloaded Hugging Face files. The Tasks read *read-only*: a dataset that is
not prepared fails at once with a message naming the dataset, the directory and how to prepare
it, never with a download attempt. Each Task keeps the text, gives it a stable id (a 48-bit
farmhash of the text, so the same document has the same id after any shuffling, packing or
resumption) and tokenizes it with the run's SentencePiece vocabulary. Documents are then cut into
chunks of the objective's raw length in Python; a chunk's id is ``doc_hash * 4096 + chunk``.

Order and resumption: epoch ``e`` of a Task is read with tfds file shuffling and seqio's shuffle
buffer seeded by ``(seed, e)``; a multi-Task corpus interleaves its Tasks by a seeded draw with
the configured rates. Resuming at position ``k`` of an epoch re-reads and skips the first ``k``
documents (exact, and costs reading them once). This module imports TensorFlow; nothing else in
raptr_jax does at import time.
"""
import dataclasses
import hashlib
import warnings
from typing import Iterator

import numpy as np

from raptr_jax.data import corpus
from raptr_jax.data import tf_env
from raptr_jax.data.vocab import SentencePieceVocabulary, load_vocabulary

MAX_CHUNKS_PER_DOC = corpus.MAX_CHUNKS_PER_DOC


@dataclasses.dataclass(frozen=True)
class Part:
  tfds_name: str
  text_key: str = "text"
  rate: float = 1.0
  splits: tuple = (("train", "train"), ("validation", "validation"))  # ours -> tfds split


CORPORA = {
    "c4": (Part("c4/en:3.1.0"),),
    # Wikipedia has only a train split: its last 0.5% is our validation split.
    "wikipedia_books": (
        Part("wikipedia/20230601.en:1.0.0", rate=0.5,
             splits=(("train", "train[:99.5%]"), ("validation", "train[99.5%:]"))),
        Part("bookcorpus:1.0.0", rate=0.5, splits=(("train", "train[:99.5%]"), ("validation", "train[99.5%:]")))),
    "minipile": (Part("minipile:1.0.0"),),
}

HOW_TO_PREPARE = {
    "c4": "tfds build c4/en:3.1.0 --data_dir=DIR (it needs the Common Crawl WET files; see "
          "https://www.tensorflow.org/datasets/catalog/c4), or copy a prepared c4/en/3.1.0 there "
          "(e.g. `gsutil -m cp -r gs://<bucket>/c4/en/3.1.0 DIR/c4/en/`)",
    "wikipedia_books": "tfds build wikipedia/20230601.en --data_dir=DIR (or copy a prepared "
                       "wikipedia/20230601.en/1.0.0 there), and BookCorpus from its Hugging Face parquet "
                       "files: `python -m raptr_jax.data.tfds_builders bookcorpus --manual_dir=FILES "
                       "--data_dir=DIR` (see raptr_jax/data/tfds_builders.py)",
    "minipile": "download the Hugging Face parquet files (`huggingface-cli download JeanKaddour/minipile "
                "--repo-type=dataset --local-dir=FILES`), then `python -m raptr_jax.data.tfds_builders "
                "minipile --manual_dir=FILES --data_dir=DIR`",
}


def corpus_parts(data_cfg) -> tuple[Part, ...]:
  names = tuple(data_cfg.tfds_names or ())
  if data_cfg.source == "tfds":  # any prepared tfds datasets, mixed 1:1
    if not names:
      raise ValueError("data.source='tfds' reads data.tfds_names, which is empty; e.g. ('my_corpus:1.0.0',)")
    train, validation = tuple(data_cfg.tfds_splits)
    parts = tuple(Part(n, text_key=data_cfg.tfds_text_key, splits=(("train", train), ("validation", validation)))
                  for n in names)
    names = ()
  elif data_cfg.source not in CORPORA:
    raise ValueError(f"data.source={data_cfg.source!r} is not a known corpus; use one of "
                     f"{sorted(CORPORA)}, 'tfds', 'files' or 'builtin'")
  else:
    parts = CORPORA[data_cfg.source]
  if names:
    if len(names) != len(parts):
      raise ValueError(f"data.tfds_names gives {len(names)} names but {data_cfg.source} has "
                       f"{len(parts)} parts ({[p.tfds_name for p in parts]})")
    parts = tuple(dataclasses.replace(p, tfds_name=n) for p, n in zip(parts, names))
  for part in parts:
    if ":" not in part.tfds_name:
      raise ValueError(f"data.tfds_names: {part.tfds_name!r} has no version; seqio reads one fixed version, "
                       f"e.g. '{part.tfds_name}:1.0.0' (the folder name under DATA_DIR/{part.tfds_name}/)")
  return parts


def _task_name(source: str, part: Part, data_dir: str, vocab_path: str, extra_ids: int) -> str:
  key = hashlib.sha1(repr((part, data_dir, vocab_path, extra_ids)).encode()).hexdigest()[:10]
  return f"raptr_{source}_{part.tfds_name.split('/')[0].replace(':', '_')}_{key}"


def register_task(source: str, part: Part, data_dir: str, vocab_path: str = "", extra_ids: int = 100) -> str:
  """Registers (once) and returns the name of the seqio Task reading ``part``."""
  tf, seqio, _ = tf_env.data_stack()
  from raptr_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top,unused-import  (minipile, bookcorpus)
  name = _task_name(source, part, data_dir, vocab_path, extra_ids)
  if name in seqio.TaskRegistry.names():
    return name

  def text_and_id(ds):
    def fn(ex):
      text = ex[part.text_key]
      return {"targets": text, "doc_hash": tf.strings.to_hash_bucket_fast(text, 1 << 48)}
    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)

  vocab = seqio.SentencePieceVocabulary(sentencepiece_model(vocab_path, extra_ids), extra_ids=extra_ids)
  seqio.TaskRegistry.add(
      name,
      source=seqio.TfdsDataSource(tfds_name=part.tfds_name, tfds_data_dir=data_dir or None,
                                  splits=dict(part.splits), read_only=True),
      preprocessors=[text_and_id, seqio.preprocessors.tokenize],
      output_features={"targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)})
  return name


def sentencepiece_model(vocab_path: str, extra_ids: int) -> str:
  """The SentencePiece model file of ``data.vocab_path`` (seqio tokenizes with one); a clear
  error for any other kind of vocabulary."""
  vocab = load_vocabulary(vocab_path, extra_ids)
  if not isinstance(vocab, SentencePieceVocabulary):
    raise ValueError(f"data.vocab_path={vocab_path!r} is not a SentencePiece model ({vocab.model_path}), and the "
                     "seqio / tfds sources tokenize with a SentencePiece vocabulary; use data.source=files (or "
                     "builtin) with this tokenizer, or a SentencePiece .model file")
  return vocab.model_path


class CorpusSource:
  """``iterate(epoch, start)`` over the (id, tokens) chunks of a tfds corpus (see module doc)."""
  stable_ids = True  # ids hash the document text and the chunk index

  def __init__(self, data_cfg, split: str, chunk_length: int, seed: int, shuffle: bool):
    seqio = tf_env.data_stack()[1]
    self.source, self.split, self.chunk_length = data_cfg.source, split, chunk_length
    self.seed, self.shuffle = seed, shuffle
    self.parts = corpus_parts(data_cfg)
    data_dir = data_cfg.tfds_data_dir
    self.tasks = [seqio.get_mixture_or_task(register_task(self.source, p, data_dir, data_cfg.vocab_path,
                                                          data_cfg.extra_ids)) for p in self.parts]
    rates = np.asarray([p.rate for p in self.parts], np.float64)
    self.probs = rates / rates.sum()
    for part, task in zip(self.parts, self.tasks):
      _check_prepared(self.source, part, task, split, data_dir)

  def _documents(self, task, epoch: int, part_index: int, shard=(0, 1)) -> Iterator[tuple[int, np.ndarray]]:
    seqio = tf_env.data_stack()[1]
    info = seqio.ShardInfo(index=shard[0], num_shards=shard[1]) if shard[1] > 1 else None
    if info is not None and epoch == 0 and shard[0] == 0:
      try:
        files = len(task.source.list_shards(self.split))
      except Exception:  # pylint: disable=broad-except  (not listable, e.g. tfds.testing.mock_data)
        files = shard[1]
      if files % shard[1]:
        warnings.warn(f"{task.name} ({self.split}) has {files} files for {shard[1]} stream shards (data.shards): "
                      + ("every shard reads every file and keeps every n-th example" if files < shard[1] else
                         "the shards get unequal numbers of files, so their examples repeat at different rates")
                      + "; a file count that data.shards divides reads each file once", stacklevel=2)
    ds = task.get_dataset(sequence_length=None, split=self.split, shuffle=self.shuffle,
                          seed=int(np.random.default_rng([self.seed, epoch, part_index]).integers(1 << 31)),
                          num_epochs=1, use_cached=False, try_in_mem_cache=False, shard_info=info)
    for ex in ds.as_numpy_iterator():
      yield int(ex["doc_hash"]), np.asarray(ex["targets"], np.int32)

  def _chunks(self, documents):
    for doc_hash, tokens in documents:
      for c, start in enumerate(range(0, len(tokens), self.chunk_length)):
        chunk = tokens[start:start + self.chunk_length]
        if len(chunk) >= corpus.MIN_CHUNK_TOKENS and c < MAX_CHUNKS_PER_DOC:
          yield doc_hash * MAX_CHUNKS_PER_DOC + c, chunk

  def iterate(self, epoch: int, start: int, shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, np.ndarray]]:
    """The epoch's chunks from ``start`` on; ``shard`` (k, n): seqio reads only shard k of n of
    each dataset (tfds file shards), and the mixture draws its own sequence."""
    streams = [self._chunks(self._documents(t, epoch, i, shard)) for i, t in enumerate(self.tasks)]
    if len(streams) == 1:
      pick = lambda: 0
    else:
      draws = np.random.default_rng([self.seed, epoch, 0x313] + ([shard[0], shard[1]] if shard[1] > 1 else []))
      pick = lambda: int(draws.choice(len(streams), p=self.probs))
    position = 0
    while True:
      item = next(streams[pick()], None)
      if item is None:  # an epoch ends when any part runs out, so the rates hold throughout
        return
      if position >= start:
        yield item
      position += 1


def _check_prepared(source, part: Part, task, split: str, data_dir: str) -> None:
  """Fails within seconds, naming the dataset, the directory and how to prepare it."""
  try:
    task.source.get_dataset(split=split, shuffle=False)
  except Exception as e:  # pylint: disable=broad-except  (tfds raises several kinds)
    raise _not_prepared(source, part, split, data_dir, e) from None


def _not_prepared(source, part: Part, split: str, data_dir: str, e: Exception) -> FileNotFoundError:
  where = data_dir or "the default ~/tensorflow_datasets"
  name, _, version = part.tfds_name.partition(":")
  how = HOW_TO_PREPARE.get(source, f"`tfds build {name}` with --data_dir=DIR (tfds writes DIR/{name}/{version}), "
                                   "or copy a prepared one there")
  return FileNotFoundError(
      f"data.source={source!r}: the tfds dataset {part.tfds_name!r} (split {split!r}) is not "
      f"prepared in data.tfds_data_dir={where!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
      f"Prepare it once: {how.replace('DIR', data_dir or '~/tensorflow_datasets')}; "
      "then set data.tfds_data_dir to that directory (local or gs://). "
      "The built-in corpus needs nothing: data.source='builtin'.")


def texts(data_cfg, split: str) -> Iterator[str]:
  """The raw documents of ``split``, part after part, in tfds order (the vocabulary command
  trains on them)."""
  tfds = tf_env.data_stack()[2]
  from raptr_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top,unused-import  (minipile, bookcorpus)
  data_dir = data_cfg.tfds_data_dir or None
  for part in corpus_parts(data_cfg):
    try:
      ds = tfds.builder(part.tfds_name, data_dir=data_dir).as_dataset(split=dict(part.splits)[split],
                                                                      shuffle_files=False)
    except Exception as e:  # pylint: disable=broad-except
      raise _not_prepared(data_cfg.source, part, split, data_cfg.tfds_data_dir, e) from None
    for ex in ds.as_numpy_iterator():
      text = ex[part.text_key]
      yield text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
