"""random-LTD: the wrapped layer against an explicit per-example computation on every family's
stack (masks, positions, relative buckets, cross-attention), gradients, MSLG arithmetic against
DeepSpeed's rule and the paper's worked layer-token savings, the LayerToken LR, config errors."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from raptr_jax import flops as flops_lib
from raptr_jax import run as run_lib
from raptr_jax import train as train_lib
from raptr_jax.config import validate
from raptr_jax.config import load_config as _load_config
from raptr_jax.metrics import read_metrics
from raptr_jax.methods import get_method
from raptr_jax.methods import random_ltd as ltd
from raptr_jax.models import ModelConfig, Selection, TokenSelection, build_model, layers
from raptr_jax.optim.schedules import learning_rate
from conftest import quiet, straight_and_resumed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(config: str, overrides=()):
  """``configs/x.py[:preset]`` relative to the repository, whatever the working directory."""
  return _load_config(os.path.join(ROOT, config), overrides)


CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=5, num_heads=4, head_dim=8, mlp_dim=48,
                  dtype="float32")
T5_CFG = dataclasses.replace(CFG, position="relative", relative_buckets=8, relative_max_distance=16)


def _packed_rows(rng, b, t):
  """Segment ids with two packed examples and trailing padding per row, per-segment
  positions, and a bidirectional prefix at the start of each segment."""
  seg, pos, pre = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  for i in range(b):
    a = int(rng.integers(3, t - 4))
    c = int(rng.integers(a + 2, t))
    seg[i, :a], seg[i, a:c] = 1, 2
    pos[i, :a], pos[i, a:c] = np.arange(a), np.arange(c - a)
    pre[i, :2], pre[i, a:a + 1] = 1, 1
  return jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(pre)


def _reference(stack, x, positions, seg, prefix, idx, wrapped, causal, table=None, context=None,
               ctx_seg=None, max_distance=16):
  """The stack layer by layer; a wrapped layer runs each example's kept tokens as their own
  sequence (original positions, segment ids, prefix flags and row indices), scattered back."""
  params, cfg = stack.stacked(), stack.cfg
  one = jnp.float32(1.0)
  b, t = x.shape[:2]
  rows = jnp.broadcast_to(jnp.arange(t), (b, t))

  def inputs(pos, s, pre, row, ctx, ctx_s):
    mask = layers.attention_mask(s, pre, causal)
    bias = None if table is None else layers.relative_bias(table, row, row, not causal, max_distance)
    cmask = None if ctx is None else layers.cross_attention_mask(s, ctx_s)
    return layers.AttentionInputs(pos, mask, bias, ctx, cmask, None, causal)

  for layer in range(stack.num_layers):
    p = {k: v[layer] for k, v in params.items()}
    if layer in wrapped:
      n = wrapped.index(layer)
      for i in range(b):
        keep = idx[n, i]
        sub = lambda a: None if a is None else a[i][keep][None]
        whole = lambda a: None if a is None else a[i][None]
        att = inputs(sub(positions), sub(seg), sub(prefix), jnp.asarray(keep)[None], whole(context),
                     whole(ctx_seg))
        out = layers.block(p, x[i][keep][None], att.positions, att.mask, one, cfg, attend=att)[0]
        x = x.at[i, keep].set(out)
    else:
      att = inputs(positions, seg, prefix, rows, context, ctx_seg)
      x = layers.block(p, x, att.positions, att.mask, one, cfg, attend=att)
  return x


def _kept(rng, n, b, t, r):
  return np.stack([np.stack([np.sort(rng.choice(t, r, replace=False)) for _ in range(b)])
                   for _ in range(n)]).astype(np.int32)


CASES = {  # family stack: (module attribute, causal, packed prefix, relative table, context)
    "decoder_ul2": ("decoder", "layers", True, True),
    "bert": ("bert", "layers", False, False),
    "t5_encoder": ("t5", "encoder_layers", False, False),
    "t5_decoder": ("t5", "decoder_layers", True, False),
}


def _setup(case, wrapped, r, seed=0):
  family, attr, causal, use_prefix = CASES[case]
  cfg = T5_CFG if family == "t5" else CFG
  model, _ = build_model(family, cfg, seed=0)
  stack = getattr(model, attr)
  rng = np.random.default_rng(seed)
  b, t = 3, 12
  x = jnp.asarray(rng.normal(size=(b, t, cfg.d_model)), jnp.float32)
  seg, pos, pre = _packed_rows(rng, b, t)
  kw = {}
  table = None
  if family == "t5":
    table = (model.decoder_relative if attr == "decoder_layers" else model.encoder_relative).value
    kw["relative_table"] = table
  context = ctx_seg = None
  if attr == "decoder_layers":
    context = jnp.asarray(rng.normal(size=(b, 9, cfg.d_model)), jnp.float32)
    ctx_seg = jnp.asarray(np.repeat([[1] * 5 + [2] * 3 + [0]], b, axis=0), jnp.int32)
    kw |= dict(context=context, context_segment_ids=ctx_seg)
  prefix = pre if use_prefix else None
  idx = _kept(rng, len(wrapped), b, t, r)
  sel = Selection(tokens=TokenSelection(jnp.asarray(idx), layers=tuple(wrapped)))
  got = lambda x, s=stack: s(x, pos, seg, prefix, sel, **kw)
  want = lambda x, s=stack: _reference(s, x, pos, seg, prefix, idx, list(wrapped), causal, table, context,
                                       ctx_seg)
  return stack, x, got, want, idx


@pytest.mark.parametrize("case", sorted(CASES))
def test_wrapped_layers_equal_the_layer_on_the_kept_subsequence(case):
  wrapped = (1, 3)  # two runs of wrapped layers with a full layer between
  stack, x, got, want, idx = _setup(case, wrapped, r=5)
  np.testing.assert_allclose(got(x), want(x), rtol=2e-5, atol=2e-5)


def test_dropped_positions_pass_through_unchanged():
  stack, x, _, _, _ = _setup("decoder_ul2", (0,), r=4)
  idx = _kept(np.random.default_rng(3), 1, x.shape[0], x.shape[1], 4)
  single = nnx.clone(stack)   # a one-layer stack: the wrapped layer alone
  for name in single.param_names:
    getattr(single, name).value = getattr(stack, name).value[:1]
  single.num_layers = 1
  seg, pos = jnp.ones(x.shape[:2], jnp.int32), jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
  out = np.asarray(single(x, pos, seg, None, Selection(tokens=TokenSelection(jnp.asarray(idx), layers=(0,)))))
  for i in range(x.shape[0]):
    dropped = np.setdiff1d(np.arange(x.shape[1]), idx[0, i])
    np.testing.assert_array_equal(out[i, dropped], np.asarray(x)[i, dropped])
    assert not np.allclose(out[i, idx[0, i]], np.asarray(x)[i, idx[0, i]])


@pytest.mark.parametrize("case", ["decoder_ul2", "t5_decoder"])
def test_gradients_equal_the_explicit_computation(case):
  stack, x, got, want, _ = _setup(case, (1, 2, 3), r=6, seed=1)
  cot = jax.random.normal(jax.random.key(0), x.shape)
  graphdef, params = nnx.split(stack)
  loss = lambda fn: lambda p, x: jnp.sum(fn(x, nnx.merge(graphdef, p)) * cot)
  g_got = jax.grad(loss(got), argnums=(0, 1))(params, x)
  g_want = jax.grad(loss(want), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert all(np.abs(np.asarray(g)).sum() > 0 for g in jax.tree.leaves(g_got[0]))


def test_draws_are_uniform_sorted_subsets_independent_per_layer():
  idx = np.asarray(ltd.draw_kept(jax.random.key(0), 3, 400, 16, 4))
  assert idx.shape == (3, 400, 4)
  assert np.all(np.diff(idx, axis=-1) > 0)                      # sorted, no repeats
  counts = np.bincount(idx.ravel(), minlength=16) / idx.size
  np.testing.assert_allclose(counts, 1 / 16, atol=0.01)          # uniform over positions
  assert not np.array_equal(idx[0], idx[1])                      # layers draw independently


# --- MSLG: DeepSpeed's rule and the paper's schedules ---

def test_kept_length_follows_deepspeeds_rule_and_never_rounds_to_zero():
  # The paper's GPT schedule: 128 -> 2048 by 16, full after 210B of 300B tokens.
  r = lambda f: ltd.kept_length(f, 128, 2048, 16, 0.7, 2048)
  assert r(0.0) == 128
  step = 0.7 / 120                           # 1.75B of 300B tokens per increment of 16
  assert r(step * 0.999) == 128 and r(step * 1.001) == 144
  assert r(0.6999) == 2032 and r(0.7) == 2048
  # DeepSpeed rounds min_value < seq_per_step down to 0; ours starts at the first multiple.
  assert ltd.kept_length(0.0, 8, 64, 16, 1.0, 64) == 16
  assert ltd.kept_length(0.0, 200, 512, 16, 0.9, 512) == 208
  stages = ltd.mslg_stages(128, 2048, 16, 0.7, 2048)
  assert len(stages) == 121 and stages[0] == (128, 0.0, pytest.approx(step))
  assert stages[-1] == (2048, 0.7, 1.0)
  for kept, start, _ in stages[:-1]:          # each stage holds the rule's value
    assert ltd.kept_length(start + 1e-9, 128, 2048, 16, 0.7, 2048) == kept


def _bert_large(seq_per_step=16, min_value=128, require=0.87):
  cfg = load_config("configs/bert.py", [])
  cfg.model.update(num_layers=24)
  cfg.data.update(seq_len=512)
  cfg.method.name = "random_ltd"
  cfg.method.random_ltd.update(min_value=min_value, seq_per_step=seq_per_step,
                               require_fraction=require, max_compiles=200)
  return cfg


@pytest.mark.parametrize("min_value,tokens_per_increment,total,saved", [
    (128, 38e9, 512 * 1024 * 2e6, 0.311),     # random-LTD-2, Appendix D.2: 31.1% saved
    (256, 6e9, 512 * 1024 * 0.2e6, 0.223),    # ablation, Appendix D.2: 22.3% saved
])
def test_bert_schedules_save_the_papers_layer_tokens(min_value, tokens_per_increment, total, saved):
  require = (512 - min_value) / 16 * tokens_per_increment / total
  cfg = _bert_large(min_value=min_value, require=require)
  model_cfg = ModelConfig(vocab_size=30522, d_model=64, num_layers=24, num_heads=4, head_dim=16,
                          mlp_dim=128)
  plan = run_lib.build_plan(cfg, model_cfg)
  counts = flops_lib.StageFlops("bert", model_cfg, 1, 512)
  edges = [0.0] + [s.end for s in plan.stages]
  used = sum((b - a) * counts.layer_tokens(s, a) for s, a, b in zip(plan.stages, edges, edges[1:]))
  assert 1 - used / counts.full_layer_tokens == pytest.approx(saved, abs=0.0015)


# --- LayerToken LR ---

def _gpt_cfg(**ltd_options):
  cfg = load_config("configs/gpt.py", ["model.num_layers=4", "method.name=random_ltd",
                                       "method.random_ltd.seq_per_step=32", "budget.value=100"])
  cfg.method.random_ltd.update(**ltd_options)
  return cfg


def test_layer_token_lr_follows_consumed_layer_tokens():
  cfg = _gpt_cfg(min_value=32, require_fraction=0.5)
  cfg.schedule.update(name="linear", warmup=0.1, final=0.0)
  run = run_lib.setup(cfg)
  plan, counts = run.plan, run.stage_flops
  # Host-side simulation of the run: consumed layer-tokens per step.
  lt, steps = [0.0], 0
  while steps < 100:
    stage = plan.stages[plan.stage_index(steps / 100)]
    lt.append(lt[-1] + counts.layer_tokens(stage, steps / 100))
    steps += 1
  full = counts.full_layer_tokens
  warm_lt, total_lt = 0.1 * 100 * full, lt[-1]
  lr_fn = run.steps.ctx.lr_fn
  for step in (3, 10, 25, 40, 60, 90):
    consumed = lt[step]
    if consumed < warm_lt:   # Eq. 1: warmup until the full model's warmup layer-tokens
      want = cfg.schedule.peak * consumed / warm_lt
    else:                    # Eq. 2: decay over the run's remaining layer-tokens
      want = cfg.schedule.peak * (1 - (consumed - warm_lt) / (total_lt - warm_lt))
    np.testing.assert_allclose(float(lr_fn(jnp.float32(step / 100))), want, rtol=2e-3, atol=1e-6)
  # Later in the run the LayerToken LR is higher than the step-based one (Figure 6).
  step_lr = learning_rate(jnp.float32(0.6), "linear", cfg.schedule.peak, 0.1, 0.0)
  assert float(lr_fn(jnp.float32(0.6))) > float(step_lr)


def test_layer_token_lr_reduces_to_the_run_schedule_without_dropping():
  cfg = _gpt_cfg(min_value=128)  # min = the sequence length: nothing is dropped
  run = run_lib.setup(cfg)
  base = run_lib.setup(load_config("configs/gpt.py", ["model.num_layers=4", "budget.value=100"]))
  for f in np.linspace(0, 1, 17):
    np.testing.assert_allclose(float(run.steps.ctx.lr_fn(jnp.float32(f))),
                               float(base.steps.ctx.lr_fn(jnp.float32(f))),
                               rtol=1e-6)


def test_layer_token_budget_takes_more_steps_than_the_baseline():
  common = ["model.num_layers=4", "budget.unit=layer_tokens", "budget.value=4e6"]
  base = run_lib.setup(load_config("configs/gpt.py", common))
  mine = run_lib.setup(load_config("configs/gpt.py", common + [
      "method.name=random_ltd", "method.random_ltd.seq_per_step=32"]))
  assert base.plan.total_steps() == -(-4e6 // base.stage_flops.full_layer_tokens)
  assert mine.plan.total_steps() > base.plan.total_steps()


def test_stages_compile_once_per_kept_length():
  cfg = _gpt_cfg()
  stages = get_method("random_ltd", cfg).stages(cfg, cfg.model)
  assert [s.token_drop["layers"][0] if s.token_drop else 128 for s in stages] == [32, 64, 96, 128]
  assert len({s.shape for s in stages}) == len(stages)
  assert stages[-1].shape == ("full",)   # shares the baseline's compile and RST entry


@pytest.mark.parametrize("change,message", [
    (dict(min_value=100, max_value=64), "min_value"),
    (dict(seq_per_step=0), "seq_per_step must be >= 1"),
    (dict(max_value=256), "exceeds data.seq_len=128"),
    (dict(layers="1,7"), "layer 7 is outside"),
    (dict(layers="a"), "layer ids like"),
    (dict(min_value=1, seq_per_step=1, max_compiles=8), "use seq_per_step="),
    (dict(require_fraction=1.5), "(0, 1]"),
    (dict(require_steps=50), None),
    (dict(schedule="cosine"), "schedule must be one of"),
    (dict(lr="iterations"), "lr must be one of"),
])
def test_bad_config_is_rejected_with_the_key(change, message):
  cfg = _gpt_cfg(**change)
  if message is None:
    validate(cfg)
    return
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validate(cfg)


def test_require_steps_needs_a_step_budget_and_rst_needs_budget_lr():
  cfg = _gpt_cfg(require_steps=50)
  cfg.budget.unit = "tokens"
  with pytest.raises(ValueError, match="require_fraction"):
    validate(cfg)
  cfg = _gpt_cfg()
  cfg.budget.unit = "rst_seconds"
  with pytest.raises(ValueError, match="lr='budget'"):
    validate(cfg)
  cfg = load_config("configs/gpt.py", ["method.name=random_ltd"])   # 4 layers: fine; 2: none
  cfg.model.num_layers = 2
  with pytest.raises(ValueError, match="method.random_ltd.layers="):
    validate(cfg)


@pytest.mark.parametrize("config,stages,first,end", [
    ("configs/gpt.py:gpt3_350m_random_ltd", 121, 128, 0.7),    # 128 -> 2048 by 16 until 210B/300B
    ("configs/bert.py:random_ltd_large", 25, 128, 0.8698),      # 128 -> 512 by 16 until 912B/1049B
    ("configs/gpt.py:tiny_random_ltd", 4, 16, 0.7),
])
def test_paper_presets_build_their_schedules(config, stages, first, end):
  cfg = load_config(config, [])
  plan = get_method(cfg.method.name, cfg).stages(cfg, cfg.model)
  assert len(plan) == stages
  assert plan[0].token_drop["layers"][0] == first
  assert plan[-2].end == pytest.approx(end, abs=1e-4) and plan[-1].shape == ("full",)
  assert plan[0].token_drop["layers"][1] == cfg.model.num_layers - 2


@pytest.mark.parametrize("stop", [3, 6])   # inside the r=32 stage; at the switch to full length
def test_resume_matches_an_uninterrupted_run(tiny_config, tmp_path, stop):
  cfg = tiny_config   # UL2 prefix-LM, packed rows, seq 64
  cfg.method.name = "random_ltd"
  cfg.method.random_ltd.update(layers="1", min_value=16, seq_per_step=16, require_fraction=0.5)
  cfg.budget.value, cfg.checkpoint.every, cfg.log.every, cfg.eval.every = 12, 1, 1, 0.5
  straight = straight_and_resumed(cfg, tmp_path, stop, ("train/loss", "grad_norm", "eval/loss", "lr",
                                                         "layer_tokens", "layer_tokens/saved"))
  assert [r.get("random_ltd/kept") for r in straight][1:] == [16] * 2 + [32] * 2 + [48] * 2 + [64] * 6


# --- composition ---

def _composed(name, *overrides):
  return load_config("configs/gpt.py:tiny_random_ltd", [f"method.name={name}", "budget.value=8",
                                                         "log.every=1", "eval.every=0.5", *overrides])


def test_composes_with_width_raptr_and_pld_in_one_step(tmp_path):
  cfg = quiet(_composed("random_ltd+raptr", "method.raptr.axis=heads", "method.raptr.schedule=1-2"))
  stages = get_method(cfg.method.name, cfg).stages(cfg, cfg.model)
  # RaPTr's 2 stages (ends 0.5, 1) x random-LTD's kept lengths 16, 32, 48 then full (0.7).
  assert [s.end for s in stages] == pytest.approx([0.2333, 0.4667, 0.5, 0.7, 1.0], abs=1e-4)
  assert [(s.width or {}).get("num_heads", 2) for s in stages] == [1, 1, 1, 2, 2]
  assert [s.token_drop["layers"][0] if s.token_drop else 64 for s in stages] == [16, 32, 48, 48, 64]
  out = train_lib.train(cfg, str(tmp_path / "raptr"))
  rows = read_metrics(tmp_path / "raptr")[1:]
  assert [r["random_ltd/kept"] for r in rows] == [16, 16, 32, 32, 48, 48, 64, 64]
  assert [r["subnetwork/num_heads"] for r in rows] == [1] * 4 + [2] * 4
  assert np.isfinite(out["train/loss"])
  # The composite's FLOPs see both: fewer heads and fewer tokens than either alone.
  run = run_lib.setup(cfg)
  alone = run_lib.setup(load_config("configs/gpt.py:tiny_random_ltd", ["budget.value=8"]))
  assert run.stage_flops(run.plan.stages[0], 0.0) < alone.stage_flops(alone.plan.stages[0], 0.0)

  cfg = quiet(_composed("pld+random_ltd"))
  train_lib.train(cfg, str(tmp_path / "pld"))
  rows = read_metrics(tmp_path / "pld")[1:]
  assert [r["random_ltd/kept"] for r in rows][:2] == [16, 16] and "subnetwork/avg_layers" in rows[0]


def test_compositions_that_move_layers_are_refused():
  with pytest.raises(ValueError, match="runs 2 of 4 layers"):
    _composed("random_ltd+raptr", "method.raptr.schedule=2-4")
  with pytest.raises(ValueError, match="random_ltd does not compose with stacking"):
    _composed("random_ltd+stacking")
  with pytest.raises(ValueError, match="both composed methods select tokens"):
    from raptr_jax.methods.compose import merge_selections
    sel = Selection(tokens=TokenSelection(jnp.zeros((1, 1, 1), jnp.int32)))
    merge_selections(sel, sel)
