"""A SentencePiece model as a Hugging Face ``tokenizer.json`` that encodes as SentencePiece does.

Why: our models are trained on the ids of ``sentencepiece.SentencePieceProcessor.encode``, plus
``extra_ids`` sentinels appended after the pieces in seqio's order (``<extra_id_0>`` is the last
id). An exported model is scored by lm-evaluation-harness through
``transformers.AutoTokenizer.from_pretrained(dir)``, which must give the same ids. transformers 5's
``T5Tokenizer`` has no byte fallback (a character outside the vocabulary becomes ``<unk>`` instead
of its UTF-8 byte pieces) and its ``LlamaTokenizer`` is a BPE tokenizer (it cannot hold a Unigram
model), so neither reproduces our tokenizers. ``sentencepiece_to_tokenizer_json`` builds the
``tokenizers`` pipeline from the model proto itself and ``write_tokenizer_files`` writes it with a
``tokenizer_config.json`` that loads it as a plain ``PreTrainedTokenizerFast``.

How each SentencePiece step is reproduced:

* charsmap: ``normalizers.Precompiled`` applies it per grapheme and then takes the shortest rule
  that prefixes the grapheme, dropping the rest of it (so "ｶﾞ", "ｇ" + U+0306 or NFD Vietnamese
  and Korean lose or keep marks SentencePiece composes). For the NFKC charsmaps (``nmt_nfkc``,
  ``nfkc`` and their ``_cf`` forms) NFKC therefore runs first, which leaves Precompiled only the
  single-character rules of the charsmap's own (whitespace, control characters). NFKC's two
  differences from the charsmap are undone: a noncharacter is put between combining marks in
  non-canonical order (Arabic shadda before its vowel, Hebrew dagesh before its point, as people
  type them), which NFKC would reorder and SentencePiece does not; and the characters NFKC maps
  unlike the charsmap (found by one pass over every code point, about a second: ``nmt_nfkc`` keeps
  the full-width tilde U+FF5E) hide from NFKC behind noncharacters U+FDD0...;
* whitespace (``remove_extra_whitespaces``): leading spaces removed, runs of spaces collapsed (only
  " ": the charsmap has already made tabs, newlines, U+3000 ... spaces where the spec does), the
  dummy prefix (``add_dummy_prefix``; none for a text that normalizes to ""), spaces escaped as
  "▁" and trailing "▁" removed (a literal trailing "▁" too, as SentencePiece does). All of it is in
  the normalizer, so the dummy prefix is added once per text, not once per word;
* model: Unigram with every piece, its score, ``unk_id`` and ``byte_fallback``; its Viterbi search
  runs over the whole normalized text as SentencePiece's lattice does (no split at spaces). BPE:
  merges of every split of a piece into two pieces, ranked by the merged piece's score
  (SentencePiece merges the best-scoring adjacent pair first, the leftmost on ties);
* user-defined pieces (``[NLU]`` ...), which SentencePiece always emits whole: a ``Split``
  pre-tokenizer isolates them in the normalized text (so the text around them is normalized as
  one, dummy prefix and spaces included) and the model maps each to its id (BPE through
  ``ignore_merges``, which takes a segment that is a whole piece as it is). They are not added
  tokens: ``tokenizers`` would normalize their content to "▁[NLU]" and swallow the "▁" before them;
* pieces SentencePiece never emits for text (control ``<pad>`` ``</s>`` ``<s>``, ``<unk>``, byte
  pieces ``<0x41>``, unused ones) sit in the ``tokenizers`` Unigram trie too, with score 0, so their
  literal text would match them: a ``Split`` cuts every such literal where SentencePiece's own
  segmentation of it has a boundary, so they never match and every score (hence the unknown
  penalty, min score - 10) stays SentencePiece's;
* control pieces and ``<unk>``: special added tokens (``skip_special_tokens`` drops them); the
  sentinels ``<extra_id_i>``: special added tokens with seqio's ids ``pieces + extra_ids - 1 - i``;
* decoder: "▁" -> " ", byte pieces fused back into UTF-8, the dummy-prefix space stripped.

What is exact: ``encode(text, add_special_tokens=False)`` equals ``SentencePieceProcessor.encode``
on ordinary text: the tests check every line and scene of the built-in corpus and edge cases (runs
of spaces, tabs, newlines, accents in NFC and NFD, byte-fallback CJK and emoji, full- and
half-width forms, Arabic and Hebrew points in typed order, user-defined pieces inside text, literal
``<0x41>``, "", ...) on the built-in Unigram model and on BPE models. The exceptions:

* the literal text of a special token (``</s>``, ``<pad>``, ``<unk>``, ``<extra_id_3>``) is that one
  token here, as Hugging Face tokenizers do, while SentencePiece spells it with ordinary pieces (it
  does not know the sentinels at all). The text on each side is encoded as SentencePiece encodes
  that part alone: ``encode(a + "<extra_id_3>" + b) == sp.encode(a) + [id of <extra_id_3>] +
  sp.encode(b)``. Loading with ``split_special_tokens=True`` (``Tokenizer.encode_special_tokens =
  True``) spells them as SentencePiece does, so that every text is encoded exactly;
* unnormalized oddities NFKC composes or reorders and SentencePiece does not (a precomposed letter
  followed by a mark that composes with it, e.g. "ś" + U+0307; a Hangul syllable followed by a
  conjoining jamo; marks hidden in compatibility decompositions): random strings of combining marks
  differ in about 1 in 250 here; U+FDD0..U+FDEF (noncharacters) are dropped or rewritten;
* corners no test reaches: a charsmap rule whose output holds a run of spaces (collapsed here); a
  model without ``remove_extra_whitespaces`` given a text that normalizes to "" (SentencePiece
  emits the dummy "▁"); a user-defined piece that the charsmap changes (SentencePiece matches it
  before normalizing) or that its Unigram lattice would not choose (it scores them ``length *
  max_score - 0.1``); BPE: two overlapping splits of one piece, a piece BPE merges cannot reach from
  its own text (after a user-defined piece), unused pieces (SentencePiece re-splits them).

Models with ``treat_whitespace_as_suffix`` or the ``word`` / ``char`` model types are refused.
"""
import functools
import json
import os
import re
import shutil
import unicodedata
import warnings
from typing import Optional

