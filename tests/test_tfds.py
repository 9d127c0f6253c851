"""The real-corpus loaders (seqio Tasks over tfds), run offline with tfds.testing.mock_data."""
import time

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from raptr_jax.config import base_config  # noqa: E402
from raptr_jax.data import pipeline  # noqa: E402
from conftest import assert_resumes_exactly  # noqa: E402


def data_config(tmp_path, **fields):
  cfg = base_config().data
  cfg.update(source="c4", tfds_data_dir=str(tmp_path), seq_len=64, objective="causal_lm")
  cfg.update(**fields)
  return cfg


def first_epoch_ids(cfg, seed):
  """The example ids of the first epoch of the train stream, in stream order."""
  stream = pipeline.build_stream(cfg, "train", 4, seed, True)
  ids = []
  while stream.get_state()["epoch"] == 0:
    b = stream.next_batch()
    ids += b["example_ids"][b["example_ids"] >= 0].tolist()
  return ids


def test_unprepared_dataset_fails_fast_naming_dataset_dir_and_fix(tmp_path):
  cfg = data_config(tmp_path)
  pipeline.build_stream(data_config(tmp_path, source="builtin"), "train", 2, 0, True)  # warm imports
  t = time.perf_counter()
  with pytest.raises(FileNotFoundError) as err:
    pipeline.build_stream(cfg, "train", 4, 0, True)
  assert time.perf_counter() - t < 30
  msg = str(err.value)
  assert "'c4/en:3.1.0'" in msg and str(tmp_path) in msg and "tfds build c4/en:3.1.0" in msg
  assert "data.tfds_data_dir" in msg


@pytest.mark.parametrize("objective", ["causal_lm", "ul2", "mlm", "span_corruption"])
def test_c4_stream_runs_every_objective_through_seqio(tmp_path, objective):
  cfg = data_config(tmp_path, objective=objective)
  with tfds.testing.mock_data(num_examples=30):
    batch = pipeline.build_stream(cfg, "train", 4, 0, True).next_batch()
  lead = "encoder_inputs" if objective == "span_corruption" else "inputs"
  assert batch[lead].shape == (4, 64) and batch["weights"].sum() > 0
  assert (batch["example_ids"] >= 0).sum() >= 4


def test_ids_are_stable_under_shuffling_and_the_stream_resumes_exactly(tmp_path):
  cfg = data_config(tmp_path)
  with tfds.testing.mock_data(num_examples=40):
    ids = {seed: first_epoch_ids(cfg, seed) for seed in (0, 1)}
    assert ids[0] != ids[1] and set(ids[0]) == set(ids[1])  # other order, same stable ids
    assert_resumes_exactly(lambda: pipeline.build_stream(cfg, "train", 4, 3, True), 5, 4)


def test_two_part_corpus_interleaves_both_tasks(tmp_path):
  cfg = data_config(tmp_path, source="wikipedia_books",
                    tfds_names=("wikipedia/20230601.en:1.0.0", "c4/en:3.1.0"))
  with tfds.testing.mock_data(num_examples=30):
    stream = pipeline.build_stream(cfg, "train", 4, 0, True)
    assert len(stream.source.tasks) == 2
    batches = [stream.next_batch() for _ in range(3)]
    validation = pipeline.build_stream(cfg, "validation", 4, 0, False).next_batch()
  assert all(b["inputs"].shape == (4, 64) for b in batches) and validation is not None
  with pytest.raises(ValueError, match="data.tfds_names gives 1 names"):
    pipeline.build_stream(data_config(tmp_path, source="wikipedia_books", tfds_names=("c4",)), "train", 4, 0, True)


@pytest.mark.parametrize("source,parts", [("wikipedia_books", 2), ("minipile", 1)])
def test_each_named_corpus_loads_under_its_default_versioned_names(tmp_path, source, parts):
  cfg = data_config(tmp_path, source=source)
  with tfds.testing.mock_data(num_examples=30):
    train = pipeline.build_stream(cfg, "train", 4, 0, True)
    batches = [train.next_batch() for _ in range(3)]
    validation = pipeline.build_stream(cfg, "validation", 4, 0, False).next_batch()
  assert len(train.source.tasks) == parts
  assert all(":" in p.tfds_name for p in train.source.parts)
  assert all(b["inputs"].shape == (4, 64) and b["weights"].sum() > 0 for b in batches)
  assert validation is not None


