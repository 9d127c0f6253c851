"""Layer stacking (No Train No Gain Alg. 1, gradual and middle stacking): growth maps, frozen
layers before growth, optimizer-state policies, resume across a growth, the RST clock, FLOPs of a
depth-k step, T5's two stacks, presets and config errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raptr_jax import rst
from raptr_jax import train as train_lib
from raptr_jax.checkpoint import CheckpointError
from raptr_jax.config import validate
from raptr_jax.metrics import read_metrics
from raptr_jax.methods.growth_ops import depth_order
from raptr_jax.workdir import ConfigChanged
from conftest import load_config, quiet, straight_and_resumed


@pytest.mark.parametrize("mode,old,new,order,new_units", [
    ("stack", 2, 4, [0, 1, 0, 1, 4, 5], [0, 0, 1, 1, 0, 0]),
    ("stack", 4, 6, [0, 1, 2, 3, 0, 1], [0, 0, 0, 0, 1, 1]),
    ("interleave", 2, 4, [0, 0, 1, 1, 4, 5], [0, 1, 0, 1, 0, 0]),
    ("top", 4, 6, [0, 1, 2, 3, 2, 3], [0, 0, 0, 0, 1, 1]),
    ("middle", 4, 6, [0, 1, 2, 1, 2, 3], [0, 0, 0, 1, 1, 0]),
    ("consecutive", 4, 6, [0, 1, 2, 2, 3, 3], [0, 0, 0, 1, 0, 1]),
])
def test_depth_growth_orders(mode, old, new, order, new_units):
  m = depth_order(mode, old, new, 6)
  assert m.order.tolist() == order and m.new.astype(int).tolist() == new_units


def test_no_train_no_gain_presets_grow_when_the_paper_did():
  """BERT 4 -> 8 -> 16 and T5 3 -> 6 -> 12 (both stacks) at 3 h and 7.2 h of 24 h RST."""
  from raptr_jax import run as run_lib
  bert = load_config("bert", "crammed_stacking")
  plan = run_lib.build_plan(bert)
  assert plan.unit == "rst_seconds" and plan.budget == 24 * 3600
  assert [s.view for s in plan.stages] == [{"num_layers": 4}, {"num_layers": 8}, None]
  assert [s.end * 24 for s in plan.stages] == pytest.approx([3.0, 7.2, 24.0])
  t5 = load_config("t5", "base_stacking")
  plan = run_lib.build_plan(t5)
  assert [s.view for s in plan.stages] == [{"num_layers": 3, "num_decoder_layers": 3},
                                           {"num_layers": 6, "num_decoder_layers": 6}, None]
  assert [s.end for s in plan.stages] == pytest.approx([0.125, 0.3, 1.0])


def _layer_leaves(tree, key="layers"):
  """{path: leaf} of the stacked-layer leaves of a params or optimizer-state tree."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat
          if any(getattr(k, "key", None) == key for k in p) and np.ndim(v) > 0}


def _stacking_run(tiny_config, policy="fresh", mode="stack"):
  cfg = tiny_config
  cfg.model.num_layers = 4
  cfg.method.name = "stacking"
  cfg.method.stacking.update(depths=(2, 4), grow_at=(0.5,), mode=mode, optimizer_state=policy)
  cfg.budget.value = 6
  return train_lib.setup(cfg)


def _steps(run, state, stage, count, start=0):
  from raptr_jax.data import pipeline
  stream = pipeline.build_stream(run.cfg.data, "train", run.cfg.data.batch_size, 0, train=True)
  step = run.steps.train_step(stage)
  for i in range(count):
    state, _ = step(state, run.device_batch(stream.next_batch()), jax.random.key(start + i), jnp.float32(0.1))
  return state


