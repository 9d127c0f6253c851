"""raptr_jax/hf/tokenizer.py: the tokenizer.json written for an exported model encodes exactly as
SentencePiece does, through ``tokenizers`` and through ``transformers.AutoTokenizer``."""
import gzip
import io
import json
import os
import sys
import unicodedata

import pytest
import sentencepiece as spm

from raptr_jax.hf import tokenizer as hf_tokenizer
from raptr_jax.hf.tokenizer import sentencepiece_to_tokenizer_json, write_tokenizer_files

BUILTIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "raptr_jax", "data", "builtin")
MODEL = os.path.join(BUILTIN, "shakespeare_spm.model")
EXTRA_IDS = 100
T5_SPECIAL = {"pad": 0, "eos": 1, "unk": 2, "bos": None}

EDGE_CASES = [
    "", " ", "   ", "\t", "\n\n", "a", "a  b", "  leading", "trailing  ", " both ends ", "a \t b", "tabs\tand\ttabs",
    "line\nbreaks\r\nand\rreturns", "many     spaces   here", "\u3000ideographic\u3000space", "no\u00a0break",
    "zero\u200bwidth", "\u200b leading zero width", "café naïve résumé Ångström", "cafe\u0301 nai\u0308ve",
    "Tiếng Việt có dấu", unicodedata.normalize("NFD", "Tiếng Việt có dấu"), "한국어 텍스트",
    unicodedata.normalize("NFD", "한국어 텍스트"), "日本語のテキスト、カタカナ", "ｶﾀｶﾅ ｶﾞｷﾞ ﾊﾟ", "中文文本，全角标点！",
    "Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ ～", "ﬁne ﬂow Ⅻ ① ㎏ ™ ½ x² H₂O", "emoji 😀 👍🏽 👨‍👩‍👧 🇫🇷 ❤️ 1️⃣",
    "Русский текст, ёжик", "Ελληνικά κείμενα", "हिन्दी भाषा में क्षत्रिय", "ภาษาไทย สวัสดีครับ",
    "مُحَمَّدٌ رَسُولُ اللَّهِ", "\u0645\u0651\u064e\u062f", "בְּרֵאשִׁית בָּרָא",  # points in typed order:
    "\u05e9\u05c1\u05b8", "\u05d1\u05bc\u05b0",  # not canonical order, which NFKC would restore
    "0123456789", "3.14159 + 2,718 = 5.86", "1st 2nd 3rd 100%", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "[NLU] the quick brown fox", "x[NLU]y", "a [NLG]  b [S2S]", "[S2S][NLU]", "  [NLU]  ", "literal <0x41> byte",
    "a<0xE3>b", "▁", "a▁", "▁a", "a ▁ b", "\u00b4", "ŉ ǅ ﬀ",
]
SPECIAL_LITERALS = ["</s>", "x</s>y", "<pad> and <unk>", "<s> (Llama's bos)", "before <extra_id_3> after",
                    "<extra_id_0>", "a<extra_id_99>b<extra_id_0> c", " <extra_id_7> "]


def corpus_texts() -> list:
  """Every scene of the validation split, every 25th of its lines and every 500th training line."""
  out = []
  for split, scenes in (("validation", True), ("train", False)):
    with gzip.open(os.path.join(BUILTIN, f"shakespeare_{split}.jsonl.gz"), "rt", encoding="utf-8") as f:
      docs = [json.loads(line)["text"] for line in f]
    lines = [line for d in docs for line in d.split("\n")]
    out += (docs if scenes else []) + lines[::25 if scenes else 500]
  return out


TEXTS = corpus_texts() + EDGE_CASES


@pytest.fixture(scope="module")
def sp():
  return spm.SentencePieceProcessor(model_file=MODEL)


@pytest.fixture(scope="module")
def converted():
  return sentencepiece_to_tokenizer_json(MODEL, EXTRA_IDS)


