"""Function-preserving growth (MSG, bert2BERT, LEMON): logits before and after a growth agree
for every operator and dimension; MSG's and LEMON's copies break symmetry after one step;
bert2BERT's stay symmetric (Net2Net's known limit); schedules and config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from raptr_jax import train as train_lib
from raptr_jax.config import validate
from raptr_jax.data import pipeline
from raptr_jax.step import view_params
from conftest import load_config, quiet

FULL = dict(num_layers=4, d_model=128, num_heads=4, head_dim=32, mlp_dim=256)
HALF = dict(num_layers=2, d_model=64, num_heads=2, mlp_dim=128)


def _config(base, family, operator, dims, **model):
  cfg = base if family == "ul2" else quiet(load_config(family, "tiny"))
  cfg.model.update(FULL | dict(dtype="float32") | model)
  if family == "t5":
    cfg.model.num_decoder_layers = 0
  cfg.method.name = "growth"
  cfg.method.growth.update(operator=operator, grow_at=(0.5,), ramp=0.2)
  for dim in dims:
    cfg.method.growth[dim] = (HALF[dim], FULL[dim])
  cfg.budget.value = 10
  return cfg


def _logits(run, state, stage, batch, progress):
  graphdef, shapes = run.steps.ctx.view(stage.view)
  model = nnx.merge(graphdef, view_params(state.params, shapes))
  select = stage.eval_select
  selection = None
  if select is not None:
    selection = run.steps.ctx.wrap_select(lambda k, b, p: select(p))(None, batch, progress)
  return np.asarray(run.steps.ctx.logits_fn(model, batch, selection, True))


def _grow(cfg, steps_before=2):
  run = train_lib.setup(cfg)
  stream = pipeline.build_stream(cfg.data, "train", cfg.data.batch_size, 0, train=True)
  small, grown = run.plan.stages
  state = run.init()
  for i in range(steps_before):
    state, _ = run.steps.train_step(small)(state, run.device_batch(stream.next_batch()), jax.random.key(i),
                                          jnp.float32(0.1))
  batch = run.device_batch(stream.next_batch())
  before = _logits(run, state, small, batch, 0.5)
  state = run.transition(state, 0, 1)
  after = _logits(run, state, grown, batch, 0.5)  # MSG: mask 0 at the growth
  return run, state, stream, before, after


def _unit(params, dim, index):
  """One unit's fan-in weights of the first layer: a head's q, an MLP unit's wi, a hidden
  dimension's embedding column."""
  if dim == "num_heads":
    return np.asarray(params["layers"]["q"][0, :, index])
  if dim == "mlp_dim":
    return np.asarray(params["layers"]["wi"][0, :, index])
  return np.asarray(params["embedding"][:, index])


@pytest.mark.parametrize("operator", ["msg", "bert2bert", "lemon"])
@pytest.mark.parametrize("dim", ["num_layers", "num_heads", "mlp_dim", "d_model"])
def test_growth_keeps_the_function_and_breaks_symmetry_where_promised(tiny_config, operator, dim):
  cfg = _config(tiny_config, "ul2", operator, [dim])
  if operator == "bert2bert":  # copies with their source's moments: nothing tells them apart
    cfg.method.growth.optimizer_state = "copy"
  run, state, stream, before, after = _grow(cfg)
  scale = np.max(np.abs(before))
  if operator == "bert2bert" and dim == "num_layers":  # depth by stacking: not function preserving
    assert np.max(np.abs(after - before)) > 1e-2 * scale
    return
  np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * scale)
  if dim == "num_layers":
    return
  source, copy = 0, HALF[dim]  # the first new unit copies unit 0 (bert2BERT, LEMON)
  grown = run.plan.stages[1]
  state, _ = run.steps.train_step(grown)(state, run.device_batch(stream.next_batch()), jax.random.key(9),
                                         jnp.float32(0.6))
  a, b = _unit(state.params, dim, source), _unit(state.params, dim, copy)
  if operator == "bert2bert":
    np.testing.assert_array_equal(a, b)  # Net2Net copies get identical gradients
  else:
    assert np.max(np.abs(a - b)) > 1e-6


