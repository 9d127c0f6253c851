"""Vocabularies: SentencePiece models, Hugging Face ``tokenizer.json`` files and BERT ``vocab.txt``.

``load_vocabulary(path, extra_ids)`` picks the kind from ``path`` (``data.vocab_path``):

* ``""``: the built-in SentencePiece model (T5 ids: pad 0, eos 1, unk 2, no bos);
* a SentencePiece ``.model`` file (``SentencePieceVocabulary``, read with ``sentencepiece``; a
  gs:// path works): the special ids are the model's own, e.g. T5's (pad 0, eos 1, unk 2) or
  Llama's (unk 0, bos 1, eos 2, no pad); ``extra_ids`` sentinels are appended after the pieces in
  reverse order, as ``seqio.SentencePieceVocabulary`` does: ``<extra_id_0>`` is the last id;
* a Hugging Face ``tokenizer.json`` (``TokenizerVocabulary``, read with ``tokenizers``): the
  special tokens are named by ``tokenizer_config.json`` / ``special_tokens_map.json`` beside it
  (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``, ``mask_token``, ``cls_token``,
  ``sep_token``; ``cls`` / ``sep`` stand for bos / eos when those are not named). A tokenizer
  that has ``<extra_id_0>``, ``<extra_id_1>``, ... (T5's) uses them as its sentinels and ignores
  ``extra_ids``; any other gets ``extra_ids`` sentinels appended after its ids;
* a BERT WordPiece ``vocab.txt`` (``TokenizerVocabulary.from_wordpiece``): the BERT tokenizer
  (lower-cased unless ``tokenizer_config.json`` beside it says ``"do_lower_case": false``);
  [PAD] pad, [UNK] unk, [CLS] bos, [SEP] eos, [MASK] mask;
* a folder (e.g. a downloaded Hugging Face model): the first of ``VOCAB_FILES`` it holds.

Every kind has the interface of ``BaseVocabulary``, which objectives, the scorer and generation
read their ids from:

* ``model_path``: the file that was read (the token cache digests it); ``files``: it and the
  config files beside it that decided the ids;
* ``vocab_size``: ids the model embeds (appended sentinels included); ``base_vocab_size``: the
  ids before the appended sentinels (a SentencePiece model's pieces, a tokenizer's ids);
* ``pad_id``, ``eos_id``, ``unk_id``, ``bos_id``, ``mask_id``: ``bos_id`` / ``mask_id`` /
  ``unk_id`` are None where there is none; a vocabulary without a pad pads with eos (as Hugging
  Face does); one without eos is refused;
* ``extra_ids``, ``sentinel(i)``: the ``<extra_id_i>`` sentinels of span corruption;
* ``piece_id(piece)``: a named token (e.g. UL2's ``[NLU]``), an error naming it if absent;
* ``encode(text)`` / ``encode_batch(texts)``: ids without special tokens; ``decode(ids)``:
  text without pad, sentinels written ``<extra_id_i>``;
* ``special_ids``: the ids that are not ordinary text tokens (pad, eos, bos, unk, mask, cls,
  sep, control / special tokens, sentinels); ``random_token_ids()``: the ordinary ids MLM draws
  random replacements from.

``Vocabulary`` is the SentencePiece model with T5's ids that ``make_vocab`` writes: it refuses
another id layout with the command that trains a compatible one.
"""
import functools
import json
import os
from typing import Optional

import numpy as np
import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # the built-in (T5) vocabulary's ids
BUILTIN_MODEL = os.path.join(os.path.dirname(__file__), "builtin", "shakespeare_spm.model")
# A folder's tokenizer file, in order of preference: a SentencePiece model through sentencepiece
# itself (transformers 5's T5 tokenizer.json drops byte fallback), else tokenizer.json, else BERT's
# WordPiece vocab.txt. hf import picks the same file.
VOCAB_FILES = ("spiece.model", "tokenizer.model", "sentencepiece.model", "tokenizer.json", "vocab.txt")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "cls_token", "sep_token")
KINDS = ("a SentencePiece .model file, a Hugging Face tokenizer.json, a BERT vocab.txt or a folder holding one "
         "(e.g. a downloaded Hugging Face model)")


