"""BERT (MLM) and T5 (span corruption) families: objectives, models, bad input."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from raptr_jax import config as config_lib
from raptr_jax import train as train_lib
from raptr_jax.config import base_config
from raptr_jax.data import corruption, objectives, packing
from raptr_jax.data import build
from raptr_jax.data.vocab import EOS_ID, load_vocabulary
from raptr_jax.models import (EncoderDecoderSelection, LayerSelection, ModelConfig, Selection, build_model,
                              for_stacks, layers)
from raptr_jax.models import encdec, encoder
from conftest import load_config

T5_CFG = ModelConfig(vocab_size=256, d_model=32, num_layers=3, num_decoder_layers=2, num_heads=4, head_dim=8,
                     mlp_dim=48, position="relative", dtype="float32", relative_buckets=8,
                     relative_max_distance=16)
BERT_CFG = ModelConfig(vocab_size=256, d_model=32, num_layers=3, num_heads=4, head_dim=8, mlp_dim=48,
                       position="learned", max_len=64, tied_embeddings=True, gated_mlp=False, dtype="float32")


@pytest.fixture(scope="module")
def vocab():
  return load_vocabulary("")


def params_of(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# ----------------------------------------------------------------------------- objectives

def test_t5_span_lengths_match_t5_defaults():
  assert corruption.t5_span_lengths(512) == (568, 114)  # T5 / nanoT5: inputs 512, targets 114
  assert corruption.t5_span_lengths(128) == (141, 29)


def test_span_corruption_gives_exact_lengths_and_reconstructs(vocab):
  cfg = base_config().data
  cfg.update(objective="span_corruption", seq_len=128)
  obj = build.build_objective("span_corruption", vocab, cfg)
  assert obj.chunk_length == 141 and [g.length for g in obj.groups] == [128, 29]
  tokens = np.arange(10, 10 + 141, dtype=np.int32)
  for i in range(20):
    ex = obj(tokens, 128, objectives.example_rng(0, i))
    assert len(ex["encoder_inputs"]) == 128 and len(ex["targets"]) == 29
    assert ex["encoder_inputs"][-1] == EOS_ID and ex["targets"][-1] == EOS_ID
    np.testing.assert_array_equal(ex["decoder_inputs"], np.concatenate([[0], ex["targets"][:-1]]))
    # Put each sentinel's span back: the original chunk.
    spans, cur = {}, None
    for t in ex["targets"][:-1]:
      if t >= vocab.base_vocab_size:
        cur = int(t)
        spans[cur] = []
      else:
        spans[cur].append(int(t))
    rebuilt = []
    for t in ex["encoder_inputs"][:-1]:
      rebuilt.extend(spans[int(t)] if t >= vocab.base_vocab_size else [int(t)])
    np.testing.assert_array_equal(rebuilt, tokens)
  again = obj(tokens, 128, objectives.example_rng(0, 7))
  np.testing.assert_array_equal(again["encoder_inputs"], obj(tokens, 128, objectives.example_rng(0, 7))["encoder_inputs"])


def test_mlm_masks_exactly_rate_with_80_10_10(vocab):
  mlm = corruption.MaskedLM(vocab, 0.15)
  tokens = np.arange(10, 10 + 200, dtype=np.int32)
  kinds = np.zeros(3)
  for i in range(200):
    ex = mlm(tokens, 128, objectives.example_rng(1, i))
    n = len(ex["inputs"])
    assert n == 128 and ex["targets"][-1] == EOS_ID
    np.testing.assert_array_equal(ex["targets"], np.concatenate([tokens[:127], [EOS_ID]]))
    chosen = ex["weights"] > 0
    assert chosen.sum() == round(0.15 * 128)
    assert np.array_equal(ex["inputs"][~chosen], ex["targets"][~chosen])  # loss only where corrupted
    masked = ex["inputs"][chosen] == mlm.mask_id
    kept = ex["inputs"][chosen] == ex["targets"][chosen]
    kinds += [masked.sum(), (~masked & ~kept).sum(), kept.sum()]
  np.testing.assert_allclose(kinds / kinds.sum(), [0.8, 0.1, 0.1], atol=0.02)
  a = mlm(tokens, 128, objectives.example_rng(1, 5))
  b = mlm(tokens, 128, objectives.example_rng(1, 5))
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_mlm_rows_never_hold_more_predictions_than_the_sparse_head(vocab):
  cfg = base_config().data
  cfg.update(objective="mlm", seq_len=64, batch_size=8)
  obj = build.build_objective("mlm", vocab, cfg)
  packer = packing.RowPacker(obj.groups, obj.max_row_weight)
  rng = np.random.default_rng(0)
  total = 0
  for i in range(200):
    ex = obj(rng.integers(3, 100, size=rng.integers(8, 64)), 64, objectives.example_rng(0, i))
    if not packer.empty and not packer.fits(ex):
      row = packer.pop()
      assert row["weights"].sum() <= obj.max_row_weight
      total += 1
    packer.add(ex, i)
  assert total > 20 and obj.max_row_weight == math.ceil(0.15 * 64) + 2


@pytest.mark.parametrize("change,match", [
    (dict(family="t5", objective="span_corruption", target_len=10), "data.target_len >= 14"),
    (dict(family="t5", objective="span_corruption", extra_ids=2), "sentinel ids"),
    (dict(family="bert", objective="causal_lm"), "does not train model.family='bert'"),
    (dict(family="bert", objective="mlm", max_predictions=5), "data.max_predictions=5"),
    (dict(family="bert", objective="mlm", extra_ids=0), "extra ids"),
    (dict(family="decoder", objective="mlm"), "objective of the 'bert' family"),
    (dict(family="t5", objective="span_corruption", seq_len=3), "data.seq_len > 8"),
])
def test_bad_family_and_objective_settings_are_config_errors(change, match):
  cfg = load_config("t5" if change["family"] == "t5" else "bert", "tiny")
  cfg.model.family = change.pop("family")
  cfg.data.update(change)
  with pytest.raises(ValueError, match=match):
    train_lib.setup(cfg)


# ----------------------------------------------------------------------------- models

def _reference_bucket(rel, bidirectional, num_buckets, max_distance):
  """T5's relative_position_bucket, one scalar at a time."""
  ret, n = 0, -rel
  if bidirectional:
    num_buckets //= 2
    ret += num_buckets if n < 0 else 0
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_t5(bidirectional):
  rel = np.arange(-300, 301)
  got = np.asarray(layers.relative_position_bucket(jnp.asarray(rel), bidirectional, 32, 128))
  want = [_reference_bucket(int(r), bidirectional, 32, 128) for r in rel]
  np.testing.assert_array_equal(got, want)
  assert got[300] == 0 and got.max() == 31
  if not bidirectional:
    assert np.all(got[rel > 0] == 0)  # a causal decoder never looks ahead


