"""Progressive layer dropping: Algorithm 2's keep probabilities, real skipping, accounting."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from raptr_jax import plan as plan_lib
from raptr_jax import run as run_lib
from raptr_jax import train as train_lib
from raptr_jax.methods import pld
from raptr_jax.metrics import read_metrics
from raptr_jax.models import ModelConfig, build_model, layers
from raptr_jax.models.decoder import loss_fn
from raptr_jax.optim import layer_activity


def _algorithm_2_keep_probabilities(t, T, L, alpha_bar, gamma_f):
  """Algorithm 2 of No Train No Gain, lines 2-14, transcribed: the p each layer is sampled with."""
  gamma = gamma_f / T
  p = 1.0
  alpha_t = (1 - alpha_bar) * math.exp(-gamma * t) + alpha_bar
  p_d = (1 - alpha_t) / L
  out = []
  for _ in range(L):
    out.append(p)
    p = p - p_d
  return out


@pytest.mark.parametrize("t,T", [(0, 1000), (10, 1000), (250, 1000), (1000, 1000), (3.6e4, 8.64e4)])
def test_keep_probabilities_are_algorithm_2_in_the_budget_unit(t, T):
  got = pld.keep_probabilities(t / T, 12, 0.5, 100.0)
  np.testing.assert_allclose(got, _algorithm_2_keep_probabilities(t, T, 12, 0.5, 100.0), rtol=1e-6)
  assert pld.expected_layer_fraction(t / T, 12, 0.5, 100.0) == pytest.approx(float(np.mean(got)), rel=1e-6)


def test_schedule_starts_full_and_decays_to_theta_bar():
  assert float(pld.theta(0.0, 0.5, 100.0)) == 1.0
  assert float(pld.theta(1.0, 0.5, 100.0)) == pytest.approx(0.5)
  p_end = np.asarray(pld.keep_probabilities(1.0, 10, 0.6, 20.0))
  assert p_end[0] == 1.0 and np.all(np.diff(p_end) < 0)  # linear decay with depth
  np.testing.assert_allclose(np.diff(p_end), -(1 - pld.theta(1.0, 0.6, 20.0)) / 10, rtol=1e-5)


def test_sampled_layers_follow_the_keep_probabilities():
  select = jax.jit(pld.make_select(8, 0.5, 10.0))
  draws = np.stack([np.asarray(select(jax.random.key(i), None, 0.3).layers.active) for i in range(2000)])
  np.testing.assert_allclose(draws.mean(0), pld.keep_probabilities(0.3, 8, 0.5, 10.0), atol=0.04)


def _tiny_decoder(L=5):
  cfg = ModelConfig(vocab_size=128, d_model=32, num_layers=L, num_heads=4, head_dim=8, mlp_dim=64, dtype="float32")
  model, _ = build_model("decoder", cfg, seed=0)
  tokens = np.random.default_rng(0).integers(3, 128, size=(2, 17)).astype(np.int32)
  batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]), "weights": jnp.ones((2, 16)),
           "prefix": jnp.zeros((2, 16), jnp.int32), "segment_ids": jnp.ones((2, 16), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(16), (2, 16))}
  return cfg, model, batch


@pytest.mark.parametrize("scaling", ["inverse_p", "none"])
def test_dropped_layers_are_skipped_and_kept_ones_scaled_as_algorithm_2(scaling):
  cfg, model, batch = _tiny_decoder()
  graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
  select = pld.make_select(5, 0.2, 5.0, scaling)
  key = next(jax.random.key(i) for i in range(100)
             if 1 < int(select(jax.random.key(i), None, 0.9).layers.active.sum()) < 5)
  sel = select(key, None, 0.9)
  loss = lambda p: loss_fn(nnx.merge(graphdef, p), batch, sel)[0]
  # Explicit forward: Algorithm 2 lines 7-14 over the kept layers only.
  keep, p_i = np.asarray(sel.layers.active), np.asarray(pld.keep_probabilities(0.9, 5, 0.2, 5.0))

  def explicit(p):
    x = jnp.take(p["embedding"], batch["inputs"], axis=0)
    for i in np.flatnonzero(keep):
      s = 1 / p_i[i] if scaling == "inverse_p" else 1.0
      x = layers.block({k: v[i] for k, v in p["layers"].items()}, x, batch["positions"], None, jnp.float32(s), cfg)
    logits = layers.rms_norm(x, p["final_norm"], cfg.norm_eps) @ p["head"]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0])

  np.testing.assert_allclose(loss(params), explicit(params), rtol=1e-5)
  grads = jax.grad(loss)(params)
  for name, g in grads["layers"].items():
    norms = np.abs(np.asarray(g)).reshape(5, -1).sum(1)
    assert np.all(norms[~keep] == 0) and np.all(norms[keep] > 0), name
  # Real control flow: the dropped layers are a branch not taken, in forward and backward.
  assert "cond[" in str(jax.make_jaxpr(jax.grad(loss))(params))


def test_plan_charges_rst_by_the_expected_layer_share():
  stage = pld.plan_stages(dataclasses.make_dataclass("C", ["theta_bar", "gamma_f", "scaling"])(0.5, 20.0, "none"), 12)[0]
  plan = plan_lib.Plan((stage,), "rst_seconds", 100.0, 1, step_costs={(stage.shape, False): 2.0},
                       layer_cost_share=0.8)
  assert plan.charge(stage, False, 0.0) == pytest.approx(2.0)  # calibrated with every layer running
  share = pld.expected_layer_fraction(0.5, 12, 0.5, 20.0)
  assert plan.charge(stage, False, 0.5) == pytest.approx(2.0 * (0.2 + 0.8 * share))


def test_pld_run_logs_shrinking_usage_and_compiles_once(tiny_config, tmp_path):
  cfg = tiny_config
  cfg.model.num_layers = 6
  cfg.budget.value, cfg.log.every = 20, 1
  cfg.method.name = "pld"
  cfg.method.pld.update(theta_bar=0.5, gamma_f=10.0)
  run = train_lib.setup(cfg)
  assert len(run.plan.stages) == 1 and run.plan.stages[0].layer_fraction is not None
  out = train_lib.train(cfg, str(tmp_path))
  rows = [r for r in read_metrics(tmp_path) if "lr" in r]
  layers_run = [r["subnetwork/layers"] for r in rows]
  assert layers_run[0] > layers_run[-1] and np.all(np.diff(layers_run) <= 1e-9)
  want = np.mean([6 * pld.expected_layer_fraction(i / 20, 6, 0.5, 10.0) for i in range(20)])
  assert rows[-1]["subnetwork/avg_layers"] == pytest.approx(want, rel=1e-6)
  assert 0.5 < rows[-1]["flops/relative"] < 1.0 and np.isfinite(out["eval/loss"])


def test_bad_pld_settings_are_config_errors(tiny_config):
  tiny_config.method.name = "pld"
  for field, value, match in (("theta_bar", 1.5, "theta_bar"), ("gamma_f", 0.0, "gamma_f"),
                              ("scaling", "sqrt", "scaling")):
    cfg = tiny_config.copy_and_resolve_references()
    cfg.method.pld[field] = value
    with pytest.raises(ValueError, match=match):
      run_lib.build_plan(cfg)


def test_freezing_follows_the_dropped_layers():
  """optimizer.freeze_inactive under PLD: the activity mask is the step's kept layers."""
  sel = pld.make_select(6, 0.2, 5.0)(jax.random.key(0), None, 0.9).layers
  assert not bool(sel.active.all())
  np.testing.assert_array_equal(sel.mask(6), sel.active)
  active = layer_activity({"layers": {"w": jnp.zeros((6, 2))}, "head": jnp.zeros(3)}, {"layers": sel.mask(6)})
  np.testing.assert_array_equal(active["layers"]["w"], sel.active)
  assert active["head"] is True