class BaseVocabulary:
  """What every vocabulary offers (see the module docstring); subclasses set the fields in
  ``__init__`` and define ``_decode_ordinary``, ``encode``, ``encode_batch`` and ``piece_id``."""
  model_path: str
  files: tuple
  base_vocab_size: int
  pad_id: int
  eos_id: int
  unk_id: Optional[int] = None
  bos_id: Optional[int] = None
  mask_id: Optional[int] = None
  extra_ids: int = 0
  _appended: int = 0              # sentinels appended after base_vocab_size
  _carried: tuple = ()            # sentinel ids the tokenizer has itself (<extra_id_i> at index i)

  @property
  def vocab_size(self) -> int:
    return self.base_vocab_size + self._appended

  def sentinel(self, i: int) -> int:
    """Id of ``<extra_id_i>`` (appended ones in T5/seqio numbering: sentinel 0 is the last id)."""
    if not 0 <= i < self.extra_ids:
      raise ValueError(f"sentinel {i} out of range: this vocabulary has {self.extra_ids} extra ids")
    return self._carried[i] if self._carried else self.vocab_size - 1 - i

  @functools.cached_property
  def _sentinel_index(self) -> dict:
    return {self.sentinel(i): i for i in range(self.extra_ids)}

  @functools.cached_property
  def special_ids(self) -> frozenset:
    """Ids that are not ordinary text tokens."""
    named = {self.pad_id, self.eos_id, self.unk_id, self.bos_id, self.mask_id}
    return frozenset(i for i in named | self._other_special_ids() | set(self._sentinel_index) if i is not None)

  def _other_special_ids(self) -> set:
    return set()

  def random_token_ids(self) -> np.ndarray:
    """The ordinary ids (below ``base_vocab_size``, none of ``special_ids``), ascending: what MLM
    draws its random replacements from (read-only)."""
    return self._ordinary_ids

  @functools.cached_property
  def _ordinary_ids(self) -> np.ndarray:
    ids = np.arange(self.base_vocab_size, dtype=np.int64)
    ids = ids[~np.isin(ids, np.fromiter(self.special_ids, np.int64))]
    ids.flags.writeable = False
    return ids

  def decode(self, ids) -> str:
    """Text of ``ids``: pad dropped, sentinels written ``<extra_id_i>``."""
    out, run = [], []
    for i in (int(i) for i in np.asarray(ids).reshape(-1)):
      if i == self.pad_id:
        continue
      if i in self._sentinel_index:
        out += [self._decode_ordinary(run), f"<extra_id_{self._sentinel_index[i]}>"]
        run = []
      elif 0 <= i < self.base_vocab_size:
        run.append(i)
    out.append(self._decode_ordinary(run))
    return "".join(out)

  def _decode_ordinary(self, ids: list) -> str:
    raise NotImplementedError

  def encode(self, text: str) -> list:
    raise NotImplementedError

  def encode_batch(self, texts: list) -> list:
    raise NotImplementedError

  def piece_id(self, piece: str) -> int:
    raise NotImplementedError

  def _missing_piece(self, piece: str, fix: str) -> ValueError:
    return ValueError(f"{self.model_path} has no token {piece!r}, which the objective needs (UL2 needs its "
                      f"paradigm tokens [NLU] [NLG] [S2S]); use data.objective=causal_lm for a vocabulary "
                      f"without them, or {fix}")

  def __repr__(self):
    return f"{type(self).__name__}({self.model_path!r}, vocab_size={self.vocab_size})"


