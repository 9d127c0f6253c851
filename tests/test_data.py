import numpy as np
import pytest

from raptr_jax.config import base_config
from raptr_jax.data import corpus, objectives, packing, pipeline
from raptr_jax.data.vocab import EOS_ID, PAD_ID, UNK_ID, load_vocabulary


def data_config(**fields):
  cfg = base_config().data
  cfg.update(seq_len=64, **fields)
  return cfg


@pytest.fixture(scope="module")
def vocab():
  return load_vocabulary("")


def test_vocabulary_follows_t5_ids(vocab):
  assert (PAD_ID, EOS_ID, UNK_ID) == (0, 1, 2)
  assert vocab.vocab_size == vocab.base_vocab_size + 100
  assert vocab.sentinel(0) == vocab.vocab_size - 1 and vocab.sentinel(99) == vocab.base_vocab_size
  ids = vocab.encode("To be, or not to be")
  assert vocab.decode(ids) == "To be, or not to be"
  assert {vocab.piece_id(p) for p in ("[NLU]", "[NLG]", "[S2S]")}.isdisjoint({0, 1, 2})
  with pytest.raises(ValueError, match="sentinel"):
    vocab.sentinel(100)


def test_builtin_split_is_disjoint_by_document():
  train = {d["key"] for d in corpus.read_documents("train")}
  val = {d["key"] for d in corpus.read_documents("validation")}
  assert train.isdisjoint(val) and len(val) > 10 and len(train) > 20 * len(val) // 2


@pytest.mark.parametrize("length,rate,span", [(100, 0.15, 3), (57, 0.5, 8), (500, 0.15, 64), (10, 0.5, 3)])
def test_noise_mask_density_and_spans(length, rate, span):
  mask = objectives.random_spans_noise_mask(length, rate, span, np.random.default_rng(0))
  assert mask.sum() == int(np.clip(round(length * rate), 1, length - 1))
  assert not mask[0]  # starts with a non-noise span
  starts = np.sum(mask[1:] & ~mask[:-1])
  assert starts == min(max(1, round(mask.sum() / span)), mask.sum(), length - mask.sum())


def test_span_corruption_reconstructs_the_text(vocab):
  tokens = np.arange(10, 60, dtype=np.int32)
  mask = objectives.random_spans_noise_mask(len(tokens), 0.3, 3, np.random.default_rng(1))
  inputs, targets = objectives.span_corruption(tokens, mask, vocab)
  assert targets[-1] == EOS_ID
  # Replace each sentinel of the inputs with the target span it leads.
  spans, current = {}, None
  for t in targets[:-1]:
    if t >= vocab.base_vocab_size:
      current = t
      spans[t] = []
    else:
      spans[current].append(t)
  rebuilt = [x for t in inputs for x in (spans[t] if t >= vocab.base_vocab_size else [t])]
  np.testing.assert_array_equal(rebuilt, tokens)


def test_ul2_examples_fit_and_mask_only_targets(vocab):
  ul2 = objectives.UL2(vocab)
  tokens = np.arange(10, 400, dtype=np.int32)
  kinds = set()
  for i in range(60):
    ex = ul2(tokens, 128, objectives.example_rng(0, i))
    n = len(ex["inputs"])
    assert n <= 128 and all(len(v) == n for v in ex.values())
    np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])  # aligned shift
    p = int(ex["prefix"].sum())
    assert ex["prefix"][:p].all() and not ex["weights"][:p - 1].any() and ex["weights"][p - 1:].all()
    assert ex["targets"][-1] == EOS_ID
    kinds.add(int(ex["inputs"][0]))
  assert kinds == {vocab.piece_id(t) for t in ("[NLU]", "[NLG]", "[S2S]")}


def test_objective_is_a_function_of_seed_id_epoch(vocab):
  ul2 = objectives.UL2(vocab)
  tokens = np.arange(10, 200, dtype=np.int32)
  a = ul2(tokens, 128, objectives.example_rng(3, 12345678901, 0))
  b = ul2(tokens, 128, objectives.example_rng(3, 12345678901, 0))
  c = ul2(tokens, 128, objectives.example_rng(4, 12345678901, 0))
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert any(not np.array_equal(a[k], c[k]) for k in a if len(a[k]) == len(c[k])) or len(a["inputs"]) != len(c["inputs"])