def mismatches(encode, sp_model, texts):
  return [(t[:60], encode(t)[:12], sp_model.encode(t)[:12]) for t in texts if encode(t) != sp_model.encode(t)]


def test_builtin_model_encodes_exactly(converted, sp):
  assert len(TEXTS) > 400
  bad = mismatches(lambda t: converted.encode(t, add_special_tokens=False).ids, sp, TEXTS)
  assert not bad, f"{len(bad)} of {len(TEXTS)} strings differ: {bad[:5]}"


def test_ids_of_pieces_and_sentinels(converted, sp):
  base = sp.get_piece_size()
  assert converted.get_vocab_size() == base + EXTRA_IDS
  assert all(converted.token_to_id(sp.id_to_piece(i)) == i for i in range(base))
  assert [converted.token_to_id(f"<extra_id_{i}>") for i in (0, 1, 99)] == [base + 99, base + 98, base]
  assert converted.token_to_id("[NLU]") == sp.piece_to_id("[NLU]") == 3
  specials = {t.content for t in converted.get_added_tokens_decoder().values() if t.special}
  assert {"<pad>", "</s>", "<unk>", "<extra_id_0>"} <= specials and "[NLU]" not in specials


def test_special_token_literals(converted, sp):
  """The documented exception: a special token's literal text is that token (SentencePiece spells
  it out); each side is encoded as SentencePiece encodes it alone; encode_special_tokens is exact."""
  encode = lambda t: converted.encode(t, add_special_tokens=False).ids
  assert encode("x</s>y") == sp.encode("x") + [1] + sp.encode("y")
  sentinel = converted.token_to_id("<extra_id_3>")
  assert encode("before <extra_id_3> after") == sp.encode("before ") + [sentinel] + sp.encode(" after")
  assert sp.encode("<extra_id_3>") != [sentinel]  # SentencePiece does not know the sentinels
  converted.encode_special_tokens = True
  try:
    assert not mismatches(encode, sp, SPECIAL_LITERALS)
  finally:
    converted.encode_special_tokens = False


def test_decode_round_trips(converted, sp):
  for text in TEXTS[-len(EDGE_CASES):] + TEXTS[40:60]:
    ids = sp.encode(text)
    assert converted.decode(ids) == sp.decode(ids), text
  assert converted.decode([1, 0] + sp.encode("Good morrow")) == "Good morrow"  # special tokens skipped


def train_bpe(tmp_path, name, **options):
  """A small SentencePiece model (BPE unless ``model_type`` says otherwise) trained on corpus lines."""
  lines = [t for t in corpus_texts() for t in t.split("\n") if t.strip()]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines[:3000]), model_writer=model, vocab_size=600,
                                 **{"model_type": "bpe", **options}, byte_fallback=True, character_coverage=1.0,
                                 minloglevel=2)
  path = str(tmp_path / f"{name}.model")
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return path


@pytest.fixture(scope="module")
def llama_bpe(tmp_path_factory):
  return train_bpe(tmp_path_factory.mktemp("bpe"), "llama", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)


def test_bpe_models_encode_exactly(llama_bpe, tmp_path):
  t5_like = train_bpe(tmp_path, "t5", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                      user_defined_symbols=["[NLU]", "[NLG]", "[S2S]"])  # what make_vocab --model_type=bpe trains
  # Llama's own settings: no charsmap, spaces kept, digits split; a code model's "\n" piece; also Unigram
  raw = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity", split_digits=True,
             remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, user_defined_symbols=["\n", "<br>"])
  raw_bpe = train_bpe(tmp_path, "raw", **raw)
  raw_unigram = train_bpe(tmp_path, "raw_unigram", model_type="unigram", **raw)
  for path in (llama_bpe, t5_like, raw_bpe, raw_unigram):
    sp_model = spm.SentencePieceProcessor(model_file=path)
    tok = sentencepiece_to_tokenizer_json(path, 0)
    bad = mismatches(lambda t: tok.encode(t, add_special_tokens=False).ids, sp_model, TEXTS)
    assert not bad, f"{path}: {len(bad)} of {len(TEXTS)} strings differ: {bad[:5]}"