class SentencePieceVocabulary(BaseVocabulary):
  """A SentencePiece model with its own special ids, plus ``extra_ids`` appended sentinels."""

  def __init__(self, model_path: str = BUILTIN_MODEL, extra_ids: int = 100):
    if not _exists(model_path):
      raise _missing(model_path)
    self.model_path, self.files = model_path, (model_path,)
    self.extra_ids = self._appended = extra_ids
    try:
      proto = _read_bytes(model_path)
      if not proto:
        raise _empty(model_path, "a SentencePiece .model file")
      self._sp = spm.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, OSError) as e:
      raise ValueError(
          f"data.vocab_path={model_path!r} is not a SentencePiece model file ({str(e).splitlines()[0][:160]}). "
          "Give the .model file SentencePiece wrote (not the .vocab text file; a tiktoken tokenizer.model, as "
          "Llama 3's, is not one: give its tokenizer.json), or leave data.vocab_path empty for the built-in "
          "vocabulary.") from None
    sp = self._sp
    if sp.eos_id() < 0:
      raise ValueError(f"{model_path}: the SentencePiece model has no eos (eos_id=-1), which every example ends "
                       "with; train one with eos_id >= 0 (`python -m raptr_jax.make_vocab` does)")
    self.base_vocab_size = sp.get_piece_size()
    self.eos_id = sp.eos_id()
    self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else self.eos_id
    self.unk_id = sp.unk_id() if sp.unk_id() >= 0 else None
    self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None

  def _other_special_ids(self) -> set:
    sp = self._sp
    return {i for i in range(self.base_vocab_size) if sp.is_control(i) or sp.is_unknown(i)}

  def piece_id(self, piece: str) -> int:
    """Id of a user-defined piece such as a UL2 paradigm token; error if absent."""
    i = self._sp.piece_to_id(piece)
    if i == self.unk_id and piece != self._sp.id_to_piece(i):
      raise self._missing_piece(piece, "train a vocabulary that has it with `python -m raptr_jax.make_vocab` "
                                       f"(it adds the UL2 paradigm tokens), or SentencePiece with "
                                       f"user_defined_symbols including {piece!r}")
    return i

  def encode(self, text: str) -> list:
    return self._sp.encode(text)

  def encode_batch(self, texts: list) -> list:
    return self._sp.encode(texts)

  def _decode_ordinary(self, ids: list) -> str:
    return self._sp.decode(ids)


class Vocabulary(SentencePieceVocabulary):
  """A SentencePiece model with T5's ids (pad 0, eos 1, unk 2), as ``make_vocab`` writes them;
  another layout is refused with the command that trains a compatible one."""

  def __init__(self, model_path: str = BUILTIN_MODEL, extra_ids: int = 100):
    super().__init__(model_path, extra_ids)
    ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
    if ids != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError(
          f"{model_path}: special ids (pad, eos, unk) are {ids}, T5 conventions need (0, 1, 2). "
          "Train one that has them with `python -m raptr_jax.make_vocab --config=... --output=...` "
          "(or SentencePiece with pad_id=0 eos_id=1 unk_id=2 bos_id=-1).")


