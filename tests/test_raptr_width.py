"""Attention-/MLP-RaPTr (Section 4.3) and Bernoulli depth selections: equal to explicit
computations on the full model with masked weights; plans, FLOPs and config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from raptr_jax import flops as flops_lib
from raptr_jax import run as run_lib
from raptr_jax import train as train_lib
from raptr_jax.methods import raptr
from raptr_jax.metrics import read_metrics
from raptr_jax.models import ModelConfig, build_model, encdec, get_family
from raptr_jax.models.decoder import loss_fn
from raptr_jax.models.selection import LayerSelection, Selection

CFG = ModelConfig(vocab_size=128, d_model=32, num_layers=3, num_heads=4, head_dim=8, mlp_dim=64, dtype="float32")


def _decoder_batch():
  tokens = np.random.default_rng(0).integers(3, 128, size=(2, 17)).astype(np.int32)
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]), "weights": jnp.ones((2, 16)),
          "prefix": jnp.zeros((2, 16), jnp.int32), "segment_ids": jnp.ones((2, 16), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(16), (2, 16))}


def _masked_params(params, stack, heads=None, head_scale=1.0, mlp=None, parts=1, mlp_scale=1.0):
  """The full model's params with the dropped heads' output rows (and parts' wo rows) zeroed and
  the kept ones multiplied by the branch scale: the explicit reference of a width selection."""
  out = jax.tree.map(lambda a: a, params)
  layer = dict(out[stack])
  L = layer["o"].shape[0]
  for i in range(L):
    if heads is not None:
      keep = np.zeros(layer["o"].shape[1], bool)
      keep[np.asarray(heads[i])] = True
      for name in [n for n in ("o", "cross_o") if n in layer]:
        layer[name] = layer[name].at[i].multiply(jnp.where(keep, head_scale, 0.0)[:, None, None])
    if mlp is not None:
      f = layer["wo"].shape[1]
      keep = np.zeros(parts, bool)
      keep[np.asarray(mlp[i])] = True
      rows = np.repeat(keep, f // parts)
      layer["wo"] = layer["wo"].at[i].multiply(jnp.where(rows, mlp_scale, 0.0)[:, None])
  out[stack] = layer
  return out


@pytest.mark.parametrize("axis", ["heads", "mlp"])
def test_width_selection_equals_the_full_model_with_dropped_slices_zeroed(axis):
  model, _ = build_model("decoder", CFG, seed=0)
  graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
  batch = _decoder_batch()
  units = 4
  stage = raptr.RaptrStage(2 / units, (), 1.0)
  sel = raptr.make_width_select(stage, axis, units, 3)(jax.random.key(0), None, 0.0)
  loss = lambda p, s: loss_fn(nnx.merge(graphdef, p), batch, s)[0]
  w = sel.width
  if axis == "heads":
    assert w.heads.shape == (3, 2) and w.head_scale == 2.0
    ref = _masked_params(params, "layers", heads=w.heads, head_scale=w.head_scale)
  else:
    assert w.mlp.shape == (3, 2) and w.mlp_scale == 2.0
    ref = _masked_params(params, "layers", mlp=w.mlp, parts=units, mlp_scale=w.mlp_scale)
  np.testing.assert_allclose(loss(params, sel), loss(ref, None), rtol=1e-5)
  # Gradients: exactly zero for the slices a layer did not run, nonzero for the ones it did.
  grads = jax.grad(loss)(params, sel)["layers"]
  for i in range(3):
    kept = np.asarray((w.heads if axis == "heads" else w.mlp)[i])
    if axis == "heads":
      g = np.abs(np.asarray(grads["q"][i])).sum(axis=(0, 2))          # [heads]
    else:
      g = np.abs(np.asarray(grads["wi"][i])).reshape(32, units, -1).sum(axis=(0, 2))  # [parts]
    assert np.all(g[kept] > 0) and np.all(np.delete(g, kept) == 0)


def test_t5_head_selection_narrows_self_cross_attention_and_the_relative_bias():
  cfg = ModelConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=64, dtype="float32",
                    position="relative", gated_mlp=True)
  model, _ = build_model("t5", cfg, seed=0)
  graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(1)
  b, s, t = 2, 12, 6
  batch = {"encoder_inputs": rng.integers(3, 128, (b, s)), "decoder_inputs": rng.integers(3, 128, (b, t)),
           "targets": rng.integers(3, 128, (b, t)), "weights": np.ones((b, t), np.float32),
           "encoder_segment_ids": np.ones((b, s)), "decoder_segment_ids": np.ones((b, t)),
           "encoder_positions": np.broadcast_to(np.arange(s), (b, s)),
           "decoder_positions": np.broadcast_to(np.arange(t), (b, t))}
  batch = {k: jnp.asarray(v, jnp.float32 if k == "weights" else jnp.int32) for k, v in batch.items()}
  select = get_family("t5").wrap_select(raptr.make_width_select(raptr.RaptrStage(0.75, (), 1.0), "heads", 4, 2),
                                        type("M", (), {"select_stacks": "both"}))
  sel = select(jax.random.key(3), batch, 0.0)
  ref = _masked_params(params, "encoder_layers", heads=sel.encoder.width.heads, head_scale=4 / 3)
  ref = _masked_params(ref, "decoder_layers", heads=sel.decoder.width.heads, head_scale=4 / 3)
  loss = lambda p, s: encdec.loss_fn(nnx.merge(graphdef, p), batch, s)[0]
  np.testing.assert_allclose(loss(params, sel), loss(ref, None), rtol=1e-5)


def test_bernoulli_depth_selection_skips_dropped_layers():
  model, _ = build_model("decoder", CFG, seed=0)
  graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
  batch = _decoder_batch()
  sel = raptr.make_select(raptr.RaptrStage(0.5, (0,), 1.0), 3, selection="bernoulli")(jax.random.key(0), None, 0.0)
  kept = np.flatnonzero(np.asarray(sel.layers.active))
  explicit = Selection(LayerSelection(jnp.asarray(kept, jnp.int32), raptr.sqrt_scales(kept, 3)))
  loss = lambda p, s: loss_fn(nnx.merge(graphdef, p), batch, s)[0]
  np.testing.assert_allclose(loss(params, sel), loss(params, explicit), rtol=1e-6)
  assert "cond[" in str(jax.make_jaxpr(loss)(params, sel))


def test_width_plans_default_schedules_and_flops(tiny_config):
  cfg = tiny_config
  cfg.model.update(num_heads=6, head_dim=16, mlp_dim=128)
  cfg.method.name = "raptr"
  cfg.method.raptr.axis = "heads"
  plan = run_lib.build_plan(cfg)
  assert [s.width for s in plan.stages] == [{"num_heads": 3}, {"num_heads": 4}, {"num_heads": 5}, None]
  cfg.method.raptr.update(axis="mlp", schedule="1-2-3-4")
  plan = run_lib.build_plan(cfg)
  assert [s.width for s in plan.stages] == [{"mlp_dim": 32}, {"mlp_dim": 64}, {"mlp_dim": 96}, None]
  run = train_lib.setup(cfg)
  fl = flops_lib.StageFlops("decoder", run.model_cfg, 8, 64)
  per_mlp = (fl(plan.stages[3], 0) - fl(plan.stages[0], 0)) / 3
  assert per_mlp > 0 and fl(plan.stages[1], 0) == pytest.approx(fl(plan.stages[0], 0) + per_mlp)


@pytest.mark.parametrize("change,match", [
    (dict(axis="width"), "axis must be one of"),
    (dict(axis="mlp", mlp_parts=3), "must divide"),
    (dict(axis="heads", schedule="2-2.5-4"), "not integral"),
    (dict(axis="heads", selection="bernoulli"), "fixed count"),
    (dict(axis="heads", stages=((0.5, (0,), 0.5), (1.0, (), 0.5))), "no fixed set"),
    (dict(axis="heads", schedule="3-2-4"), "not monotone"),
])
def test_bad_width_settings_are_rejected(tiny_config, change, match):
  cfg = tiny_config
  cfg.model.num_heads = 4
  cfg.method.name = "raptr"
  cfg.method.raptr.update(change)
  with pytest.raises(ValueError, match=match):
    run_lib.build_plan(cfg)


def test_width_raptr_trains_one_compile_per_stage(tiny_config, tmp_path):
  cfg = tiny_config
  cfg.model.num_heads, cfg.model.head_dim = 4, 16
  cfg.budget.value, cfg.log.every = 16, 1
  cfg.method.name = "raptr"
  cfg.method.raptr.update(axis="heads", schedule="2-3-4")
  run = train_lib.setup(cfg)
  assert len({s.shape for s in run.plan.stages}) == 3
  out = train_lib.train(cfg, str(tmp_path))
  rows = [r for r in read_metrics(tmp_path) if "lr" in r]
  assert 0.6 < rows[-1]["flops/relative"] < 1.0 and np.isfinite(out["eval/loss"])
  assert [r["subnetwork/num_heads"] for r in rows[::6]] == [2, 3, 4]
  cfg.optimizer.freeze_inactive = True
  with pytest.raises(ValueError, match="freeze_inactive"):
    train_lib.setup(cfg)
