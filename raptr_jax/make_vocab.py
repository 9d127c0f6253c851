"""Trains a SentencePiece vocabulary on a config's training data (your own corpus).

    python -m raptr_jax.make_vocab --config=configs/ul2.py --output=vocab/mine.model \\
        data.source=files "data.files.train=corpus/*.jsonl.gz" [--size=32000] [--model_type=bpe]

The model is what the runs need, as the shipped vocabulary is made (``data/builtin/prepare.py``):
T5's special ids (pad 0, eos 1, unk 2, no bos), byte fallback (no unknown characters), and the
UL2 paradigm tokens ``[NLU] [NLG] [S2S]`` as user-defined pieces; the sentinels
``<extra_id_0..>`` are appended when it is loaded (``data.extra_ids``), as seqio does. It is
trained on the documents of the config's train split (``data.source`` and its fields, e.g. the
validation hold-out of a files source is left out), at most ``--max_documents`` of them, with a
progress bar; SentencePiece then samples ``--input_sentence_size`` sentences. A document is fed
line by line, and a line longer than SentencePiece's sentence limit (``--max_sentence_length``
bytes) is cut at spaces into pieces under it, so nothing is skipped. At the end it prints the
bytes per token the new vocabulary gets on the validation split (and the configured one, to
compare) and the override that uses it: ``--config.data.vocab_path=<output>``.
"""
import argparse
import io
import itertools
import os
import sys

import tqdm

PARADIGM_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
MODEL_TYPES = ("unigram", "bpe")


def sentence_pieces(text: str, limit: int):
  """The lines of ``text``, each cut at spaces (or anywhere, for a run without one) into pieces
  of at most ``limit`` UTF-8 bytes."""
  for line in text.splitlines():
    line = line.strip()
    while line:
      if len(line.encode("utf-8")) <= limit:
        yield line
        break
      cut = limit
      while len(line[:cut].encode("utf-8")) > limit:  # characters of several bytes
        cut -= 1
      space = line.rfind(" ", 0, cut + 1)
      cut = space if space > 0 else cut
      yield line[:cut].strip()
      line = line[cut:].strip()


def bytes_per_token(vocab, documents, max_documents: int) -> tuple[float, int]:
  """(UTF-8 bytes per token, documents read) of ``vocab`` on ``documents``."""
  n_bytes = n_tokens = n = 0
  for text in itertools.islice(documents, max_documents):
    n_bytes += len(text.encode("utf-8"))
    n_tokens += len(vocab.encode(text))
    n += 1
  return n_bytes / max(n_tokens, 1), n


def train(cfg, output: str, size: int = 32000, model_type: str = "unigram", max_documents: int = 1_000_000,
          input_sentence_size: int = 10_000_000, max_sentence_length: int = 4192,
          character_coverage: float = 0.9995, progress: bool = True) -> str:
  """Trains the vocabulary on ``cfg``'s train split and writes it to ``output``; returns it."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from raptr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from raptr_jax.data.vocab import Vocabulary, load_vocabulary  # pylint: disable=g-import-not-at-top
  if model_type not in MODEL_TYPES:
    raise ValueError(f"--model_type must be one of {MODEL_TYPES}, got {model_type!r}")
  if size < 300:
    raise ValueError(f"--size {size} is too small: byte fallback alone takes 256 pieces; use 300 or more")
  docs = tqdm.tqdm(itertools.islice(pipeline.documents(cfg.data, "train"), max_documents), unit=" docs",
                   desc="reading the train split", disable=not progress, total=None)
  sentences = (piece for text in docs for piece in sentence_pieces(text, max_sentence_length))
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_writer=model, vocab_size=size, model_type=model_type,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True, user_defined_symbols=list(PARADIGM_TOKENS),
        character_coverage=character_coverage, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True, max_sentence_length=max_sentence_length,
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f"SentencePiece could not train a {size}-piece vocabulary on this data: "
                     f"{str(e).splitlines()[0]} (a smaller --size, or more text)") from None
  finally:
    docs.close()
  output = os.path.expanduser(output)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  tmp = f"{output}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, output)
  vocab = Vocabulary(output, cfg.data.extra_ids)  # checks it has T5's special ids (pad 0, eos 1, unk 2)
  n_bytes, n = bytes_per_token(vocab, pipeline.documents(cfg.data, "validation"), 2000)
  old, _ = bytes_per_token(load_vocabulary(cfg.data.vocab_path, cfg.data.extra_ids),
                           pipeline.documents(cfg.data, "validation"), 2000)
  print(f"wrote {output}: {vocab.base_vocab_size} pieces + {cfg.data.extra_ids} sentinels ({model_type}); "
        f"{n_bytes:.2f} bytes per token on {n} validation documents (the configured "
        f"{cfg.data.vocab_path or 'built-in'} vocabulary: {old:.2f})\n"
        f"use it with --config.data.vocab_path={output}")
  return output


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m raptr_jax.make_vocab", description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="config file[:preset] whose data to train on")
  parser.add_argument("--output", required=True, help="the .model file to write")
  parser.add_argument("--size", type=int, default=32000, help="SentencePiece pieces (T5: 32000)")
  parser.add_argument("--model_type", default="unigram", choices=MODEL_TYPES)
  parser.add_argument("--max_documents", type=int, default=1_000_000, help="documents read at most")
  parser.add_argument("--input_sentence_size", type=int, default=10_000_000, help="sentences SentencePiece samples")
  parser.add_argument("--max_sentence_length", type=int, default=4192, help="bytes; longer lines are cut")
  parser.add_argument("--character_coverage", type=float, default=0.9995)
  parser.add_argument("overrides", nargs="*", help="config overrides as section.field=value")
  args = parser.parse_args(argv)
  from raptr_jax.config import load_config  # pylint: disable=g-import-not-at-top
  try:
    cfg = load_config(args.config, args.overrides)
    train(cfg, args.output, args.size, args.model_type, args.max_documents, args.input_sentence_size,
          args.max_sentence_length, args.character_coverage)
  except (ValueError, OSError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
