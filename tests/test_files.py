"""Your own corpus: text / JSONL / Parquet / Arrow files and any tfds dataset as sources, the
validation hold-out, several named validation sets, and the vocabulary command."""
import gzip
import json
import os

import numpy as np
import pytest

from raptr_jax import compare
from raptr_jax import config as config_lib
from raptr_jax import train as train_lib
from raptr_jax.data import corpus, file_source, files as files_lib, pipeline
from raptr_jax.metrics import read_metrics
from conftest import assert_resumes_exactly, load_config, quiet

DOCS = [d["text"] for d in corpus.read_documents("validation")][:24]  # real text: Shakespeare scenes


def write_corpus(folder, fmt: str, docs=DOCS, parts: int = 2) -> str:
  """``docs`` in ``parts`` files of format ``fmt``; returns the glob that matches them."""
  os.makedirs(folder, exist_ok=True)
  for part in range(parts):
    chunk = docs[part::parts]
    base = os.path.join(folder, f"part{part}")
    if fmt in ("text", "text.gz"):  # one document per paragraph (scenes have no blank lines)
      body = "\n\n".join(chunk) + "\n"
      opener = gzip.open if fmt.endswith(".gz") else open
      with opener(base + (".txt.gz" if fmt.endswith(".gz") else ".txt"), "wt", encoding="utf-8") as f:
        f.write(body)
    elif fmt in ("jsonl", "jsonl.gz"):
      opener = gzip.open if fmt.endswith(".gz") else open
      with opener(base + "." + fmt, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": i, "body": text}) + "\n" for i, text in enumerate(chunk))
    else:
      import pyarrow as pa
      import pyarrow.parquet as pq
      table = pa.table({"body": chunk, "n": list(range(len(chunk)))})
      if fmt == "parquet":
        pq.write_table(table, base + ".parquet", row_group_size=3)
      else:  # Arrow IPC: part 0 as a file, part 1 as a stream (Hugging Face's .arrow)
        with pa.OSFile(base + ".arrow", "wb") as sink:
          writer = (pa.ipc.new_file if part == 0 else pa.ipc.new_stream)(sink, table.schema)
          writer.write_table(table, max_chunksize=4)
          writer.close()
  return os.path.join(folder, "part*")


def files_config(tmp_path, glob_, **files):
  cfg = quiet(load_config("ul2", "tiny"))
  cfg.data.source = "files"
  cfg.data.files.update(train=glob_, validation_share=0.25, **files)
  cfg.data.token_cache = str(tmp_path / "cache")
  config_lib.validate(cfg)
  return cfg


FORMATS = [("text", dict(documents="paragraph")), ("text.gz", dict(documents="paragraph")),
           ("jsonl", dict(field="body")), ("jsonl.gz", dict(field="body")), ("parquet", dict(field="body")),
           ("arrow", dict(field="body"))]


@pytest.mark.parametrize("fmt,options", FORMATS, ids=[f for f, _ in FORMATS])
def test_each_format_reads_its_documents_and_streams_packed_batches(tmp_path, fmt, options):
  glob_ = write_corpus(tmp_path / "corpus", fmt)
  paths = files_lib.expand(glob_, "data.files.train")
  read = [t for p in paths for t in files_lib.read_documents(p, field=options.get("field", "text"),
                                                           documents=options.get("documents", "line"))]
  assert read == DOCS[0::2] + DOCS[1::2]  # every document, whole, in file order
  cfg = files_config(tmp_path, glob_, **options)
  stream = pipeline.build_stream(cfg.data, "train", 8, 0, True)
  batch = stream.next_batch()
  assert batch["inputs"].shape == (8, 64) and batch["weights"].sum() > 0
  assert (batch["example_ids"] >= 0).sum() >= 8
  assert pipeline.build_stream(cfg.data, "validation", 8, 0, False).next_batch()["weights"].sum() > 0


def test_ids_are_content_hashes_stable_across_files_orders_seeds_and_caches(tmp_path):
  """The same documents cut into other files, in another order, read by another process (a
  fresh cache: another host) have the same example ids."""
  a = files_config(tmp_path / "a", write_corpus(tmp_path / "a", "jsonl", parts=2), field="body")
  b = files_config(tmp_path / "b", write_corpus(tmp_path / "b", "parquet", DOCS[::-1], parts=3), field="body")
  for cfg in (a, b):
    cfg.data.files.validation_share = 0.0
    cfg.data.files.validation = cfg.data.files.train
  sa = file_source.FileSource(a.data, "train", 64, seed=0, shuffle=True, progress=False)
  sb = file_source.FileSource(b.data, "train", 64, seed=1, shuffle=True, progress=False)
  assert sa.cache.path != sb.cache.path
  ids_a = [i for i, _ in sa.iterate(0, 0)]
  ids_b = [i for i, _ in sb.iterate(0, 0)]
  assert ids_a != ids_b and sorted(ids_a) == sorted(ids_b)
  tokens_a = dict(sa.iterate(0, 0))
  for i, tokens in sb.iterate(0, 0):
    np.testing.assert_array_equal(tokens, tokens_a[i])


def test_validation_is_held_out_by_document_and_never_overlaps_training(tmp_path):
  cfg = files_config(tmp_path, write_corpus(tmp_path / "c", "jsonl"), field="body")
  train = file_source.FileSource(cfg.data, "train", 64, 0, True, progress=False)
  val = file_source.FileSource(cfg.data, "validation", 64, 0, False, progress=False)
  docs = lambda s: {i // corpus.MAX_CHUNKS_PER_DOC for i in s.ids}
  assert not docs(train) & docs(val)
  assert len(docs(train) | docs(val)) == len(DOCS)
  assert 0 < len(docs(val)) < len(DOCS) / 2
  # the raw documents the vocabulary command reads take the same sides
  raw = {s: set(file_source.texts(cfg.data, s)) for s in ("train", "validation")}
  assert not raw["train"] & raw["validation"] and len(raw["validation"]) == len(docs(val))


def test_a_stream_resumed_mid_file_continues_exactly(tmp_path):
  cfg = files_config(tmp_path, write_corpus(tmp_path / "c", "text", DOCS[:8], parts=3), documents="paragraph")
  assert_resumes_exactly(lambda: pipeline.build_stream(cfg.data, "train", 4, 7, True), 5,
                         lambda stream, n: stream.get_state()["epoch"] == 0 or n < 5)  # into the next epoch


def test_bad_inputs_name_the_file_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"data.files.train: '.*nothing\*.jsonl' matches no file"):
    files_lib.expand(str(tmp_path / "nothing*.jsonl"), "data.files.train")
  (tmp_path / "empty.jsonl").write_text("\n\n")
  (tmp_path / "ok.jsonl").write_text(json.dumps({"text": DOCS[0]}) + "\n")
  cfg = files_config(tmp_path, f"{tmp_path}/ok.jsonl,{tmp_path}/empty.jsonl")
  with pytest.raises(ValueError, match=r"empty.jsonl holds no documents"):
    pipeline.build_stream(cfg.data, "train", 4, 0, True)
  (tmp_path / "nofield.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"nofield.jsonl:1: no field 'text' \(it has \['body'\]\); set data.files.field"):
    list(files_lib.read_documents(str(tmp_path / "nofield.jsonl")))
  write_corpus(tmp_path / "pq", "parquet", parts=1)
  with pytest.raises(ValueError, match=r"part0.parquet: no column 'text' \(columns: \['body', 'n'\]\)"):
    list(files_lib.read_documents(str(tmp_path / "pq" / "part0.parquet")))
  (tmp_path / "latin1.txt").write_bytes("first line\nna\xefve caf\xe9\n".encode("latin-1"))
  with pytest.raises(ValueError, match=r"latin1.txt: bytes at offset 13 are not UTF-8.*encoding_errors='replace'"):
    list(files_lib.read_documents(str(tmp_path / "latin1.txt")))
  assert list(files_lib.read_documents(str(tmp_path / "latin1.txt"), errors="replace")) == ["first line", "na\ufffdve caf\ufffd"]
  with pytest.raises(ValueError, match="cannot tell the format"):
    list(files_lib.read_documents(str(tmp_path / "latin1.csv")))
  bad = config_lib.base_config()
  bad.data.source = "files"
  with pytest.raises(ValueError, match="data.files.train, which is empty"):
    config_lib.validate(bad)
  bad.data.files.update(train="x.jsonl", documents="sentence")
  with pytest.raises(ValueError, match=r"data.files.documents must be one of \('line', 'paragraph', 'file'\)"):
    config_lib.validate(bad)


def test_a_run_logs_several_named_validation_sets_and_the_comparison_tables_them(tmp_path):
  glob_ = write_corpus(tmp_path / "c", "jsonl")
  other = write_corpus(tmp_path / "other", "text", DOCS[:6], parts=1)
  cfg = files_config(tmp_path, glob_, field="body")
  cfg.eval.sets = ("shakespeare:source=builtin", f"plain:files.validation={other};files.format=text;files.documents=paragraph")
  cfg.budget.value = 6
  out = train_lib.train(cfg, str(tmp_path / "run"))
  rows = read_metrics(tmp_path / "run")
  evals = [r for r in rows if "eval/loss" in r]
  assert len(evals) == 3 and all("eval/shakespeare/loss" in r and "eval/plain/loss" in r for r in evals)
  assert out["eval/shakespeare/loss"] != out["eval/loss"]
  results = {(1.0, "a"): [(5.0, 6.0, {"shakespeare loss": 7.0, "plain loss": 8.0}),
                          (5.5, 6.5, {"shakespeare loss": 7.5, "plain loss": 9.0})]}
  text = compare.write_tables(results, str(tmp_path), "steps")
  assert ("| final train loss | final validation loss | validation loss vs a (paired) | final plain loss | "
          "plain loss vs a (paired) | final shakespeare loss | shakespeare loss vs a (paired) |") in text
  # mean [mean +- t(0.975, 1) s / sqrt(2)]: t = 12.706, s / sqrt(2) = half the spread of two seeds
  assert ("| 1 | a | 2 | 5.2500 [2.0734, 8.4266] | 6.2500 [3.0734, 9.4266] | (baseline) | 8.5000 [2.1469, 14.8531] | "
          "(baseline) | 7.2500 [4.0734, 10.4266] | (baseline) |") in text
  assert compare.final_set_losses(rows) == {"shakespeare loss": out["eval/shakespeare/loss"],
                                            "plain loss": out["eval/plain/loss"]}
  for spec, match in [("shakespeare", "not 'name:field=value"), ("x:seq_len=32", "cannot differ from the training"),
                      ("x:files.nope=1", "unknown config field"), ("loss:source=builtin", "used twice")]:
    cfg.eval.sets = (spec,)
    with pytest.raises(ValueError, match=match):
      config_lib.validate(cfg)


def test_any_tfds_dataset_by_name_version_text_feature_and_splits(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = quiet(load_config("ul2", "tiny")).data
  cfg.update(source="tfds", tfds_names=("cnn_dailymail:3.4.0",), tfds_text_key="article",
             tfds_splits=("train", "test"), tfds_data_dir=str(tmp_path), seq_len=64)
  with tfds.testing.mock_data(num_examples=20):
    train = pipeline.build_stream(cfg, "train", 4, 0, True)
    assert train.source.parts[0].text_key == "article" and train.next_batch()["weights"].sum() > 0
    assert pipeline.build_stream(cfg, "validation", 4, 0, False).next_batch() is not None
  with pytest.raises(FileNotFoundError, match=r"'cnn_dailymail:3.4.0' \(split 'train'\) is not prepared.*tfds build cnn_dailymail"):
    pipeline.build_stream(cfg, "train", 4, 0, True)


def test_the_vocabulary_command_trains_a_model_runs_can_use(tmp_path, capsys):
  from raptr_jax import make_vocab
  from raptr_jax.data.vocab import Vocabulary
  docs = [d["text"] for d in corpus.read_documents("train")][:120]
  long_line = " ".join(["Now is the winter of our discontent"] * 400)  # > SentencePiece's sentence limit
  glob_ = write_corpus(tmp_path / "c", "jsonl", docs + [long_line])
  cfg = files_config(tmp_path, glob_, field="body")
  output = make_vocab.train(cfg, str(tmp_path / "vocab" / "mine.model"), size=600, max_documents=200,
                            max_sentence_length=512, progress=False)
  out = capsys.readouterr().out
  assert "bytes per token on" in out and f"--config.data.vocab_path={output}" in out
  vocab = Vocabulary(output, 100)
  assert vocab.base_vocab_size == 600 and vocab.vocab_size == 700
  for text in ("To be, or not to be: that is the question.", "naïve café ☃ 1234"):
    assert vocab.decode(vocab.encode(text)) == text  # byte fallback: nothing is unknown
  assert vocab.piece_id("[NLU]") > 2 and vocab.sentinel(0) == 699
  assert list(make_vocab.sentence_pieces(long_line, 512)) and all(
      len(p.encode()) <= 512 for p in make_vocab.sentence_pieces(long_line, 512))
  cfg.data.vocab_path = output  # a run with it: UL2 finds its paradigm tokens, the model its size
  cfg.budget.value = 2
  assert train_lib.train(cfg, str(tmp_path / "run"))["step"] == 2


def test_a_vocabulary_with_other_special_ids_is_refused_with_the_command(tmp_path):
  import io
  import sentencepiece as spm
  from raptr_jax.data.vocab import Vocabulary
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS * 4), model_writer=model, vocab_size=400,
                                 byte_fallback=True, minloglevel=2)  # SentencePiece's own ids: unk 0, bos 1, eos 2
  (tmp_path / "other.model").write_bytes(model.getvalue())
  with pytest.raises(ValueError, match=r"special ids \(pad, eos, unk\) are \(-1, 2, 0\).*raptr_jax.make_vocab"):
    Vocabulary(str(tmp_path / "other.model"))
