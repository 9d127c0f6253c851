"""Your own corpus as files: plain text, JSONL, Parquet or Arrow, local or remote.

``data.source="files"`` reads the documents of ``data.files.train`` (and ``validation``): comma-
separated paths or globs (``**`` recurses), local or remote (``gs://...``, through TensorFlow's
filesystem layer, which seqio and tfds use too). A file's format comes from its name
(``data.files.format="auto"``; ``.gz`` is decompressed) or is given:

* ``text`` (``.txt``): ``data.files.documents`` says what a document is: ``line`` (one per line,
  as seqio's ``TextLineDataSource`` reads), ``paragraph`` (blank-line separated) or ``file``;
* ``jsonl`` (``.jsonl``, ``.json``): one JSON object per line, the text in ``data.files.field``;
* ``parquet`` (``.parquet``) and ``arrow`` (``.arrow``: Arrow IPC files or streams, as Hugging
  Face ``datasets`` saves them): the text in column ``data.files.field``.

Files are read in sorted order and documents in file order; ``token_cache.py`` tokenizes them
once and the run shuffles by seed. Bad input stops with the file named: a path or glob that
matches nothing, a file with no documents, a missing field or column, bytes that are not UTF-8
(with their byte offset; ``data.files.encoding_errors="replace"`` reads them as U+FFFD).
"""
import functools
import glob
import gzip
import hashlib
import json
import os
from typing import Iterator

FORMATS = ("auto", "text", "jsonl", "parquet", "arrow")
DOCUMENTS = ("line", "paragraph", "file")
ENCODING_ERRORS = ("strict", "replace")
_EXTENSIONS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
               ".parquet": "parquet", ".arrow": "arrow"}


def _remote(path: str) -> bool:
  return "://" in path


def _gfile():
  from raptr_jax.data.tf_env import tensorflow  # pylint: disable=g-import-not-at-top
  return tensorflow().io.gfile


def expand(spec: str, key: str) -> list[str]:
  """The sorted files of a comma-separated list of paths / globs; an entry that matches nothing
  is an error naming it."""
  if not spec or not str(spec).strip():
    raise ValueError(f"{key} is empty; give files or globs, e.g. {key}='data/*.jsonl.gz'")
  files = []
  for pattern in (p.strip() for p in str(spec).split(",") if p.strip()):
    pattern = os.path.expanduser(pattern)
    if _remote(pattern):
      matches = _gfile().glob(pattern)
    else:
      matches = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    if not matches:
      where = "" if _remote(pattern) else f" (relative to {os.getcwd()})"
      raise FileNotFoundError(f"{key}: {pattern!r} matches no file{where}; check the path, or quote the "
                              "glob so the shell does not expand it")
    files.extend(matches)
  return sorted(set(files))


def file_format(path: str, fmt: str = "auto") -> str:
  if fmt not in FORMATS:
    raise ValueError(f"data.files.format must be one of {FORMATS}, got {fmt!r}")
  if fmt != "auto":
    return fmt
  name = path[:-3] if path.endswith(".gz") else path
  ext = os.path.splitext(name)[1].lower()
  if ext not in _EXTENSIONS:
    raise ValueError(f"{path}: cannot tell the format from the extension {ext or '(none)'!r}; set "
                     f"data.files.format to one of {FORMATS[1:]}")
  return _EXTENSIONS[ext]


def _open_binary(path: str):
  f = _gfile().GFile(path, "rb") if _remote(path) else open(path, "rb")
  return gzip.GzipFile(fileobj=f) if path.endswith(".gz") else f


def _decode(data: bytes, path: str, offset: int, errors: str) -> str:
  try:
    return data.decode("utf-8", errors=errors)
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: bytes at offset {offset + e.start} are not UTF-8 ({data[e.start:e.start + 8]!r}); "
                     "fix the file, or set data.files.encoding_errors='replace' to read them as U+FFFD") from None


def _text_documents(f, path: str, documents: str, errors: str) -> Iterator[str]:
  if documents == "file":
    text = _decode(f.read(), path, 0, errors).strip()
    if text:
      yield text
    return
  offset, paragraph = 0, []
  for raw in f:
    line = _decode(raw, path, offset, errors).rstrip("\r\n")
    offset += len(raw)
    if documents == "line":
      if line.strip():
        yield line
    elif line.strip():
      paragraph.append(line)
    elif paragraph:
      yield "\n".join(paragraph)
      paragraph = []
  if paragraph:
    yield "\n".join(paragraph)