@pytest.mark.parametrize("family,operator,dims", [
    ("bert", "bert2bert", ["d_model", "num_heads"]),   # tied embedding: the final norm takes the division
    ("bert", "lemon", ["d_model", "mlp_dim"]),
    ("bert", "msg", ["d_model", "num_heads", "mlp_dim", "num_layers"]),
    ("t5", "bert2bert", ["num_heads", "mlp_dim"]),
    ("t5", "lemon", ["num_layers"]),
    ("t5", "lemon", ["d_model", "mlp_dim"]),
])
def test_growth_of_several_dimensions_and_other_families(tiny_config, family, operator, dims):
  cfg = _config(tiny_config, family, operator, dims)
  _, _, _, before, after = _grow(cfg)
  np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.max(np.abs(before)))


def test_lemon_new_blocks_add_zero_and_then_learn(tiny_config):
  cfg = _config(tiny_config, "ul2", "lemon", ["num_layers"])
  run, state, stream, _, _ = _grow(cfg)
  o = np.asarray(state.params["layers"]["o"])
  new = [1, 3]  # consecutive 2 -> 4: each layer followed by its copy, [0, 0', 1, 1']
  assert np.all(o[new] == 0) and np.all(np.asarray(state.params["layers"]["wo"])[new] == 0)
  state, _ = run.steps.train_step(run.plan.stages[1])(state, run.device_batch(stream.next_batch()),
                                                      jax.random.key(3), jnp.float32(0.6))
  assert np.all(np.any(np.asarray(state.params["layers"]["o"])[new] != 0, axis=(1, 2, 3)))


def test_msg_mask_ramps_over_the_budget_and_runs_end_to_end(tiny_config, tmp_path):
  from raptr_jax.metrics import read_metrics
  cfg = _config(tiny_config, "ul2", "msg", ["num_heads", "num_layers"])
  cfg.log.every = 1
  train_lib.train(cfg, str(tmp_path))
  rows = [r for r in read_metrics(tmp_path) if "growth/mask" in r]
  masks = [r["growth/mask"] for r in rows]
  assert masks[:5] == [1.0] * 5  # before the growth nothing is masked
  # ramp 0.2 of 10 steps from 0.5; a row reports the mask at its (end-of-step) progress
  assert masks[5:] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])
  assert [r["subnetwork/layers"] for r in rows] == [2] * 5 + [4] * 5
  assert [r["subnetwork/num_heads"] for r in rows] == [2] * 5 + [4] * 5


@pytest.mark.parametrize("change,match", [
    (dict(num_heads=(2, 3, 4)), "one size per stage"),
    (dict(num_heads=(4, 2)), "not decreasing"),
    (dict(num_heads=(2, 3)), "must end at the model's size model.num_heads=4"),
    (dict(d_model=(100, 128), num_heads=()), "not a multiple of model.head_dim=32"),
    (dict(operator="bert2bert", d_model=(96, 128), num_heads=(3, 4)), "whole multiple"),
    (dict(grow_at=(0.5, 0.6), num_heads=(1, 2, 4), ramp=0.2), "one structure at a time"),
    (dict(grow_at=(1.5,)), r"in \(0, 1\)"),
    (dict(operator="net2net"), "operator must be one of"),
    (dict(num_heads=()), "at least one grown dimension"),
])
def test_bad_growth_settings_are_config_errors(tiny_config, change, match):
  cfg = _config(tiny_config, "ul2", "msg", ["num_heads"])
  cfg.model.d_model = 128  # = 4 heads of 32: attention width follows d_model
  cfg.method.growth.update(change)
  with pytest.raises(ValueError, match=match):
    validate(cfg)
