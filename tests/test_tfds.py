"""The real-corpus loaders (seqio Tasks over tfds), run offline with tfds.testing.mock_data."""
import time

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from raptr_jax.config import base_config  # noqa: E402
from raptr_jax.data import pipeline  # noqa: E402


def data_config(tmp_path, **fields):
  cfg = base_config().data
  cfg.update(source="c4", tfds_data_dir=str(tmp_path), seq_len=64, objective="causal_lm")
  cfg.update(**fields)
  return cfg


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
    ids = {}
    for seed in (0, 1):
      stream = pipeline.build_stream(cfg, "train", 4, seed, True)
      got = []
      while stream.get_state()["epoch"] == 0:
        b = stream.next_batch()
        got += b["example_ids"][b["example_ids"] >= 0].tolist()
      ids[seed] = got
    assert ids[0] != ids[1] and set(ids[0]) == set(ids[1])  # other order, same stable ids
    stream = pipeline.build_stream(cfg, "train", 4, 3, True)
    for _ in range(5):
      stream.next_batch()
    state = stream.get_state()
    want = [stream.next_batch() for _ in range(4)]
    other = pipeline.build_stream(cfg, "train", 4, 3, True)
    other.set_state(state)
    for w in want:
      g = other.next_batch()
      for k in w:
        np.testing.assert_array_equal(g[k], w[k])


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