def _t5_example(rng, n_in, n_out, vocab=256):
  t = rng.integers(3, vocab, size=n_out).astype(np.int32)
  return {"encoder_inputs": rng.integers(3, vocab, size=n_in).astype(np.int32),
          "decoder_inputs": np.concatenate([[0], t[:-1]]).astype(np.int32), "targets": t,
          "weights": np.ones(n_out, np.float32)}


def _as_batch(row):
  return {k: jnp.asarray(v)[None] for k, v in row.items() if k != "example_ids"}


def test_packed_t5_row_equals_examples_run_alone():
  """Cross-attention masks, causal decoder masks and the relative bias of a packed row."""
  model, _ = build_model("t5", T5_CFG, seed=0)
  rng = np.random.default_rng(0)
  exs = [_t5_example(rng, 9, 5), _t5_example(rng, 6, 4)]
  groups = (packing.Group(20, ("encoder_inputs",), "encoder_segment_ids", "encoder_positions"),
            packing.Group(12, ("decoder_inputs", "targets", "weights"), "decoder_segment_ids", "decoder_positions"))
  packer = packing.RowPacker(groups)
  for i, ex in enumerate(exs):
    packer.add(ex, i)
  packed = encdec.logits_fn(model, _as_batch(packer.pop()))[0]
  start = 0
  for ex in exs:
    alone = model(jnp.asarray(ex["encoder_inputs"])[None], jnp.asarray(ex["decoder_inputs"])[None])[0]
    n = len(ex["targets"])
    np.testing.assert_allclose(packed[start:start + n], alone, rtol=2e-5, atol=2e-5)
    start += n


