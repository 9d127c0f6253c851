import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from raptr_jax.models import LayerSelection, ModelConfig, Selection, TokenSelection, build_model, layers
from raptr_jax.models.decoder import DecoderLM, loss_fn

CFG = ModelConfig(vocab_size=128, d_model=32, num_layers=6, num_heads=4, head_dim=8, mlp_dim=64,
                  dtype="float32")


def make_batch(b=2, t=16, seed=0, vocab=128):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, size=(b, t + 1)).astype(np.int32)
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
          "weights": jnp.ones((b, t)), "prefix": jnp.zeros((b, t), jnp.int32),
          "segment_ids": jnp.ones((b, t), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(t), (b, t))}


def params_of(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_attention_mask_matches_explicit_rule():
  seg = np.array([[1, 1, 1, 2, 2, 2, 0]])
  pre = np.array([[1, 1, 0, 1, 0, 0, 0]])
  got = np.asarray(layers.attention_mask(jnp.asarray(seg), jnp.asarray(pre)))[0, 0]
  for q in range(7):
    for k in range(7):
      want = seg[0, q] == seg[0, k] and seg[0, k] > 0 and (k <= q or (pre[0, q] and pre[0, k]))
      assert got[q, k] == want, (q, k)


def test_layer_selection_equals_explicit_subnetwork_with_zero_grads_elsewhere():
  model, _ = build_model("decoder", CFG, seed=0)
  batch = make_batch()
  idx = np.array([0, 2, 5])
  scales = np.array([1.0, 0.5, 2.0], np.float32)
  sel = Selection(layers=LayerSelection(jnp.asarray(idx, jnp.int32), jnp.asarray(scales)))
  full = params_of(model)
  graphdef = nnx.graphdef(model)

  def selected_loss(p):
    return loss_fn(nnx.merge(graphdef, p), batch, sel)[0]

  # Explicit reference: a 3-layer model holding exactly the selected layers' weights, with each
  # block's residual branches scaled by hand.
  sub_cfg = ModelConfig(**{**CFG.__dict__, "num_layers": 3})
  sub = DecoderLM(sub_cfg, rngs=nnx.Rngs(params=1))
  sub_graphdef = nnx.graphdef(sub)

  def reference_loss(p_full):
    sub_params = jax.tree.map(lambda x: x, p_full)
    sub_params["layers"] = {k: v[idx] for k, v in p_full["layers"].items()}
    m = nnx.merge(sub_graphdef, sub_params)
    x = jnp.take(m.embedding.value, batch["inputs"], axis=0)
    for i in range(3):
      p_i = {k: v[i] for k, v in sub_params["layers"].items()}
      x = layers.block(p_i, x, batch["positions"], None, jnp.float32(scales[i]), sub_cfg)
    x = layers.rms_norm(x, m.final_norm.value, CFG.norm_eps)
    logits = x @ m.head.value
    logz = jax.nn.logsumexp(logits, -1)
    gold = jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    return jnp.mean(logz - gold)

  loss, grads = jax.value_and_grad(selected_loss)(full)
  ref_loss, ref_grads = jax.value_and_grad(reference_loss)(full)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for name, g in grads["layers"].items():
    np.testing.assert_allclose(g, ref_grads["layers"][name], rtol=1e-4, atol=1e-7)
    unselected = np.setdiff1d(np.arange(6), idx)
    assert np.all(np.asarray(g)[unselected] == 0.0), name
    assert np.all(np.abs(np.asarray(g)[idx]).sum(axis=tuple(range(1, g.ndim))) > 0), name


def test_full_selection_equals_no_selection():
  model, _ = build_model("decoder", CFG, seed=0)
  batch = make_batch()
  a = loss_fn(model, batch, None)[0]
  b = loss_fn(model, batch, Selection(layers=LayerSelection.full(6)))[0]
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_token_selection_equals_explicit_gather_run_scatter():
  model, _ = build_model("decoder", CFG, seed=0)
  batch = make_batch(b=2, t=12)
  rng = np.random.default_rng(0)
  r = 5
  # 2 dropping layers starting at selected position 1, each example its own sorted subset.
  idx = np.stack([np.stack([np.sort(rng.choice(12, r, replace=False)) for _ in range(2)]) for _ in range(2)])
  sel = Selection(tokens=TokenSelection(jnp.asarray(idx, jnp.int32), start=1))
  got = model(batch["inputs"], batch["positions"], batch["segment_ids"], batch["prefix"], sel)

  p = params_of(model)
  x = np.array(jnp.take(p["embedding"], batch["inputs"], axis=0))
  pos = np.asarray(batch["positions"])
  one = jnp.float32(1.0)
  for layer in range(6):
    p_l = {k: v[layer] for k, v in p["layers"].items()}
    if layer in (1, 2):
      for b in range(2):
        keep = idx[layer - 1, b]
        xb = jnp.asarray(x[b, keep][None])
        mask = layers.attention_mask(jnp.ones((1, r), jnp.int32), None)
        x[b, keep] = np.asarray(layers.block(p_l, xb, jnp.asarray(pos[b, keep][None]), mask, one, CFG))[0]
    else:
      x = np.array(layers.block(p_l, jnp.asarray(x), jnp.asarray(pos), None, one, CFG))
  want = layers.rms_norm(jnp.asarray(x), p["final_norm"], CFG.norm_eps) @ p["head"]
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_packed_row_equals_examples_run_separately():
  """Segment ids and per-segment positions isolate packed examples exactly."""
  model, _ = build_model("decoder", CFG, seed=0)
  a, b = make_batch(1, 7, seed=1), make_batch(1, 9, seed=2)
  packed_inputs = jnp.concatenate([a["inputs"], b["inputs"]], axis=1)
  segs = jnp.asarray([[1] * 7 + [2] * 9])
  pos = jnp.asarray([list(range(7)) + list(range(9))])
  prefix = jnp.asarray([[1, 1, 1, 0, 0, 0, 0] + [1, 1, 0, 0, 0, 0, 0, 0, 0]])
  packed = model(packed_inputs, pos, segs, prefix)
  alone_a = model(a["inputs"], a["positions"], jnp.ones((1, 7), jnp.int32), prefix[:, :7])
  alone_b = model(b["inputs"], b["positions"], jnp.ones((1, 9), jnp.int32), prefix[:, 7:])
  np.testing.assert_allclose(packed[:, :7], alone_a, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(packed[:, 7:], alone_b, rtol=1e-4, atol=1e-5)


def test_prefix_tokens_see_the_future_of_the_prefix_only():
  model, _ = build_model("decoder", CFG, seed=0)
  batch = make_batch(1, 10)
  prefix = jnp.asarray([[1, 1, 1, 1, 0, 0, 0, 0, 0, 0]])
  base = model(batch["inputs"], batch["positions"], batch["segment_ids"], prefix)
  changed_prefix = batch["inputs"].at[0, 3].set(5)
  out = model(changed_prefix, batch["positions"], batch["segment_ids"], prefix)
  assert not np.allclose(out[0, 0], base[0, 0])          # bidirectional inside the prefix
  changed_target = batch["inputs"].at[0, 7].set(5)
  out = model(changed_target, batch["positions"], batch["segment_ids"], prefix)
  np.testing.assert_allclose(out[0, :7], base[0, :7], rtol=1e-5, atol=1e-6)  # causal after it


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_and_unscanned_layers_do_not_change_gradients(remat):
  batch = make_batch()
  grads = []
  for cfg in (CFG, ModelConfig(**{**CFG.__dict__, "remat": remat}),
              ModelConfig(**{**CFG.__dict__, "scan_layers": False})):
    model, _ = build_model("decoder", cfg, seed=0)
    graphdef, params = nnx.graphdef(model), params_of(model)
    grads.append(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch)[0])(params))
  for other in grads[1:]:
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), grads[0], other)


def test_learned_positions_and_tied_embeddings_run():
  cfg = ModelConfig(**{**CFG.__dict__, "position": "learned", "max_len": 32, "tied_embeddings": True})
  model, _ = build_model("decoder", cfg, seed=0)
  loss = loss_fn(model, make_batch())[0]
  assert np.isfinite(loss) and abs(float(loss) - np.log(128)) < 1.0
  assert not hasattr(model, "head")


def test_bad_model_config_is_rejected():
  with pytest.raises(ValueError, match="rotary"):
    ModelConfig(**{**CFG.__dict__, "head_dim": 7})
  with pytest.raises(ValueError, match="remat"):
    ModelConfig(**{**CFG.__dict__, "remat": "sometimes"})