def test_packing_segments_positions_and_padding():
  packer = packing.RowPacker(10)
  ex = lambda n, v: {"inputs": np.full(n, v), "targets": np.full(n, v), "weights": np.ones(n), "prefix": np.zeros(n)}
  packer.add(ex(4, 5), 11)
  assert packer.fits(ex(6, 6)) and not packer.fits(ex(7, 6))
  packer.add(ex(6, 6), 12)
  row = packer.pop()
  np.testing.assert_array_equal(row["segment_ids"], [1] * 4 + [2] * 6)
  np.testing.assert_array_equal(row["positions"], list(range(4)) + list(range(6)))
  assert row["example_ids"] == [11, 12] and packer.empty
  packer.add(ex(3, 7), 13)
  row = packer.pop()
  np.testing.assert_array_equal(row["segment_ids"], [1] * 3 + [0] * 7)
  assert row["weights"][3:].sum() == 0


def test_stream_resumes_exactly_and_host_rows_partition():
  cfg = data_config(source="builtin", objective="ul2")
  stream = pipeline.build_stream(cfg, "train", 4, seed=1, train=True)
  for _ in range(3):
    stream.next_batch()
  state = stream.get_state()
  expected = [stream.next_batch() for _ in range(3)]
  other = pipeline.build_stream(cfg, "train", 4, seed=1, train=True)
  other.set_state(state)
  for want in expected:
    got = other.next_batch()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  halves = [pipeline.host_rows(expected[0], i, 2) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), expected[0]["inputs"])
  ids = expected[0]["example_ids"]
  assert len(set(ids[ids >= 0].tolist())) == int((ids >= 0).sum())  # no example twice in a batch


def test_validation_stream_is_finite_and_fixed():
  cfg = data_config(source="builtin", objective="causal_lm")
  a = list(pipeline.build_stream(cfg, "validation", 8, seed=0, train=False))
  b = list(pipeline.build_stream(cfg, "validation", 8, seed=5, train=False))
  assert len(a) == len(b) > 5
  np.testing.assert_array_equal(a[-1]["inputs"], b[-1]["inputs"])


def test_unknown_source_is_a_clear_error():
  cfg = data_config(source="nope", objective="ul2")
  with pytest.raises(ValueError, match="data.source='nope'"):
    pipeline.build_stream(cfg, "train", 4, seed=1, train=True)


def test_prefetcher_state_names_the_position_after_the_last_batch_handed_out():
  cfg = data_config(source="builtin", objective="ul2")
  direct = pipeline.build_stream(cfg, "train", 4, seed=2, train=True)
  ahead = pipeline.Prefetcher(pipeline.build_stream(cfg, "train", 4, seed=2, train=True), depth=3)
  for _ in range(3):
    want, got = direct.next_batch(), ahead.next_batch()
    np.testing.assert_array_equal(want["inputs"], got["inputs"])
    assert ahead.get_state() == direct.get_state()
  ahead.close()


def test_missing_vocabulary_names_the_field():
  with pytest.raises(FileNotFoundError, match="data.vocab_path"):
    load_vocabulary("/nonexistent/spm.model")


def test_sharded_stream_is_the_whole_stream_split_by_position_and_resumes_exactly():
  """data.shards=n: shard k packs the examples at positions k, k + n, ... of each epoch's order;
  a host's stream is its shards' rows in shard order, its state names every shard, and a state
  saved with another shard count is refused with the fix."""
  cfg = base_config().data
  whole = pipeline.build_train_stream(cfg, 8, 0, 2, 0, 1)          # one host, both shards
  first = pipeline.build_train_stream(cfg, 8, 0, 2, 0, 2)          # host 0 of 2: shard 0
  second = pipeline.build_train_stream(cfg, 8, 0, 2, 1, 2)         # host 1 of 2: shard 1
  ids = lambda b: [[int(i) for i in r if i >= 0] for r in b["example_ids"]]
  read = {0: [], 1: []}
  for _ in range(3):
    b, a0, a1 = whole.next_batch(), first.next_batch(), second.next_batch()
    assert ids(b) == ids(a0) + ids(a1) and len(ids(a0)) == 4
    read[0] += [i for r in ids(a0) for i in r]
    read[1] += [i for r in ids(a1) for i in r]
  assert not set(read[0]) & set(read[1])
  # Rows are packed in order, so each shard's examples are its positions of the epoch's order.
  order = [example_id for example_id, _ in first.streams[0].source.iterate(0, 0)]
  for k in (0, 1):
    assert read[k] == order[k::2][:len(read[k])] and len(read[k]) > 8
  state = whole.get_state()
  assert state["shards"] == 2 and set(state["states"]) == {"0", "1"}
  resumed = pipeline.build_train_stream(cfg, 8, 0, 2, 0, 1)
  resumed.set_state(state)
  assert ids(resumed.next_batch()) == ids(whole.next_batch())
  with pytest.raises(ValueError, match="data.shards=2"):
    pipeline.build_train_stream(cfg, 8, 0, 1, 0, 1).set_state(state)
  with pytest.raises(ValueError, match="read as 1 shard"):
    resumed.set_state({"epoch": 0, "cursor": 0})