class TokenizerVocabulary(BaseVocabulary):
  """A ``tokenizers.Tokenizer`` (a Hugging Face tokenizer.json, or BERT's WordPiece) with the
  special tokens ``specials`` names (keys of ``SPECIAL_KEYS`` -> token strings)."""

  def __init__(self, tokenizer, model_path: str, specials: dict, extra_ids: int = 100, files: tuple = (),
               where: str = "", eos_fix: str = ""):
    tokenizer.no_truncation()
    tokenizer.no_padding()
    self._tok, self.model_path, self.files = tokenizer, model_path, (model_path,) + tuple(files)
    where = where or f"{' or '.join(CONFIG_FILES)} beside it"
    eos_fix = eos_fix or "add e.g. \"eos_token\": \"</s>\" to tokenizer_config.json beside it"

    def lookup(key):
      token = specials.get(key)
      if token is None:
        return None
      i = tokenizer.token_to_id(token)
      if i is None:
        raise ValueError(f"{model_path}: the {key} {token!r} named in {where} is not a token of the tokenizer; "
                         f"correct {key} there")
      return i

    ids = {key: lookup(key) for key in SPECIAL_KEYS}
    self.eos_id = ids["eos_token"] if ids["eos_token"] is not None else ids["sep_token"]
    if self.eos_id is None:
      raise ValueError(f"{model_path}: no eos token (eos_token, or sep_token) is named in {where}, and every "
                       f"example ends with one; {eos_fix}")
    self.bos_id = ids["bos_token"] if ids["bos_token"] is not None else ids["cls_token"]
    self.pad_id = ids["pad_token"] if ids["pad_token"] is not None else self.eos_id
    self.unk_id, self.mask_id = ids["unk_token"], ids["mask_token"]
    self._named = {i for i in ids.values() if i is not None}
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    self.base_vocab_size = max(vocab.values()) + 1 if vocab else 0
    carried = []
    while (i := tokenizer.token_to_id(f"<extra_id_{len(carried)}>")) is not None:
      carried.append(i)
    self._carried = tuple(carried)
    self.extra_ids = len(carried) if carried else extra_ids
    self._appended = 0 if carried else extra_ids

  @classmethod
  def from_tokenizer_json(cls, path: str, extra_ids: int = 100):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    if _is_empty(path):
      raise _empty(path, "a Hugging Face tokenizer.json")
    try:
      tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except  (tokenizers raises a bare Exception)
      raise ValueError(f"data.vocab_path={path!r} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:160]}); "
                       f"give the tokenizer.json a tokenizer's save() wrote, or {KINDS}") from None
    specials, found = _special_tokens(os.path.dirname(path))
    return cls(tokenizer, path, specials, extra_ids, found)

  @classmethod
  def from_wordpiece(cls, path: str, extra_ids: int = 100):
    """BERT's tokenizer over a WordPiece ``vocab.txt`` (one token per line, its id the line
    number), with ``tokenizer_config.json``'s ``do_lower_case`` / ``strip_accents`` /
    ``tokenize_chinese_chars`` when it is beside it (BertTokenizer's defaults otherwise)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers  # pylint: disable=g-import-not-at-top
    if _is_empty(path):
      raise _empty(path, "a BERT WordPiece vocab.txt")
    try:
      with open(path, encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    except (UnicodeDecodeError, OSError) as e:
      raise ValueError(f"data.vocab_path={path!r} is not a WordPiece vocab.txt (UTF-8 text, one token per line: "
                       f"{type(e).__name__}); give BERT's vocab.txt, or {KINDS}") from None
    if "[UNK]" not in vocab:
      raise ValueError(f"data.vocab_path={path!r} is not a BERT WordPiece vocab.txt: it has no [UNK] line; give "
                       f"BERT's vocab.txt (with [PAD] [UNK] [CLS] [SEP] [MASK]), or {KINDS}")
    config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    lowercase = bool(config.get("do_lower_case", True))
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        strip_accents=config.get("strip_accents"), lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    names = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "[CLS]", "eos_token": "[SEP]",
             "mask_token": "[MASK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    specials = {k: t for k, t in names.items() if t in vocab}
    tokenizer.add_special_tokens(sorted(set(specials.values()), key=vocab.get))
    files = (config_path,) if config else ()
    return cls(tokenizer, path, specials, extra_ids, files, where="it (BERT's [SEP])",
               eos_fix="give BERT's vocab.txt, which has a [SEP] line")

  def _other_special_ids(self) -> set:
    return self._named | {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

  def piece_id(self, piece: str) -> int:
    """Id of a token such as a UL2 paradigm token; error if absent."""
    i = self._tok.token_to_id(piece)
    if i is None:
      raise self._missing_piece(piece, f"add {piece!r} to the tokenizer (tokenizer.add_special_tokens) and save it")
    return i

  def encode(self, text: str) -> list:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list) -> list:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def _decode_ordinary(self, ids: list) -> str:
    return self._tok.decode(ids, skip_special_tokens=True) if ids else ""


@functools.lru_cache(maxsize=8)
def load_vocabulary(model_path: str = "", extra_ids: int = 100) -> BaseVocabulary:
  """The vocabulary at ``model_path`` (``data.vocab_path``; "" the built-in one): see the module
  docstring for the kinds."""
  path = vocab_file(model_path)
  name = os.path.basename(path)
  if name.endswith(".json"):
    return TokenizerVocabulary.from_tokenizer_json(path, extra_ids)
  if name.endswith(".txt"):
    return TokenizerVocabulary.from_wordpiece(path, extra_ids)
  return SentencePieceVocabulary(path, extra_ids)


def vocab_file(path: str) -> str:
  """The file ``load_vocabulary(path)`` reads: the built-in model for "", the first of
  ``VOCAB_FILES`` in a folder, else ``path`` itself (which must exist)."""
  if not path:
    return BUILTIN_MODEL
  remote = path.startswith("gs://")
  if remote and (path.endswith((".json", ".txt")) or _isdir(path)):
    raise ValueError(f"data.vocab_path={path!r}: only a SentencePiece .model file is read from gs://; copy the "
                     "tokenizer files to a local folder and point data.vocab_path there")
  if not _exists(path):
    raise _missing(path)
  if not remote and os.path.isdir(path):
    for name in VOCAB_FILES:
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise FileNotFoundError(f"data.vocab_path={path!r} is a folder without a tokenizer file (looked for "
                            f"{', '.join(VOCAB_FILES)}); point it at {KINDS}")
  return path


def _special_tokens(folder: str) -> tuple[dict, tuple]:
  """({key: token string} of ``SPECIAL_KEYS``, the config files read) from the Hugging Face
  config files in ``folder``: tokenizer_config.json first, special_tokens_map.json for the keys it
  does not name."""
  specials, found = {}, []
  for name in CONFIG_FILES:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    found.append(path)
    config = _read_json(path)
    for key in SPECIAL_KEYS:
      value = config.get(key)
      if isinstance(value, dict):
        value = value.get("content")
      if isinstance(value, str) and specials.get(key) is None:
        specials[key] = value
  return specials, tuple(found)


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (ValueError, OSError) as e:
    raise ValueError(f"{path} is not readable JSON ({type(e).__name__}: {str(e)[:120]}); fix or remove it") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object; fix or remove it")
  return value


def _missing(path: str) -> FileNotFoundError:
  return FileNotFoundError(f"data.vocab_path={path!r} does not exist; set it to {KINDS}, or leave it empty for "
                           "the built-in vocabulary")


def _is_empty(path: str) -> bool:
  """Whether ``path`` holds no bytes, or only white space."""
  if not os.path.isfile(path):
    return False
  size = os.path.getsize(path)
  return size == 0 or (size < 64 and not _read_bytes(path).strip())


def _empty(path: str, kind: str) -> ValueError:
  return ValueError(f"data.vocab_path={path!r} is empty (the file holds no data; a copy or download that did "
                    f"not finish?): it should be {kind}. Copy the complete file again, or leave data.vocab_path "
                    "empty for the built-in vocabulary.")


def _exists(path: str) -> bool:
  if path.startswith("gs://"):
    from raptr_jax.data.tf_env import tensorflow  # pylint: disable=g-import-not-at-top
    return tensorflow().io.gfile.exists(path)
  return os.path.exists(path)


def _isdir(path: str) -> bool:
  from raptr_jax.data.tf_env import tensorflow  # pylint: disable=g-import-not-at-top
  return tensorflow().io.gfile.isdir(path)


def _read_bytes(path: str) -> bytes:
  if path.startswith("gs://"):
    from raptr_jax.data.tf_env import tensorflow  # pylint: disable=g-import-not-at-top
    with tensorflow().io.gfile.GFile(path, "rb") as f:
      return f.read()
  with open(path, "rb") as f:
    return f.read()