import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

SPACE = "\u2581"  # "▁", SentencePiece's escaped space
# SentencePiece piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
# Charsmaps that are NFKC plus rules of their own: NFKC runs before them (see the module docstring).
NFKC_SPECS = ("nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf")
# Noncharacters (never in interchanged text): U+FDD0.. hide the protected characters from NFKC,
# U+FDEF keeps NFKC from reordering combining marks.
PLACEHOLDERS, MAX_PROTECTED, BLOCK = 0xFDD0, 31, "\uFDEF"
SPECIAL_NAMES = ("pad", "eos", "unk", "bos")


def sentinel_token(i: int) -> str:
  return f"<extra_id_{i}>"


def load_model_proto(model_path: str):
  """The ``ModelProto`` of a SentencePiece ``.model`` file (needs protobuf)."""
  try:
    from sentencepiece import sentencepiece_model_pb2
  except ImportError as e:  # protobuf missing (or too old for the generated module)
    raise ImportError(f"reading a SentencePiece model's settings needs protobuf: pip install protobuf ({e})") from e
  if not os.path.isfile(model_path):
    raise FileNotFoundError(f"no SentencePiece model at {model_path!r}")
  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_path, "rb") as f:
    proto.ParseFromString(f.read())
  if not proto.pieces:
    raise ValueError(f"{model_path} is not a SentencePiece model (no pieces)")
  return proto


