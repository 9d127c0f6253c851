"""TFDS builders for the corpora the TFDS catalog lacks: MiniPile and BookCorpus.

Both are prepared once, offline, from files you download yourself (nothing is downloaded here),
into a tfds ``data_dir`` that runs then read with ``data.tfds_data_dir``:

    # MiniPile (Kaddour 2023): the parquet files of the Hugging Face dataset JeanKaddour/minipile
    huggingface-cli download JeanKaddour/minipile --repo-type=dataset --local-dir=~/hf/minipile
    python -m raptr_jax.data.tfds_builders minipile --manual_dir=~/hf/minipile --data_dir=~/tensorflow_datasets

    # BookCorpus: the parquet files of bookcorpus/bookcorpus (revision refs/convert/parquet)
    python -m raptr_jax.data.tfds_builders bookcorpus --manual_dir=~/hf/bookcorpus --data_dir=~/tensorflow_datasets

``manual_dir`` is searched recursively for ``*.parquet``, ``*.jsonl`` and ``*.jsonl.gz`` files
with a ``text`` column / field; a file belongs to the split its name starts with (``train``,
``validation``, ``test``; Hugging Face's ``data/train-00000-of-00012-....parquet`` layout).
BookCorpus has only a train split (``data.source=wikipedia_books`` holds out its last 0.5%).
Examples are ``{"text": ...}`` in file order (the run shuffles; ids hash the text), keyed by
file and row, so a re-build is identical.

Importing this module registers the builders with tfds (``tfds_source`` does before it reads).
"""
import glob
import gzip
import json
import os
import sys

from raptr_jax.data import tf_env

tfds = tf_env.data_stack()[2]  # tensorflow_datasets, imported without TensorFlow's C++ log lines

SPLITS = ("train", "validation", "test")


def split_files(manual_dir: str) -> dict[str, list[str]]:
  """{split: sorted files} of the parquet / jsonl files under ``manual_dir``."""
  found = {}
  for pattern in ("*.parquet", "*.jsonl", "*.jsonl.gz"):
    for path in glob.glob(os.path.join(manual_dir, "**", pattern), recursive=True):
      name = os.path.basename(path)
      split = next((s for s in SPLITS if name.startswith(s)), None)
      if split is None and os.path.basename(os.path.dirname(path)) in SPLITS:  # plain_text/train/0000.parquet
        split = os.path.basename(os.path.dirname(path))
      if split is not None:
        found.setdefault(split, []).append(path)
  return {split: sorted(files) for split, files in found.items()}


def read_texts(path: str, field: str = "text"):
  """(row index, text) of one parquet or jsonl(.gz) file."""
  if path.endswith(".parquet"):
    try:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=[field], batch_size=1024):
      for text in batch.column(0).to_pylist():
        yield row, text or ""
        row += 1
    return
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    for row, line in enumerate(f):
      if line.strip():
        record = json.loads(line)
        if field not in record:
          raise ValueError(f"{path}:{row + 1}: no {field!r} field (fields: {sorted(record)})")
        yield row, record[field]


class _TextFiles(tfds.core.GeneratorBasedBuilder):
  """A text corpus from downloaded parquet / jsonl files (see the module docstring)."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Text from the downloaded parquet / jsonl files, in file order."}
  SOURCE = ""

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        supervised_keys=None, homepage=self.SOURCE)

  def _split_generators(self, dl_manager):
    files = split_files(str(dl_manager.manual_dir))
    if "train" not in files:
      raise FileNotFoundError(f"no train*.parquet / train*.jsonl(.gz) files under {dl_manager.manual_dir}; "
                              + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    return {split: self._generate_examples(paths) for split, paths in files.items()}

  def _generate_examples(self, paths):
    for path in paths:
      for row, text in read_texts(path):
        yield f"{os.path.basename(path)}:{row}", {"text": text}


class Minipile(_TextFiles):
  """MiniPile (Kaddour 2023): 1M documents of the Pile, train / validation / test."""
  SOURCE = "https://huggingface.co/datasets/JeanKaddour/minipile"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("download the parquet files: huggingface-cli download JeanKaddour/minipile "
                                  "--repo-type=dataset --local-dir=DIR, then pass --manual_dir=DIR")


class Bookcorpus(_TextFiles):
  """BookCorpus (Zhu et al. 2015) as Hugging Face's bookcorpus/bookcorpus has it: a train split."""
  SOURCE = "https://huggingface.co/datasets/bookcorpus/bookcorpus"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("download the parquet files: huggingface-cli download bookcorpus/bookcorpus "
                                  "--repo-type=dataset --revision=refs/convert/parquet --local-dir=DIR, then pass "
                                  "--manual_dir=DIR")


BUILDERS = {"minipile": Minipile, "bookcorpus": Bookcorpus}


def prepare(name: str, manual_dir: str, data_dir: str) -> str:
  """Builds dataset ``name`` from the files under ``manual_dir`` into ``data_dir``; returns the
  prepared dataset's folder."""
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; this module builds {sorted(BUILDERS)}")
  manual_dir, data_dir = os.path.expanduser(manual_dir), os.path.expanduser(data_dir)
  if "train" not in split_files(manual_dir):
    raise FileNotFoundError(f"no train*.parquet / train*.jsonl(.gz) files under {manual_dir!r} for {name}; "
                            + BUILDERS[name].MANUAL_DOWNLOAD_INSTRUCTIONS)
  builder = BUILDERS[name](data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder.data_dir


def main(argv=None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m raptr_jax.data.tfds_builders",
                                   description="Prepare MiniPile or BookCorpus for tfds from downloaded files.")
  parser.add_argument("dataset", choices=sorted(BUILDERS))
  parser.add_argument("--manual_dir", required=True, help="folder with the downloaded parquet / jsonl files")
  parser.add_argument("--data_dir", default="~/tensorflow_datasets", help="tfds data_dir to write (data.tfds_data_dir)")
  args = parser.parse_args(argv)
  try:
    where = prepare(args.dataset, args.manual_dir, args.data_dir)
  except (OSError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(f"prepared {args.dataset} in {where}; train with --config.data.tfds_data_dir={os.path.expanduser(args.data_dir)}")


if __name__ == "__main__":
  main()
