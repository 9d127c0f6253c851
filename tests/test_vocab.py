"""Vocabularies (data/vocab.py): the built-in SentencePiece model, other SentencePiece id layouts
(Llama's), Hugging Face tokenizer.json files, BERT WordPiece vocab.txt files and folders; the
objectives, scorer and generation use each one's special ids; bad inputs fail naming the file."""
import io
import json

import numpy as np
import pytest
import sentencepiece as spm

from raptr_jax.config import base_config
from raptr_jax.data import build, corpus, corruption, objectives, token_cache
from raptr_jax.data.vocab import (BUILTIN_MODEL, EOS_ID, PAD_ID, UNK_ID, SentencePieceVocabulary, TokenizerVocabulary,
                                  Vocabulary, load_vocabulary)

TEXT = "To be, or not to be: that is the question. naïve café"
WORDS = ("the quick brown fox jumps over a lazy dog . , and cat sat on mat sees runs".split())


def data_config(**fields):
  cfg = base_config().data
  cfg.update(**{"seq_len": 32, **fields})
  return cfg


def corpus_text(n_docs: int = 40) -> list[str]:
  return [d["text"] for d in corpus.read_documents("train")[:n_docs]]


def train_spm(path, **ids):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_text()), model_writer=model, vocab_size=300,
                                 minloglevel=2, **ids)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(model.getvalue())
  return str(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  """A folder holding a tiny SentencePiece model with Llama's ids: unk 0, bos 1, eos 2, no pad."""
  folder = tmp_path_factory.mktemp("llama")
  train_spm(folder / "tokenizer.model", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
  return str(folder)


def write_wordpiece(folder, lowercase=None) -> str:
  folder.mkdir(parents=True, exist_ok=True)
  tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(WORDS) + ["##es", "##s", "##ing", "cats"]
  (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
  if lowercase is not None:
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lowercase}))
  return str(folder / "vocab.txt")


def bpe_tokenizer(specials, post_bos=False):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(corpus_text(), trainer)
  if post_bos:  # as Llama's tokenizer.json: encode() with special tokens would add <s>
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
  return tok


# ----------------------------------------------------------------------------- built-in

def test_builtin_vocabulary_is_todays_sentencepiece_with_t5_ids():
  vocab = load_vocabulary("")
  sp = spm.SentencePieceProcessor(model_file=BUILTIN_MODEL)
  assert isinstance(vocab, SentencePieceVocabulary) and vocab.model_path == BUILTIN_MODEL
  assert vocab.encode(TEXT) == sp.encode(TEXT) and vocab.encode_batch([TEXT, "A"]) == sp.encode([TEXT, "A"])
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id, vocab.bos_id, vocab.mask_id) == (PAD_ID, EOS_ID, UNK_ID, None, None)
  assert vocab.base_vocab_size == sp.get_piece_size() and vocab.vocab_size == vocab.base_vocab_size + 100
  assert [vocab.sentinel(i) for i in (0, 99)] == [vocab.vocab_size - 1, vocab.base_vocab_size]
  assert vocab.decode(vocab.encode("To be") + [vocab.sentinel(2), PAD_ID]) == "To be<extra_id_2>"
  assert vocab.special_ids == frozenset({0, 1, 2} | set(range(vocab.base_vocab_size, vocab.vocab_size)))
  np.testing.assert_array_equal(vocab.random_token_ids(), np.arange(3, vocab.base_vocab_size))
  assert load_vocabulary(BUILTIN_MODEL).encode(TEXT) == vocab.encode(TEXT)


def test_builtin_mlm_draws_exactly_what_it_drew_before():
  """MaskedLM's random replacements were ``rng.integers(3, base_vocab_size)``: the same draws."""
  vocab = load_vocabulary("")
  mlm = corruption.MaskedLM(vocab, 0.15)
  tokens = np.arange(10, 200, dtype=np.int32)
  for i in range(30):
    got = mlm(tokens, 64, objectives.example_rng(3, i))
    rng = objectives.example_rng(3, i)  # the former transform, step by step
    seq = np.concatenate([tokens[:63], [EOS_ID]]).astype(np.int32)
    chosen = rng.choice(64, size=mlm.num_masked(64), replace=False)
    how = rng.random(len(chosen))
    want = seq.copy()
    want[chosen[how < 0.8]] = vocab.sentinel(0)
    swap = chosen[(how >= 0.8) & (how < 0.9)]
    want[swap] = rng.integers(3, vocab.base_vocab_size, size=len(swap))
    np.testing.assert_array_equal(got["inputs"], want)
    np.testing.assert_array_equal(got["targets"], seq)