def _jsonl_documents(f, path: str, field: str, errors: str) -> Iterator[str]:
  offset = 0
  for number, raw in enumerate(f, 1):
    line = _decode(raw, path, offset, errors)
    offset += len(raw)
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{number}: not a JSON object ({e.msg}); JSONL needs one object per line") from None
    if not isinstance(record, dict) or field not in record:
      fields = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise ValueError(f"{path}:{number}: no field {field!r} (it has {fields}); set data.files.field")
    text = record[field]
    if not isinstance(text, str):
      raise ValueError(f"{path}:{number}: field {field!r} is {type(text).__name__}, not text")
    if text.strip():
      yield text


def _table_documents(path: str, fmt: str, field: str) -> Iterator[str]:
  try:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"{path}: reading {fmt} needs pyarrow (pip install pyarrow, or the data extra)") from None
  if _remote(path) or path.endswith(".gz"):
    with _open_binary(path) as f:
      buffer = pa.py_buffer(f.read())
    source = lambda: pa.BufferReader(buffer)
  else:
    source = lambda: pa.memory_map(path)
  try:
    if fmt == "parquet":
      table = pq.ParquetFile(source())
      names, batches = table.schema_arrow.names, lambda: table.iter_batches(columns=[field], batch_size=1024)
    else:
      try:
        reader = pa.ipc.open_file(source())
        batches = lambda: (reader.get_batch(i) for i in range(reader.num_record_batches))
      except pa.ArrowInvalid:  # not the file format: the streaming format (Hugging Face's .arrow)
        reader = pa.ipc.open_stream(source())
        batches = lambda: iter(reader)
      names = reader.schema.names
  except pa.ArrowInvalid as e:
    raise ValueError(f"{path}: not a {fmt} file ({e})") from None
  if field not in names:
    raise ValueError(f"{path}: no column {field!r} (columns: {names}); set data.files.field")
  for batch in batches():
    for text in batch.column(batch.schema.get_field_index(field)).to_pylist():
      if text and text.strip():
        yield text


def read_documents(path: str, fmt: str = "auto", field: str = "text", documents: str = "line",
                   errors: str = "strict") -> Iterator[str]:
  """The documents (strings) of one file, in file order."""
  if documents not in DOCUMENTS:
    raise ValueError(f"data.files.documents must be one of {DOCUMENTS}, got {documents!r}")
  if errors not in ENCODING_ERRORS:
    raise ValueError(f"data.files.encoding_errors must be one of {ENCODING_ERRORS}, got {errors!r}")
  fmt = file_format(path, fmt)
  try:
    if fmt in ("parquet", "arrow"):
      yield from _table_documents(path, fmt, field)
      return
    with _open_binary(path) as f:
      if fmt == "text":
        yield from _text_documents(f, path, documents, errors)
      else:
        yield from _jsonl_documents(f, path, field, errors)
  except (OSError, EOFError) as e:  # e.g. a truncated .gz
    raise ValueError(f"{path}: cannot be read as {fmt}{' (gzip)' if path.endswith('.gz') else ''}: {e}") from None


def content_digest(path: str) -> str:
  """A file's content hash (16 hex digits of SHA-256), read once per process while its size and
  modification time stay the same."""
  return _digest(*file_identity(path)) if (_remote(path) or os.path.exists(path)) else _digest(path, None, None)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size, mtime) -> str:  # pylint: disable=unused-argument  (size, mtime: the cache key)
  h = hashlib.sha256()
  with (_gfile().GFile(path, "rb") if _remote(path) else open(path, "rb")) as f:
    while block := f.read(1 << 20):
      h.update(block)
  return h.hexdigest()[:16]


def file_identity(path: str) -> tuple:
  """(path, size, mtime): what decides whether a cached tokenization of the file is current."""
  if _remote(path):
    stat = _gfile().stat(path)
    return path, int(stat.length), int(stat.mtime_nsec)
  stat = os.stat(path)
  return os.path.abspath(path), stat.st_size, stat.st_mtime_ns
