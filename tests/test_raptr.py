"""RaPTr: schedule arithmetic against the paper's worked examples, selections, scaling, plan."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from raptr_jax import train as train_lib
from raptr_jax.methods import raptr
from raptr_jax.metrics import read_metrics
from raptr_jax.models import ModelConfig, build_model, layers
from raptr_jax.models.decoder import loss_fn


def test_appendix_e_proportional_and_equal_examples():
  lengths = raptr.stage_lengths([12, 16, 20, 24], 400_000, "proportional")
  assert lengths == pytest.approx([40_000, 80_000, 120_000, 160_000])
  assert list(np.cumsum(lengths)[:3]) == pytest.approx([40_000, 120_000, 240_000])
  assert raptr.average_length([12, 16, 20, 24], lengths) == pytest.approx(20)
  assert raptr.average_length([12, 16, 20, 24], raptr.stage_lengths([12, 16, 20, 24], 400_000)) == pytest.approx(18)


def test_appendix_e_target_average_example():
  """6-12-18-24 with target average 20: Proportional (average 18) minus x = 22.2k per stage."""
  lengths = raptr.stage_lengths([6, 12, 18, 24], 400_000, "equal", target_average=20)
  x = 40_000 - lengths[0]
  assert x == pytest.approx(22_222.2, abs=1) and round(x / 1000) == 22
  assert lengths == pytest.approx([40_000 - x, 80_000 - x, 120_000 - x, 160_000 + 3 * x])
  assert raptr.average_length([6, 12, 18, 24], lengths) == pytest.approx(20)


def test_initial_full_model_phase_shifts_boundaries_keeping_the_average():
  """D.5: 30k initial full-model steps shift 40k/120k/240k by 30k; the average stays 20."""
  stages = raptr.build_schedule(24, [12, 16, 20, 24], total=400_000, mode="proportional", initial_full=30_000)
  ends = np.cumsum([s.length for s in stages])
  assert list(ends) == pytest.approx([30_000, 70_000, 150_000, 270_000, 400_000])
  assert raptr.relative_flops(stages, 24) == pytest.approx(20 / 24)
  assert stages[0].p == 1.0 and stages[-1].p == 1.0


def test_recommended_schedule_and_probabilities():
  stages = raptr.build_schedule(12)
  assert [s.average_layers(12) for s in stages] == pytest.approx([6, 8, 10, 12])
  assert [s.fixed for s in stages] == [(0, 11)] * 4
  assert [s.p for s in stages] == pytest.approx([0.4, 0.6, 0.8, 1.0])  # (l - |I|) / (L - |I|)
  assert raptr.relative_flops(stages, 12) == pytest.approx(0.75)


def _h_sqrt_reference(zeta):
  """Appendix J, 1-based: for kept j, sqrt(j' - j) with j' the next kept index (L + 1 at the end)."""
  L = len(zeta)
  out = [0.0] * L
  for j in range(1, L + 1):
    if zeta[j - 1]:
      nxt = next((i for i in range(j + 1, L + 1) if zeta[i - 1]), L + 1)
      out[j - 1] = (nxt - j) ** 0.5
  return out


def test_h_sqrt_matches_appendix_j_and_keeps_the_norm():
  rng = np.random.default_rng(0)
  for _ in range(20):
    zeta = rng.random(12) < 0.5
    zeta[0] = True
    kept = np.flatnonzero(zeta)
    got = np.asarray(raptr.sqrt_scales(kept, 12))
    want = np.asarray(_h_sqrt_reference(zeta))[kept]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Condition (a): squared scales up to (and including) kept layer j sum to the next depth.
    np.testing.assert_allclose(np.cumsum(got ** 2), np.concatenate([kept[1:], [12]]), rtol=1e-6)


def test_fixed_count_selection_keeps_fixed_layers_and_samples_the_rest_uniformly():
  stage = raptr.RaptrStage(p=0.4, fixed=(0, 11), length=1.0)
  select = jax.jit(raptr.make_select(stage, 12))
  counts = np.zeros(12)
  for i in range(400):
    sel = select(jax.random.key(i), None, 0.0).layers
    idx = np.asarray(sel.indices)
    assert len(idx) == 6 and {0, 11} <= set(idx.tolist()) and np.all(np.diff(idx) > 0)
    np.testing.assert_allclose(sel.scales, raptr.sqrt_scales(idx, 12))
    counts[idx] += 1
  assert counts[0] == counts[11] == 400
  np.testing.assert_allclose(counts[1:11] / 400, 0.4, atol=0.08)


def test_bernoulli_selection_is_definition_2_2():
  stage = raptr.RaptrStage(p=0.5, fixed=(0,), length=1.0)
  select = jax.jit(raptr.make_select(stage, 8, scaling="sqrt", selection="bernoulli"))
  sizes = []
  for i in range(300):
    scales = np.asarray(select(jax.random.key(i), None, 0.0).layers.scales)
    kept = np.flatnonzero(scales > 0)
    assert 0 in kept
    np.testing.assert_allclose(scales[kept], raptr.sqrt_scales(kept, 8), rtol=1e-6)
    sizes.append(len(kept))
  assert np.mean(sizes) == pytest.approx(1 + 0.5 * 7, abs=0.3) and np.std(sizes) > 0.5


def test_grouped_selection_draws_consecutive_groups():
  stage = raptr.RaptrStage(p=0.5, fixed=(), length=1.0)
  sel = raptr.make_select(stage, 8, selection="grouped", group=2)(jax.random.key(3), None, 0.0).layers
  idx = np.asarray(sel.indices)
  assert len(idx) == 4 and all(idx[i] % 2 == 0 and idx[i + 1] == idx[i] + 1 for i in (0, 2))


def test_selected_subnetwork_loss_equals_explicit_forward_with_sqrt_scales():
  cfg = ModelConfig(vocab_size=128, d_model=32, num_layers=6, num_heads=4, head_dim=8, mlp_dim=64, dtype="float32")
  model, _ = build_model("decoder", cfg, seed=0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 128, size=(2, 17)).astype(np.int32)
  batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]), "weights": jnp.ones((2, 16)),
           "prefix": jnp.zeros((2, 16), jnp.int32), "segment_ids": jnp.ones((2, 16), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(16), (2, 16))}
  sel = raptr.make_select(raptr.RaptrStage(0.5, (0, 5), 1.0), 6)(jax.random.key(1), batch, 0.0)
  got = loss_fn(model, batch, sel)[0]
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  x = jnp.take(params["embedding"], batch["inputs"], axis=0)
  idx, scales = np.asarray(sel.layers.indices), np.asarray(sel.layers.scales)
  for i, s in zip(idx, scales):
    x = layers.block({k: v[i] for k, v in params["layers"].items()}, x, batch["positions"], None, jnp.float32(s), cfg)
  logits = layers.rms_norm(x, params["final_norm"], cfg.norm_eps) @ params["head"]
  want = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0])
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(avg_lengths=[8, 6, 10, 12]), "not monotone"),
    (dict(avg_lengths=[6, 8, 14]), "outside"),
    (dict(avg_lengths=[1, 8, 12]), "outside"),
])
def test_bad_schedules_are_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    raptr.build_schedule(12, **kwargs)


def test_bad_explicit_stages_and_notation_are_rejected():
  with pytest.raises(ValueError, match="sum to"):
    raptr.check_stages([raptr.RaptrStage(0.5, (0,), 0.5), raptr.RaptrStage(1.0, (0,), 0.4)], 12, 1.0)
  with pytest.raises(ValueError, match="must not shrink"):
    raptr.check_stages([raptr.RaptrStage(0.5, (0, 11), 0.5), raptr.RaptrStage(1.0, (0,), 0.5)], 12, 1.0)
  with pytest.raises(ValueError, match="notation"):
    raptr.parse_notation("6,8,10")


def test_raptr_run_has_one_shape_per_stage_logs_usage_and_uses_the_paper_lr(tiny_config, tmp_path):
  cfg = tiny_config
  cfg.model.num_layers = 6
  cfg.budget.value, cfg.log.every, cfg.schedule.warmup = 24, 1, 0.1
  cfg.method.name = "raptr"
  cfg.method.raptr.update(schedule="3-4-5-6", lr="paper")
  run = train_lib.setup(cfg)
  assert [s.active_layers for s in run.plan.stages] == [3, 4, 5, None]
  assert [s.end for s in run.plan.stages] == pytest.approx([0.25, 0.5, 0.75, 1.0])
  assert len({s.shape for s in run.plan.stages}) == 4  # one compiled step per stage
  train_lib.train(cfg, str(tmp_path))
  rows = [r for r in read_metrics(tmp_path) if "lr" in r]
  assert [r["subnetwork/layers"] for r in rows[::6]] == [3, 4, 5, 6]
  assert rows[-1]["subnetwork/avg_layers"] == pytest.approx(4.5)
  assert 0.75 * 0.6 < rows[-1]["flops/relative"] < 0.95
  peak = cfg.schedule.peak
  mid = [r["lr"] for r in rows if 0.1 < r["progress"] - 1 / 24 < 0.75]  # lr is set at the step's start
  np.testing.assert_allclose(mid, peak, rtol=1e-6)  # constant across the subnetwork stages
  assert rows[-1]["lr"] < 0.2 * peak  # decayed in the final full-model stage


def test_initial_full_phase_runs_with_shifted_boundaries(tiny_config, tmp_path):
  """Appendix E / D.5: a full-model phase first; every boundary shifts by its length and the
  final full stage is shortened by as much."""
  from raptr_jax import run as run_lib
  cfg = tiny_config
  cfg.model.num_layers = 12
  cfg.method.name = "raptr"
  cfg.method.raptr.update(schedule="6-8-10-12", initial_full=0.1)
  plan = run_lib.build_plan(cfg)
  assert [s.end for s in plan.stages] == pytest.approx([0.1, 0.35, 0.6, 0.85, 1.0])
  assert plan.stages[0].select is None and plan.stages[-1].select is None
  assert [s.active_layers for s in plan.stages[1:4]] == [6, 8, 10]
  cfg.model.num_layers, cfg.budget.value = 4, 10
  cfg.method.raptr.schedule = ""
  out = train_lib.train(cfg, str(tmp_path))
  assert out["step"] == 10


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
def test_the_default_schedule_is_valid_at_every_small_depth(tiny_config, depth):
  from raptr_jax import run as run_lib
  from raptr_jax.config import validate
  cfg = tiny_config
  cfg.model.num_layers = depth
  cfg.method.name = "raptr"
  validate(cfg)
  plan = run_lib.build_plan(cfg)
  assert plan.stages[-1].select is None and len(plan.stages) == 4