def test_builtin_causal_lm_has_no_bos():
  vocab = load_vocabulary("")
  obj = build.build_objective("causal_lm", vocab, data_config())
  assert obj.chunk_length == 32
  ex = obj(np.arange(10, 100), 32, None)
  np.testing.assert_array_equal(ex["inputs"], np.arange(10, 42))
  assert ex["targets"][-1] == EOS_ID


# ----------------------------------------------------------------------------- Llama-layout SentencePiece

def test_llama_layout_sentencepiece_loads_with_its_own_ids(llama_dir):
  from raptr_jax.downstream import generate, scoring
  vocab = load_vocabulary(llama_dir)
  assert vocab.model_path.endswith("tokenizer.model")
  assert (vocab.unk_id, vocab.bos_id, vocab.eos_id, vocab.pad_id, vocab.mask_id) == (0, 1, 2, 2, None)
  assert vocab.vocab_size == 300 + 100 and vocab.sentinel(0) == 399
  assert {0, 1, 2} <= vocab.special_ids and not {0, 1, 2} & set(vocab.random_token_ids().tolist())
  assert vocab.decode(vocab.encode("to be or not to be")) == "to be or not to be"
  with pytest.raises(ValueError, match=r"special ids \(pad, eos, unk\) are \(-1, 2, 0\)"):
    Vocabulary(vocab.model_path)  # make_vocab's T5-convention check stays

  obj = build.build_objective("causal_lm", vocab, data_config())
  assert obj.chunk_length == 31  # bos takes one of the 32 positions
  ex = obj(np.arange(10, 100), 32, None)
  assert len(ex["inputs"]) == 32 and ex["inputs"][0] == 1 and ex["targets"][-1] == 2
  np.testing.assert_array_equal(ex["inputs"][1:], np.arange(10, 41))
  assert ex["weights"].all()

  assert scoring.prefix_token_id(vocab) == 1 and scoring.prefix_token_id(load_vocabulary("")) == EOS_ID
  text = "To be or not"
  assert scoring.encode_pair(vocab, "", text) == ([1], vocab.encode(text))  # lm-evaluation-harness's prefix
  assert scoring.encode_pair(vocab, "To be", " or not") == (vocab.encode("To be"), vocab.encode(text)[len(vocab.encode("To be")):])
  assert generate._until_eos([5, 6, 2, 7], vocab.eos_id) == [5, 6]  # pylint: disable=protected-access

  with pytest.raises(ValueError, match=r"has no token '\[NLU\]'.*data.objective=causal_lm"):
    objectives.UL2(vocab)


# ----------------------------------------------------------------------------- BERT WordPiece vocab.txt

def test_wordpiece_vocab_txt_is_berts_tokenizer(tmp_path):
  path = write_wordpiece(tmp_path / "bert")
  vocab = load_vocabulary(path)
  assert isinstance(vocab, TokenizerVocabulary) and vocab.model_path == path
  assert (vocab.pad_id, vocab.unk_id, vocab.bos_id, vocab.eos_id, vocab.mask_id) == (0, 1, 2, 3, 4)
  text = "the quick brown foxes jumps over a lazy dog."
  ids = vocab.encode(text)
  assert 2 not in ids and 3 not in ids and 1 not in ids  # no [CLS] / [SEP] added, every word known
  assert vocab.decode(ids) == text
  assert vocab.encode("The Quick") == vocab.encode("the quick")  # lower-cased, as BertTokenizer
  transformers = pytest.importorskip("transformers")
  hf = transformers.BertTokenizerFast(path)
  for t in (text, "The cats sat, on the mat!", "a dog runs and sees cats ."):
    assert vocab.encode(t) == hf(t, add_special_tokens=False)["input_ids"], t