@functools.lru_cache(maxsize=1)
def _reordered_marks() -> str:
  """A regex matching between two characters where NFKC would reorder combining marks and
  SentencePiece does not: the first ends (after its NFKD decomposition) in a mark of a higher
  combining class than the mark the second starts with."""
  first, last = {}, {}  # combining class -> code points whose decomposition starts / ends with it
  for cp in range(0x110000):
    c = chr(cp)
    d = c if unicodedata.is_normalized("NFKD", c) else unicodedata.normalize("NFKD", c)
    if d and (k := unicodedata.combining(d[0])):
      first.setdefault(k, []).append(cp)
    if d and (k := unicodedata.combining(d[-1])):
      last.setdefault(k, []).append(cp)

  def char_class(cps):
    cps, ranges, start = sorted(cps), [], None
    for prev, cp in zip([None] + cps, cps + [None]):
      if start is None:
        start = cp
      elif cp is None or cp != prev + 1:
        ranges.append(f"\\x{{{start:X}}}" + (f"-\\x{{{prev:X}}}" if prev != start else ""))
        start = cp
    return "[" + "".join(ranges) + "]"

  pairs = [f"(?<={char_class(last[k])})(?={char_class([cp for j in first if j < k for cp in first[j]])})"
           for k in sorted(last) if any(j < k for j in first)]
  ends, starts = (char_class([cp for cps in d.values() for cp in cps]) for d in (last, first))
  return f"(?<={ends})(?={starts})(?:{'|'.join(pairs)})"  # the first two fail fast between ordinary letters


def _normalizer(spec, protect: tuple = ()) -> normalizers.Normalizer:
  """SentencePiece's ``Normalizer::Normalize`` (see the module docstring); ``protect``: characters
  that NFKC must not touch (the charsmap maps them otherwise), hidden from it behind placeholders."""
  space = SPACE if spec.escape_whitespaces else " "
  steps = []
  if spec.precompiled_charsmap:
    if spec.name in NFKC_SPECS:
      hide = [(c, chr(PLACEHOLDERS + k)) for k, c in enumerate(protect[:MAX_PROTECTED])]
      steps += [normalizers.Replace(Regex(_reordered_marks()), BLOCK)]
      steps += [normalizers.Replace(c, p) for c, p in hide] + [normalizers.NFKC()]
      steps += [normalizers.Replace(p, c) for c, p in hide] + [normalizers.Replace(BLOCK, "")]
    steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
  if spec.remove_extra_whitespaces:
    steps += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
  if spec.add_dummy_prefix:
    steps.append(normalizers.Prepend(" "))  # Prepend leaves "" alone, as SentencePiece does
  if spec.escape_whitespaces:
    steps.append(normalizers.Replace(" ", SPACE))
  if spec.remove_extra_whitespaces:  # trailing spaces, a literal trailing "▁" and a lone dummy prefix
    steps.append(normalizers.Replace(Regex(re.escape(space) + r"+\z"), ""))
  return normalizers.Sequence(steps)


@functools.lru_cache(maxsize=1)
def _nfkc_changed() -> tuple:
  """The code points that NFKC (as ``tokenizers`` implements it) changes."""
  chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000 and c != 0x0A]
  return tuple(c for c, n in zip(chars, normalizers.NFKC().normalize_str("\n".join(chars)).split("\n")) if c != n)


def _nfkc_exceptions(tokenizer: Tokenizer, sp: spm.SentencePieceProcessor) -> tuple:
  """The characters that NFKC changes and that then encode unlike SentencePiece (the charsmap maps
  them otherwise, e.g. keeps them, or it predates the Unicode version that decomposes them)."""
  changed = list(_nfkc_changed())
  ours = tokenizer.encode_batch(changed, add_special_tokens=False)
  exceptions = tuple(c for c, a, b in zip(changed, ours, sp.encode(changed)) if a.ids != b)
  if len(exceptions) > MAX_PROTECTED:
    warnings.warn(f"{len(exceptions)} characters are normalized unlike SentencePiece's charsmap; the "
                  f"tokenizer.json keeps {MAX_PROTECTED} of them exact: "
                  f"{' '.join(f'U+{ord(c):04X}' for c in exceptions[MAX_PROTECTED:][:20])} ... are not")
  return exceptions