def test_refusals(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="no SentencePiece model"):
    sentencepiece_to_tokenizer_json(str(tmp_path / "missing.model"), 0)
  with pytest.raises(ValueError, match="extra_ids"):
    sentencepiece_to_tokenizer_json(MODEL, -1)
  with pytest.raises(ValueError, match="eos"):
    write_tokenizer_files(str(tmp_path), MODEL, 0, {"pad": 0, "eos": None})
  with pytest.raises(ValueError, match="unknown special"):
    write_tokenizer_files(str(tmp_path), MODEL, 0, {"eos": 1, "cls": 3})
  with pytest.raises(ValueError, match="not in the vocabulary"):
    write_tokenizer_files(str(tmp_path), MODEL, 0, {"eos": "<nope>"})
  monkeypatch.delattr(sys.modules["sentencepiece"], "sentencepiece_model_pb2", raising=False)
  monkeypatch.setitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", None)
  with pytest.raises(ImportError, match="pip install protobuf"):
    hf_tokenizer.load_model_proto(MODEL)


def test_files_and_autotokenizer(tmp_path, sp):
  transformers = pytest.importorskip("transformers")
  directory = str(tmp_path / "export")
  paths = write_tokenizer_files(directory, MODEL, EXTRA_IDS, T5_SPECIAL, model_max_length=512)
  assert sorted(os.listdir(directory)) == sorted(os.path.basename(p) for p in paths)
  with open(os.path.join(directory, "spiece.model"), "rb") as a, open(MODEL, "rb") as b:
    assert a.read() == b.read()
  with open(os.path.join(directory, "tokenizer_config.json")) as f:
    config = json.load(f)
  assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "bos_token" not in config
  assert config["additional_special_tokens"][:2] == ["<extra_id_0>", "<extra_id_1>"]

  tok = transformers.AutoTokenizer.from_pretrained(directory)
  vocab_size = sp.get_piece_size() + EXTRA_IDS
  assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, None)
  assert tok.convert_tokens_to_ids("<extra_id_0>") == vocab_size - 1 and len(tok) == vocab_size
  assert tok.model_max_length == 512
  bad = mismatches(lambda t: tok.encode(t, add_special_tokens=False), sp, TEXTS)
  assert not bad, f"{len(bad)} of {len(TEXTS)} strings differ: {bad[:5]}"
  assert tok("Good morrow")["input_ids"] == sp.encode("Good morrow")  # no bos / eos added
  for text in ["Good morrow, sweet Hamlet.", "héllo 日本 😀", "[NLU] To be, or not to be"]:
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
  assert tok.decode([1] + sp.encode("Adieu") + [0], skip_special_tokens=True) == "Adieu"
  split = transformers.AutoTokenizer.from_pretrained(directory, split_special_tokens=True)
  assert not mismatches(lambda t: split.encode(t, add_special_tokens=False), sp, SPECIAL_LITERALS)


def test_llama_ids_through_autotokenizer(llama_bpe, tmp_path):
  transformers = pytest.importorskip("transformers")
  sp_model = spm.SentencePieceProcessor(model_file=llama_bpe)
  write_tokenizer_files(str(tmp_path), llama_bpe, 0, {"pad": None, "eos": "</s>", "unk": "<unk>", "bos": 1})
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, None)
  texts = TEXTS[33:200] + EDGE_CASES
  assert not mismatches(lambda t: tok.encode(t, add_special_tokens=False), sp_model, texts)
  assert tok.encode("<s>Hi</s>", add_special_tokens=False) == [1] + sp_model.encode("Hi") + [2]
  split = transformers.AutoTokenizer.from_pretrained(str(tmp_path), split_special_tokens=True)
  assert not mismatches(lambda t: split.encode(t, add_special_tokens=False), sp_model, SPECIAL_LITERALS)
