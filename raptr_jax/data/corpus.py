"""The built-in corpus: Shakespeare's plays, one document per scene (see builtin/prepare.py).

Documents are tokenized once per process and cut into chunks of at most ``chunk_tokens``
tokens; each chunk is one example whose stable id is ``doc_id * 4096 + chunk_index``.
"""
import functools
import gzip
import json
import os

import numpy as np

from raptr_jax.data.vocab import load_vocabulary

BUILTIN_DIR = os.path.join(os.path.dirname(__file__), "builtin")
SPLITS = ("train", "validation")
MAX_CHUNKS_PER_DOC = 4096
MIN_CHUNK_TOKENS = 8


def read_documents(split: str) -> list[dict]:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; the built-in corpus has {SPLITS}")
  path = os.path.join(BUILTIN_DIR, f"shakespeare_{split}.jsonl.gz")
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@functools.lru_cache(maxsize=4)
def tokenized_documents(split: str, vocab_path: str) -> tuple[tuple[int, np.ndarray], ...]:
  docs = read_documents(split)
  ids = load_vocabulary(vocab_path).encode_batch([d["text"] for d in docs])
  return tuple((d["id"], np.asarray(t, np.int32)) for d, t in zip(docs, ids))


def chunked_examples(split: str, vocab_path: str, chunk_tokens: int) -> list[tuple[int, np.ndarray]]:
  """[(example_id, tokens)] in corpus order."""
  out = []
  for doc_id, tokens in tokenized_documents(split, vocab_path):
    for c, start in enumerate(range(0, len(tokens), chunk_tokens)):
      chunk = tokens[start:start + chunk_tokens]
      if len(chunk) >= MIN_CHUNK_TOKENS and c < MAX_CHUNKS_PER_DOC:
        out.append((doc_id * MAX_CHUNKS_PER_DOC + c, chunk))
  return out