def test_wordpiece_case_comes_from_tokenizer_config(tmp_path):
  lower = load_vocabulary(write_wordpiece(tmp_path / "lower"))
  cased = load_vocabulary(write_wordpiece(tmp_path / "cased", lowercase=False))
  assert cased.encode("The dog") == [1, cased.piece_id("dog")] and lower.encode("The dog")[0] != 1
  assert cased.files[1].endswith("tokenizer_config.json")
  assert token_cache._key([], {}, cased) != token_cache._key([], {}, lower)  # pylint: disable=protected-access


def test_mlm_on_bert_vocabulary_frames_with_cls_sep_and_masks_no_special(tmp_path):
  vocab = load_vocabulary(write_wordpiece(tmp_path / "bert"))
  mlm = corruption.MaskedLM(vocab, 0.3)
  assert mlm.mask_id == 4
  ordinary = set(vocab.random_token_ids().tolist())
  assert not ordinary & {0, 1, 2, 3, 4}
  tokens = np.asarray(vocab.encode(" ".join(WORDS * 3)), np.int32)
  replaced = 0
  for i in range(100):
    ex = mlm(tokens, 32, objectives.example_rng(0, i))
    assert len(ex["targets"]) == 32 and ex["targets"][0] == 2 and ex["targets"][-1] == 3
    np.testing.assert_array_equal(ex["targets"][1:-1], tokens[:30])
    assert ex["weights"][0] == 0 and ex["weights"][-1] == 0 and ex["weights"].sum() == round(0.3 * 30)
    assert ex["inputs"][0] == 2 and ex["inputs"][-1] == 3
    changed = ex["inputs"] != ex["targets"]
    assert np.all(ex["weights"][changed] == 1)
    other = changed & (ex["inputs"] != 4)
    assert set(ex["inputs"][other].tolist()) <= ordinary
    replaced += int(other.sum())
  assert replaced > 0
  short = mlm(np.zeros(0, np.int32), 32, objectives.example_rng(0, 0))
  assert short["targets"].tolist() == [2, 3] and not short["weights"].any()


# ----------------------------------------------------------------------------- tokenizer.json

def test_tokenizer_json_reads_special_tokens_from_the_config_files(tmp_path):
  tok = bpe_tokenizer(["<pad>", "</s>", "<s>", "<unk>"], post_bos=True)
  folder = tmp_path / "hf"
  folder.mkdir()
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": {"content": "<s>", "lstrip": False}, "pad_token": "<pad>", "eos_token": None}))
  (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "unk_token": "<unk>"}))
  vocab = load_vocabulary(str(folder))
  assert vocab.model_path == str(folder / "tokenizer.json") and len(vocab.files) == 3
  assert (vocab.pad_id, vocab.eos_id, vocab.bos_id, vocab.unk_id, vocab.mask_id) == (0, 1, 2, 3, None)
  ids = vocab.encode(TEXT)
  assert ids == tok.encode(TEXT, add_special_tokens=False).ids and 2 not in ids  # no <s> added
  assert vocab.encode_batch([TEXT, "be"]) == [ids, vocab.encode("be")]
  assert vocab.decode(ids) == TEXT
  assert vocab.base_vocab_size == tok.get_vocab_size() and vocab.vocab_size == vocab.base_vocab_size + 100
  assert vocab.sentinel(0) == vocab.vocab_size - 1
  assert vocab.decode(ids[:3] + [vocab.sentinel(1)]) == tok.decode(ids[:3]) + "<extra_id_1>"
  assert {0, 1, 2, 3} <= vocab.special_ids and not {0, 1, 2, 3} & set(vocab.random_token_ids().tolist())
  ex = objectives.causal_lm(np.asarray(ids), 8, vocab)
  assert ex["inputs"][0] == 2 and ex["targets"][-1] == 1 and len(ex["inputs"]) == 8
  assert len(token_cache._key([], {}, vocab)) == 20  # pylint: disable=protected-access