def _guard_pattern(proto, sp: spm.SentencePieceProcessor, normalizer) -> Optional[str]:
  """A regex that cuts every literal of a piece SentencePiece never emits from text (control,
  unknown, byte, unused) at a boundary SentencePiece's own segmentation of it has, so the Unigram
  trie of ``tokenizers`` cannot match it; None if there is nothing to guard."""
  from sentencepiece import sentencepiece_pb2  # protobuf is there: load_model_proto read the model
  alternatives = []
  for piece in proto.pieces:
    text = piece.piece
    if piece.type in (NORMAL, USER_DEFINED) or len(text) < 2 or SPACE in text or text.strip() != text:
      continue
    normalized = normalizer.normalize_str(text)
    if normalized.lstrip(SPACE) != text:  # the charsmap rewrites it: no literal can reach the model
      continue
    segmentation = sentencepiece_pb2.SentencePieceText.FromString(sp.encode(text, out_type="serialized_proto"))
    ends = {len(text.encode("utf-8")[:p.end].decode("utf-8", "ignore")) for p in segmentation.pieces}
    cuts = sorted(e for e in ends if 0 < e < len(text)) or [1]
    cut = min(cuts, key=lambda e: abs(2 * e - len(text)))  # nearest the middle: least exposed to context
    alternatives.append(re.escape(text[:cut]) + "(?=" + re.escape(text[cut:]) + ")")
  return "|".join(alternatives) or None


def _model(proto, model_path: str):
  trainer = proto.trainer_spec
  unk_id = trainer.unk_id if 0 <= trainer.unk_id < len(proto.pieces) else None
  if trainer.model_type == UNIGRAM:
    vocab = [(p.piece, p.score) for p in proto.pieces]
    return models.Unigram(vocab, unk_id=unk_id, byte_fallback=trainer.byte_fallback)
  if trainer.model_type == BPE:
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    ranked = sorted((-score, i, piece[:k], piece[k:]) for piece, (score, i) in normal.items()
                    for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
    options = {}
    if any(p.type == USER_DEFINED for p in proto.pieces):
      options["ignore_merges"] = True  # a segment that is one piece stays whole: how isolated user-defined pieces map
    try:
      return models.BPE(ids, [(left, right) for _, _, left, right in ranked], dropout=None, fuse_unk=True,
                        unk_token=proto.pieces[unk_id].piece if unk_id is not None else None,
                        byte_fallback=trainer.byte_fallback, **options)
    except TypeError as e:
      raise ImportError(f"{model_path}: a BPE model with user-defined pieces needs tokenizers>=0.19 "
                        f"(BPE ignore_merges): pip install -U tokenizers ({e})") from e
  kinds = {3: "word", 4: "char"}
  raise ValueError(f"{model_path}: SentencePiece model type {kinds.get(trainer.model_type, trainer.model_type)} "
                   "is not supported (only unigram and bpe)")


def sentencepiece_to_tokenizer_json(model_path: str, extra_ids: int) -> Tokenizer:
  """A ``tokenizers.Tokenizer`` that encodes as the SentencePiece model at ``model_path`` does, with
  ``extra_ids`` sentinels ``<extra_id_i>`` (special added tokens, id ``pieces + extra_ids - 1 - i``)."""
  if extra_ids < 0:
    raise ValueError(f"extra_ids must be >= 0, got {extra_ids}")
  proto = load_model_proto(model_path)
  trainer, spec = proto.trainer_spec, proto.normalizer_spec
  if trainer.treat_whitespace_as_suffix:
    raise ValueError(f"{model_path}: treat_whitespace_as_suffix=true is not supported")
  tokenizer = Tokenizer(_model(proto, model_path))
  tokenizer.normalizer = _normalizer(spec)
  splits = []
  user_defined = sorted((p.piece for p in proto.pieces if p.type == USER_DEFINED), key=len, reverse=True)
  if user_defined:  # longest first: SentencePiece takes the longest match
    splits.append(pre_tokenizers.Split(Regex("|".join(map(re.escape, user_defined))), behavior="isolated"))
  sp = spm.SentencePieceProcessor(model_file=model_path)
  guard = _guard_pattern(proto, sp, tokenizer.normalizer)
  if guard:
    splits.append(pre_tokenizers.Split(Regex(guard), behavior="merged_with_previous"))
  if splits:
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splits)

  if spec.precompiled_charsmap and spec.name in NFKC_SPECS:
    protect = _nfkc_exceptions(tokenizer, sp)
    if protect:
      tokenizer.normalizer = _normalizer(spec, protect)

  steps = [decoders.Replace(SPACE, " ")] if spec.escape_whitespaces else []
  if trainer.byte_fallback:
    steps.append(decoders.ByteFallback())
  steps.append(decoders.Fuse())
  if spec.add_dummy_prefix or spec.remove_extra_whitespaces:
    steps.append(decoders.Strip(content=" ", left=1, right=0))
  tokenizer.decoder = decoders.Sequence(steps)

  # A model token keeps its own id when it becomes an added token.
  tokenizer.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces
                                if p.type in (CONTROL, UNKNOWN)])
  base = len(proto.pieces)
  if extra_ids:
    clash = [sentinel_token(i) for i in range(extra_ids) if tokenizer.token_to_id(sentinel_token(i)) is not None]
    if clash:
      raise ValueError(f"{model_path} already has pieces {clash[:3]}...: it cannot take appended sentinels")
    tokenizer.add_special_tokens([AddedToken(sentinel_token(i), special=True, normalized=False)
                                  for i in reversed(range(extra_ids))])
  for i, piece in enumerate(proto.pieces):
    if tokenizer.token_to_id(piece.piece) != i:
      raise AssertionError(f"piece {piece.piece!r} got id {tokenizer.token_to_id(piece.piece)}, not {i}")
  for i in range(extra_ids):
    if tokenizer.token_to_id(sentinel_token(i)) != base + extra_ids - 1 - i:
      raise AssertionError(f"{sentinel_token(i)} got id {tokenizer.token_to_id(sentinel_token(i))}")
  return tokenizer