@pytest.mark.parametrize("policy", ["fresh", "copy", "reset"])
def test_layers_not_yet_grown_stay_at_init_and_growth_follows_the_state_policy(tiny_config, policy):
  run = _stacking_run(tiny_config, policy)
  init = run.init()
  init_params, init_opt = _layer_leaves(init.params), _layer_leaves(init.opt_state)
  small, grown = run.plan.stages
  state = _steps(run, run.init(), small, 3)
  params, opt = _layer_leaves(state.params), _layer_leaves(state.opt_state)
  assert params and opt
  for path, leaf in params.items():  # layers 2, 3 bit-identical (weight decay 0.1 is on)
    np.testing.assert_array_equal(leaf[2:], init_params[path][2:], err_msg=path)
    assert not np.array_equal(leaf[:2], init_params[path][:2]) or "norm" in path, path
  for path, leaf in opt.items():
    np.testing.assert_array_equal(leaf[2:], init_opt[path][2:], err_msg=path)
  count = [np.asarray(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) == 0]
  after = run.transition(state, 0, 1)
  new_params, new_opt = _layer_leaves(after.params), _layer_leaves(after.opt_state)
  for path, leaf in new_params.items():  # stack: layer 2 + i copies layer i
    np.testing.assert_array_equal(leaf[2:], params[path][:2], err_msg=path)
    np.testing.assert_array_equal(leaf[:2], params[path][:2], err_msg=path)
  for path, leaf in new_opt.items():
    if policy == "reset":
      np.testing.assert_array_equal(leaf, np.zeros_like(leaf), err_msg=path)
    else:
      np.testing.assert_array_equal(leaf[:2], opt[path][:2], err_msg=path)
      expect = opt[path][:2] if policy == "copy" else np.zeros_like(leaf[2:])
      np.testing.assert_array_equal(leaf[2:], expect, err_msg=path)
  counts_after = [np.asarray(x) for x in jax.tree.leaves(after.opt_state) if np.ndim(x) == 0]
  assert [int(c) for c in counts_after] == ([0] * len(count) if policy == "reset" else [int(c) for c in count])
  # After growth every layer trains.
  trained = _layer_leaves(_steps(run, after, grown, 1, start=10).params)
  for path, leaf in trained.items():
    if "norm" not in path:
      assert not np.array_equal(leaf[2:], new_params[path][2:]), path


@pytest.mark.parametrize("mode", ["interleave", "middle", "top"])
def test_other_copy_modes_place_the_copies(tiny_config, mode):
  run = _stacking_run(tiny_config, "copy", mode)
  state = _steps(run, run.init(), run.plan.stages[0], 2)
  before = _layer_leaves(state.params)
  after = _layer_leaves(run.transition(state, 0, 1).params)
  order = depth_order(mode, 2, 4, 4).order
  for path, leaf in after.items():
    np.testing.assert_array_equal(leaf, before[path][order], err_msg=path)


@pytest.mark.parametrize("stop", [5, 6, 7])
def test_resume_before_at_and_after_a_growth_matches_an_uninterrupted_run(tiny_config, tmp_path, stop):
  cfg = tiny_config
  cfg.method.name = "stacking"
  cfg.method.stacking.update(depths=(1, 2), grow_at=(0.5,))  # tiny: 2 layers, growth after step 6
  cfg.budget.value, cfg.checkpoint.every, cfg.log.every, cfg.eval.every = 12, 1, 1, 0.5
  straight = straight_and_resumed(cfg, tmp_path, stop, ("train/loss", "grad_norm", "eval/loss",
                                                         "subnetwork/layers"))
  assert [r.get("stage") for r in straight][1:] == [0] * 6 + [1] * 6


def test_resuming_under_a_changed_growth_schedule_is_refused(tiny_config, tmp_path):
  cfg = tiny_config
  cfg.method.name = "stacking"
  cfg.method.stacking.update(depths=(1, 2), grow_at=(0.5,))
  cfg.budget.value, cfg.checkpoint.every, cfg.train.stop_at_step = 8, 2, 2
  train_lib.train(cfg, str(tmp_path))
  cfg.method.stacking.grow_at = (0.25,)
  with pytest.raises(ConfigChanged, match=r"method.stacking.grow_at: \[0.5\] there, \[0.25\] here"):
    train_lib.train(cfg, str(tmp_path))
  cfg.train.allow_config_changes = True  # the checkpoint still refuses a state of another plan
  with pytest.raises(CheckpointError, match="grow_at"):
    train_lib.train(cfg, str(tmp_path))


def test_growth_points_are_read_on_the_rst_clock(tiny_config, tmp_path):
  """Depth-1 steps cost 0.5 s and full steps 1 s of RST: growth at 30% of 10 s is after 6 steps."""
  cfg = tiny_config
  cfg.method.name = "stacking"
  cfg.method.stacking.update(depths=(1, 2), grow_at=(0.3,))
  table = str(tmp_path / "table.json")
  cfg.budget.update(unit="rst_seconds", value=10.0, rst_table=table)
  cfg.log.every = 1
  rst.calibrate(cfg, steps=1, warmup=0, verbose=False)
  with open(table) as f:
    data = json.load(f)
  for entry in data["entries"].values():
    if entry["kind"] == "train":
      entry["seconds"] = 0.5 if "stacking" in entry["shape"] else 1.0
  with open(table, "w") as f:
    json.dump(data, f)
  train_lib.train(cfg, str(tmp_path / "run"))
  rows = [r for r in read_metrics(tmp_path / "run") if "stage" in r]
  assert [r["stage"] for r in rows] == [0] * 6 + [1] * 7
  assert [r["subnetwork/layers"] for r in rows] == [1] * 6 + [2] * 7
  assert rows[5]["rst_s"] == pytest.approx(3.0) and rows[-1]["rst_s"] == pytest.approx(10.0)


