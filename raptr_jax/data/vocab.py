"""SentencePiece vocabulary with T5 ids and seqio-compatible sentinels, without TensorFlow.

T5 conventions: pad 0, eos 1, unk 2, no bos. ``extra_ids`` sentinels are appended after the
SentencePiece pieces in reverse order, as ``seqio.SentencePieceVocabulary`` does:
``<extra_id_0>`` is the last id, ``<extra_id_{n-1}>`` the first extra id. A model file trained
with other special ids is rejected with a message saying how to train a compatible one.
"""
import functools
import os

import numpy as np
import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
BUILTIN_MODEL = os.path.join(os.path.dirname(__file__), "builtin", "shakespeare_spm.model")


class Vocabulary:
  """Tokenizer over a SentencePiece model file plus ``extra_ids`` sentinel ids."""

  def __init__(self, model_path: str = BUILTIN_MODEL, extra_ids: int = 100):
    if not _exists(model_path):
      raise FileNotFoundError(
          f"SentencePiece model not found: {model_path!r}. Set data.vocab_path to a .model file "
          "(for example the public T5 vocabulary) or leave it empty for the built-in one.")
    self.model_path = model_path
    self.extra_ids = extra_ids
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=_read_bytes(model_path))
    except (RuntimeError, OSError) as e:
      raise ValueError(
          f"data.vocab_path={model_path!r} is not a SentencePiece model file ({str(e).splitlines()[0][:160]}). "
          "Give the .model file SentencePiece wrote (not the .vocab text file), or leave data.vocab_path "
          "empty for the built-in vocabulary.") from None
    ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
    if ids != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError(
          f"{model_path}: special ids (pad, eos, unk) are {ids}, T5 conventions need (0, 1, 2). "
          "Train one that has them with `python -m raptr_jax.make_vocab --config=... --output=...` "
          "(or SentencePiece with pad_id=0 eos_id=1 unk_id=2 bos_id=-1).")

  @property
  def base_vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def vocab_size(self) -> int:
    return self.base_vocab_size + self.extra_ids

  def sentinel(self, i: int) -> int:
    """Id of ``<extra_id_i>`` (T5/seqio numbering: sentinel 0 is the last id)."""
    if not 0 <= i < self.extra_ids:
      raise ValueError(f"sentinel {i} out of range: this vocabulary has {self.extra_ids} extra ids")
    return self.vocab_size - 1 - i

  def piece_id(self, piece: str) -> int:
    """Id of a user-defined piece such as a UL2 paradigm token; error if absent."""
    i = self._sp.piece_to_id(piece)
    if i == UNK_ID:
      raise ValueError(f"{self.model_path} has no piece {piece!r}, which the objective needs; train a "
                       "vocabulary that has it with `python -m raptr_jax.make_vocab` (it adds the UL2 "
                       f"paradigm tokens), or SentencePiece with user_defined_symbols including {piece!r}.")
    return i

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(texts)

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    out, piece_ids = [], []
    for i in ids:
      if i == PAD_ID:
        continue
      if i >= self.base_vocab_size:
        out.append(self._sp.decode(piece_ids))
        out.append(f"<extra_id_{self.vocab_size - 1 - i}>")
        piece_ids = []
      else:
        piece_ids.append(i)
    out.append(self._sp.decode(piece_ids))
    return "".join(out)


@functools.lru_cache(maxsize=8)
def load_vocabulary(model_path: str = "", extra_ids: int = 100) -> Vocabulary:
  return Vocabulary(model_path or BUILTIN_MODEL, extra_ids)


def _exists(path: str) -> bool:
  if path.startswith("gs://"):
    from raptr_jax.data.tf_env import tensorflow  # pylint: disable=g-import-not-at-top
    return tensorflow().io.gfile.exists(path)
  return os.path.exists(path)


def _read_bytes(path: str) -> bytes:
  if path.startswith("gs://"):
    from raptr_jax.data.tf_env import tensorflow  # pylint: disable=g-import-not-at-top
    with tensorflow().io.gfile.GFile(path, "rb") as f:
      return f.read()
  with open(path, "rb") as f:
    return f.read()