def test_t5_style_tokenizer_json_carries_its_sentinels(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  words = ["<pad>", "</s>", "<unk>"] + [f"\u2581{w}" for w in WORDS] + list("abcdefghijklmnopqrstuvwxyz")
  tok = Tokenizer(models.Unigram([(w, -float(i)) for i, w in enumerate(words)], unk_id=2, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(10))])  # T5's: <extra_id_0> is the last id
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>",
                                                                 "unk_token": "<unk>"}))
  vocab = load_vocabulary(str(tmp_path / "tokenizer.json"), 100)
  n = len(words)
  assert vocab.extra_ids == 10 and vocab.vocab_size == vocab.base_vocab_size == n + 10
  assert [vocab.sentinel(i) for i in range(10)] == [tok.token_to_id(f"<extra_id_{i}>") for i in range(10)]
  assert vocab.sentinel(0) == n + 9 and vocab.sentinel(9) == n
  with pytest.raises(ValueError, match="sentinel"):
    vocab.sentinel(10)
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id, vocab.bos_id) == (0, 1, 2, None)
  assert vocab.decode(vocab.encode("the dog") + [vocab.sentinel(3), 0]) == "the dog<extra_id_3>"
  cfg = data_config(objective="span_corruption", seq_len=16, extra_ids=10)
  obj = build.build_objective("span_corruption", vocab, cfg)
  ex = obj(np.arange(3, 3 + obj.chunk_length) % (n - 3) + 3, 16, objectives.example_rng(0, 0))
  assert ex["encoder_inputs"][-1] == 1 and ex["targets"][-1] == 1 and ex["decoder_inputs"][0] == 0
  assert ex["targets"][0] == vocab.sentinel(0)


# ----------------------------------------------------------------------------- token cache, seqio

def test_token_dtype_fits_the_vocabulary():
  assert token_cache.token_dtype(load_vocabulary("").vocab_size) == np.uint16
  assert token_cache.token_dtype(65536) == np.uint16 and token_cache.token_dtype(128256) == np.int32


def test_seqio_sources_need_a_sentencepiece_vocabulary(tmp_path, llama_dir):
  from raptr_jax.data import tfds_source
  assert tfds_source.sentencepiece_model("", 100) == BUILTIN_MODEL
  assert tfds_source.sentencepiece_model(llama_dir, 100).endswith("tokenizer.model")
  with pytest.raises(ValueError, match=r"not a SentencePiece model.*data.source=files"):
    tfds_source.sentencepiece_model(write_wordpiece(tmp_path / "bert"), 100)


# ----------------------------------------------------------------------------- bad inputs

def test_bad_vocabularies_fail_naming_the_file(tmp_path):
  missing = str(tmp_path / "nowhere" / "spm.model")
  with pytest.raises(FileNotFoundError, match=f"data.vocab_path='{missing}' does not exist"):
    load_vocabulary(missing)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty'.* folder without a tokenizer file \(looked for spiece.model"):
    load_vocabulary(str(tmp_path / "empty"))
  (tmp_path / "spm.vocab.model").write_text("<pad>\t0\n</s>\t0\n")
  with pytest.raises(ValueError, match=r"spm.vocab.model' is not a SentencePiece model file.*not the .vocab"):
    load_vocabulary(str(tmp_path / "spm.vocab.model"))
  (tmp_path / "broken.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"broken.json' is not a Hugging Face tokenizer.json"):
    load_vocabulary(str(tmp_path / "broken.json"))
  (tmp_path / "vocab.txt").write_bytes(b"\xff\xfe\x00binary")
  with pytest.raises(ValueError, match=r"vocab.txt' is not a WordPiece vocab.txt"):
    load_vocabulary(str(tmp_path / "vocab.txt"))


def test_a_tokenizer_without_eos_is_refused(tmp_path):
  tok = bpe_tokenizer(["<pad>", "<unk>"])
  (tmp_path / "a").mkdir()
  tok.save(str(tmp_path / "a" / "tokenizer.json"))
  (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
  with pytest.raises(ValueError, match=r"a/tokenizer.json: no eos token.*eos_token"):
    load_vocabulary(str(tmp_path / "a"))
  (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  with pytest.raises(ValueError, match=r"a/tokenizer.json: the eos_token '</s>' named in .* is not a token"):
    load_vocabulary(str(tmp_path / "a" / "tokenizer.json"))
  no_eos = train_spm(tmp_path / "b" / "noeos.model", unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1)
  with pytest.raises(ValueError, match=r"noeos.model: the SentencePiece model has no eos"):
    load_vocabulary(no_eos)


def test_mlm_without_mask_token_or_sentinels_is_refused():
  with pytest.raises(ValueError, match="no extra ids"):
    corruption.MaskedLM(load_vocabulary("", 0))