def test_names_without_a_version_are_refused(tmp_path):
  with pytest.raises(ValueError, match=r"'minipile' has no version.*'minipile:1.0.0'"):
    pipeline.build_stream(data_config(tmp_path, source="minipile", tfds_names=("minipile",)), "train", 4, 0, True)


def test_minipile_and_bookcorpus_prepare_from_downloaded_parquet_and_jsonl_files(tmp_path):
  """The builders of data/tfds_builders.py, for real (no mocks): Hugging Face's parquet layout
  and jsonl.gz files in, a prepared tfds dataset out, which a run then streams."""
  import gzip
  import json
  import pyarrow as pa
  import pyarrow.parquet as pq
  from raptr_jax.data import tfds_builders
  docs = [f"document {i}: " + " ".join(["All the world's a stage, and all the men and women merely players."] * (1 + i % 4))
          for i in range(40)]
  files = tmp_path / "hf" / "data"
  files.mkdir(parents=True)
  pq.write_table(pa.table({"text": docs[:30]}), files / "train-00000-of-00001-abc.parquet")
  with gzip.open(files / "validation-00000.jsonl.gz", "wt") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs[30:])
  data_dir = tmp_path / "tfds"
  tfds_builders.prepare("minipile", str(tmp_path / "hf"), str(data_dir))
  cfg = data_config(data_dir, source="minipile")
  ids = [first_epoch_ids(cfg, seed) for seed in (0, 1)]
  assert set(ids[0]) == set(ids[1]) and ids[0] != ids[1]  # one corpus, two orders, stable ids
  assert len({i // 4096 for i in ids[0]}) == 30             # every training document, once per epoch
  assert pipeline.build_stream(cfg, "validation", 4, 0, False).next_batch()["weights"].sum() > 0
  books = tmp_path / "books" / "plain_text" / "train"
  books.mkdir(parents=True)
  pq.write_table(pa.table({"text": docs}), books / "0000.parquet")
  tfds_builders.prepare("bookcorpus", str(tmp_path / "books"), str(data_dir))
  assert tfds.builder("bookcorpus:1.0.0", data_dir=str(data_dir)).info.splits["train"].num_examples == 40
  with pytest.raises(FileNotFoundError, match="no train.*huggingface-cli download JeanKaddour/minipile"):
    tfds_builders.prepare("minipile", str(tmp_path / "empty"), str(tmp_path / "tfds2"))


def test_the_cli_reports_an_unprepared_dataset_without_tensorflow_log_noise(tmp_path):
  import os
  import subprocess
  import sys
  from conftest import ROOT
  out = subprocess.run([sys.executable, "-m", "raptr_jax.main", "--config=configs/ul2.py:tiny",
                        f"--workdir={tmp_path / 'run'}", "--config.data.source=minipile",
                        f"--config.data.tfds_data_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "'minipile:1.0.0' (split 'train') is not prepared" in out.stderr
  assert "raptr_jax.data.tfds_builders minipile" in out.stderr
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: data.source='minipile'"), out.stderr


def test_sharded_tfds_stream_reads_disjoint_examples_per_host(tmp_path, monkeypatch):
  """data.shards=2 over seqio: each host's stream reads its shard (seqio shard_info), the two
  together read each example of the epoch once. Mock data has no files to list: it stands for
  a dataset of one file, which seqio shards by example (with a warning from us: every host
  reads the file); with as many files as shards seqio gives each host its own files."""
  import seqio
  monkeypatch.setattr(seqio.TfdsDataSource, "list_shards", lambda self, split: ["one-file"])
  cfg = data_config(tmp_path)
  with tfds.testing.mock_data(num_examples=40), pytest.warns(UserWarning, match="every shard reads every file"):
    whole = set(first_epoch_ids(cfg, 0))
    per_host = []
    for k in (0, 1):
      stream = pipeline.build_train_stream(cfg, 4, 0, 2, k, 2)
      ids = []
      while stream.get_state()["states"][str(k)]["epoch"] == 0:
        b = stream.next_batch()
        ids += b["example_ids"][b["example_ids"] >= 0].tolist()
      per_host.append(set(ids))
  assert per_host[0] and per_host[1] and not per_host[0] & per_host[1]
  assert per_host[0] | per_host[1] == whole