def _special_token(tokenizer: Tokenizer, name: str, value) -> Optional[str]:
  if value is None:
    return None
  if isinstance(value, int):
    token = tokenizer.id_to_token(value)
    if token is None:
      raise ValueError(f"{name} id {value} is not in the vocabulary ({tokenizer.get_vocab_size()} ids)")
    return token
  if tokenizer.token_to_id(value) is None:
    raise ValueError(f"{name} token {value!r} is not in the vocabulary")
  return value


def write_tokenizer_files(directory: str, model_path: str, extra_ids: int, special: dict,
                          model_max_length: Optional[int] = None) -> list[str]:
  """Writes ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and the model
  itself as ``spiece.model`` into ``directory`` (created); returns the paths written.

  ``special``: ``pad``, ``eos``, ``unk``, ``bos``, each a token string, an id or None (``eos``
  required), e.g. ``{"pad": 0, "eos": 1, "unk": 2, "bos": None}`` for T5 ids."""
  unknown = set(special) - set(SPECIAL_NAMES)
  if unknown:
    raise ValueError(f"unknown special tokens {sorted(unknown)}; expected {SPECIAL_NAMES}")
  tokenizer = sentencepiece_to_tokenizer_json(model_path, extra_ids)
  tokens = {name: _special_token(tokenizer, name, special.get(name)) for name in SPECIAL_NAMES}
  if tokens["eos"] is None:
    raise ValueError("special['eos'] is required (the eos token the model was trained with)")
  # A named special token that is an ordinary piece becomes a special added token (same id).
  specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
  extra = [t for t in tokens.values() if t is not None and t not in specials]
  if extra:
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(extra)])
  sentinels = [sentinel_token(i) for i in range(extra_ids)]

  os.makedirs(directory, exist_ok=True)
  named = {f"{name}_token": tokens[name] for name in SPECIAL_NAMES if tokens[name] is not None}
  special_map = dict(named, additional_special_tokens=sentinels)
  config = dict(tokenizer_class="PreTrainedTokenizerFast", **special_map, add_bos_token=False, add_eos_token=False,
                clean_up_tokenization_spaces=False)
  if model_max_length is not None:
    config["model_max_length"] = int(model_max_length)
  paths = [os.path.join(directory, name) for name in
           ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")]
  tokenizer.save(paths[0])
  for path, content in zip(paths[1:3], (config, special_map)):
    with open(path, "w", encoding="utf-8") as f:
      json.dump(content, f, indent=2, ensure_ascii=False)
      f.write("\n")
  if os.path.abspath(model_path) != os.path.abspath(paths[3]):
    shutil.copyfile(model_path, paths[3])
  return paths