def test_a_depth_k_step_costs_a_depth_k_model(tiny_config):
  """XLA's count of the stacking step at depth 2 of 4 matches the baseline step of a 2-layer
  model (the layers not yet grown cost nothing), and the analytic FLOPs follow."""
  def step_flops(cfg, stage_index):
    run = train_lib.setup(cfg)
    stage = run.plan.stages[stage_index]
    batch = {k: jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), jnp.float32 if k == "weights" else jnp.int32)
             for k in run.steps.ctx.batch_fields}
    lowered = run.steps.train_step(stage).lower(run.abstract_state, batch, jax.random.key(0), jnp.float32(0))
    analysis = lowered.compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return analysis["flops"], run.stage_flops(stage, 0.0)

  cfg = tiny_config
  cfg.model.update(num_layers=4, scan_layers=False)
  base = cfg.copy_and_resolve_references()
  base.model.num_layers = 2
  cfg.method.name = "stacking"
  cfg.method.stacking.update(depths=(2, 4), grow_at=(0.5,))
  stacked_xla, stacked_analytic = step_flops(cfg, 0)
  small_xla, small_analytic = step_flops(base, 0)
  full_xla, full_analytic = step_flops(cfg, 1)
  assert stacked_analytic == small_analytic
  assert stacked_xla == pytest.approx(small_xla, rel=0.03)
  # the embedding and head of this tiny model are a large share: compare ratios, not halves
  assert stacked_xla / full_xla == pytest.approx(stacked_analytic / full_analytic, rel=0.05)
  assert stacked_xla < 0.9 * full_xla


def test_t5_grows_encoder_and_decoder_together(tmp_path):
  cfg = quiet(load_config("t5", "tiny"))
  cfg.method.name = "stacking"
  cfg.method.stacking.update(depths=(1, 2), grow_at=(0.5,))
  run = train_lib.setup(cfg)
  assert run.plan.stages[0].view == {"num_layers": 1, "num_decoder_layers": 1}
  state = _steps(run, run.init(), run.plan.stages[0], 2)
  befores = {key: _layer_leaves(state.params, key) for key in ("encoder_layers", "decoder_layers")}
  after = run.transition(state, 0, 1)  # donates state
  for key in ("encoder_layers", "decoder_layers"):
    before, grown = befores[key], _layer_leaves(after.params, key)
    assert before
    for path, leaf in grown.items():
      np.testing.assert_array_equal(leaf[1], before[path][0], err_msg=path)
  out = train_lib.train(cfg, str(tmp_path))
  assert np.isfinite(out["eval/loss"])


@pytest.mark.parametrize("change,match", [
    (dict(depths=(2, 1, 4)), r"positive and increasing, e.g. method.stacking.depths=\(1, 2, 4\)"),
    (dict(depths=(1, 2)), "must end at the model's depth model.num_layers=4"),
    (dict(depths=(1, 2, 4), grow_at=(0.5,)), "one budget fraction per growth"),
    (dict(depths=(1, 2, 4), grow_at=(0.5, 1.2)), r"in \(0, 1\)"),
    (dict(depths=(1, 2, 4), grow_at=(0.5, 0.3)), "increasing budget fractions"),
    (dict(depths=(3, 4), grow_at=(0.5,), mode="interleave"), "not a multiple of 3"),
    (dict(depths=(1, 3, 4), grow_at=(0.3, 0.6), mode="top"), "cannot grow 1 -> 3"),
    (dict(mode="sideways"), "mode must be one of"),
    (dict(optimizer_state="keep"), "optimizer_state must be one of"),
])
def test_bad_stacking_settings_are_config_errors(tiny_config, change, match):
  cfg = tiny_config
  cfg.model.num_layers = 4
  cfg.method.name = "stacking"
  cfg.method.stacking.update(change)
  with pytest.raises(ValueError, match=match):
    validate(cfg)


def test_stacking_config_errors_beyond_the_schedule(tiny_config):
  cfg = tiny_config
  cfg.method.name = "stacking"
  cfg.model.num_layers = 6
  with pytest.raises(ValueError, match=r"divisible by 4.*depths=\(3, 6\)"):
    validate(cfg)
  cfg.model.num_layers = 4
  cfg.optimizer.name = "adafactor"
  with pytest.raises(ValueError, match="optimizer_state='reset'"):
    validate(cfg)
  cfg.optimizer.name = "adamw"
  cfg.method.name = "stacking+pld"
  with pytest.raises(ValueError, match="does not compose with pld"):
    validate(cfg)