def test_packed_bert_row_equals_examples_run_alone_and_attention_is_bidirectional():
  model, _ = build_model("bert", BERT_CFG, seed=0)
  rng = np.random.default_rng(1)
  exs = [{"inputs": rng.integers(3, 256, size=n).astype(np.int32), "targets": np.zeros(n, np.int32),
          "weights": np.zeros(n, np.float32)} for n in (7, 10)]
  packer = packing.RowPacker(packing.single_group(("inputs", "targets", "weights"), 24))
  for i, ex in enumerate(exs):
    packer.add(ex, i)
  row = _as_batch(packer.pop())
  packed = encoder.logits_fn(model, row)[0]
  alone = [model(jnp.asarray(ex["inputs"])[None])[0] for ex in exs]
  np.testing.assert_allclose(packed[:7], alone[0], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(packed[7:17], alone[1], rtol=2e-5, atol=2e-5)
  changed = exs[0]["inputs"].copy()
  changed[-1] = (changed[-1] + 1) % 250 + 3
  moved = model(jnp.asarray(changed)[None])[0]
  assert not np.allclose(moved[0], alone[0][0])  # the first token sees the last one


def test_sparse_prediction_equals_the_dense_head():
  dense_cfg = BERT_CFG
  sparse_cfg = ModelConfig(**{**BERT_CFG.__dict__, "max_predictions": 6})
  model, _ = build_model("bert", dense_cfg, seed=0)
  sparse = nnx.merge(nnx.graphdef(build_model("bert", sparse_cfg, seed=0)[0]), nnx.state(model))
  rng = np.random.default_rng(2)
  weights = np.zeros((3, 20), np.float32)
  for b in range(3):
    weights[b, rng.choice(20, size=4 + b, replace=False)] = 1.0
  batch = {"inputs": jnp.asarray(rng.integers(3, 256, (3, 20)), jnp.int32),
           "targets": jnp.asarray(rng.integers(3, 256, (3, 20)), jnp.int32), "weights": jnp.asarray(weights),
           "segment_ids": jnp.ones((3, 20), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(20), (3, 20))}
  (dense_loss, dense_aux), dense_g = nnx.value_and_grad(encoder.loss_fn, has_aux=True)(model, batch)
  (sparse_loss, sparse_aux), sparse_g = nnx.value_and_grad(encoder.loss_fn, has_aux=True)(sparse, batch)
  np.testing.assert_allclose(sparse_loss, dense_loss, rtol=1e-6)
  assert int(sparse_aux["mlm/unpredicted"]) == 0 and float(sparse_aux["loss_tokens"]) == weights.sum()
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(dense_g)), jax.tree.leaves(nnx.to_pure_dict(sparse_g))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def _t5_batch(b=2, s=10, t=6):
  rng = np.random.default_rng(3)
  ex = [_t5_example(rng, s, t) for _ in range(b)]
  batch = {k: jnp.stack([jnp.asarray(e[k]) for e in ex]) for k in ex[0]}
  batch |= {"encoder_segment_ids": jnp.ones((b, s), jnp.int32), "decoder_segment_ids": jnp.ones((b, t), jnp.int32),
            "encoder_positions": jnp.broadcast_to(jnp.arange(s), (b, s)),
            "decoder_positions": jnp.broadcast_to(jnp.arange(t), (b, t))}
  return batch


def test_encoder_decoder_selections_act_per_stack():
  model, _ = build_model("t5", T5_CFG, seed=0)
  params, graphdef = params_of(model), nnx.graphdef(model)
  batch = _t5_batch()
  loss = lambda p, sel: encdec.loss_fn(nnx.merge(graphdef, p), batch, sel)[0]
  full = EncoderDecoderSelection(Selection(LayerSelection.full(3)), Selection(LayerSelection.full(2)))
  np.testing.assert_allclose(loss(params, full), loss(params, None), rtol=1e-6)

  def first_layer_only(key, _, progress=0.0):
    return Selection(LayerSelection(jnp.array([0], jnp.int32), jnp.ones(1)))

  for stacks in ("encoder", "decoder", "both"):
    sel = for_stacks(first_layer_only, stacks)(jax.random.key(0), batch, 0.0)
    grads = jax.grad(loss)(params, sel)
    for stack, n in (("encoder_layers", 3), ("decoder_layers", 2)):
      acted = stacks in (stack.split("_")[0], "both")
      for name, g in grads[stack].items():
        norms = np.abs(np.asarray(g)).reshape(n, -1).sum(1)
        assert norms[0] > 0, (stacks, stack, name)
        assert (np.all(norms[1:] == 0) if acted else np.all(norms[1:] > 0)), (stacks, stack, name)
  with pytest.raises(TypeError, match="for_stacks"):
    loss(params, first_layer_only(None, None))


def test_family_configs_build_and_import_no_tensorflow():
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  code = ("import sys; import raptr_jax.train, raptr_jax.models, raptr_jax.data.pipeline; "
          "assert 'tensorflow' not in sys.modules, 'TensorFlow imported'")
  assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
  for name, presets in (("bert", ("", "tiny", "crammed", "raptr_base")), ("t5", ("", "tiny", "base"))):
    for preset in presets:
      config_lib.validate(load_config(name, preset))
