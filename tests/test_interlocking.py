"""Interlocking backprop: routed gradients against an explicit reference, the end-to-end and
evaluation equivalences, per-component clipping and LR, config errors."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from raptr_jax import config as config_lib
from raptr_jax import run as run_lib
from raptr_jax import train as train_lib
from raptr_jax.data import pipeline
from raptr_jax.methods import interlocking, interlocking_pipeline
from raptr_jax.metrics import read_metrics
from raptr_jax.models import aux_heads as aux_lib
from raptr_jax.models import embeddings, get_family
from conftest import ROOT, load_config, quiet


def _config(family="decoder", K=4, n=2, sizes=(), **options):
  cfg = quiet(load_config("bert" if family == "bert" else "ul2", "tiny"))
  cfg.model.update(num_layers=4, dtype="float32")
  cfg.method.name = "interlocking"
  cfg.method.interlocking.update(components=K, n=n, sizes=sizes, grad_clip=0.0, **options)
  return cfg


def _setup(cfg):
  run = run_lib.setup(cfg)
  params = run.init().params
  # Every leaf moved by its own noise (norms away from ones, heads away from init): every path matters.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  stream = pipeline.build_stream(cfg.data, "train", cfg.data.batch_size, cfg.seed, train=True)
  batch = run.device_batch(stream.next_batch())
  return run, params, batch


@pytest.fixture(scope="module")
def pairwise():
  """K = 4 components of one layer each, 2-wise, heads of 2 blocks: (run, params, batch, routed)."""
  run, params, batch = _setup(_config(K=4, n=2))
  return run, params, batch, _routed(run, params, batch)


def _routed(run, params, batch, modes=None):
  """The method's routed (loss, aux), grads; with ``modes``, one per n in one compile."""
  ctx = run.steps.ctx
  model_of = lambda p: nnx.merge(ctx.graphdef, p)
  if modes is None:
    return jax.jit(run.method.value_and_grad(ctx, model_of))(params, batch)
  fns = []
  for n in modes:
    cfg = run.cfg.copy_and_resolve_references()
    cfg.method.interlocking.n = n
    fns.append(interlocking.Interlocking(cfg).value_and_grad(ctx, model_of))
  return jax.jit(lambda p, b: [f(p, b) for f in fns])(params, batch)


def _reference_losses(run, params, batch, split):
  """Each loss as a function of explicitly separate parameter roles (the embedding's input use,
  each component's layers, each head, the output matrix of each head): the K losses and the
  gradient of each w.r.t. every role (``jax.jacrev``: each loss differentiated on its own)."""
  mcfg = run.model_cfg
  family = get_family(run.cfg.model.family)
  model = nnx.merge(run.steps.ctx.graphdef, params)
  positions, segments, prefix = family.layer_inputs(batch, True)
  K = split.count
  roles = {"embed_in": {k: params[k] for k in embeddings.EMBEDDING_PARAMS if k in params},
           "components": [jax.tree.map(lambda p: p[a:b], params["layers"]) for a, b in split.bounds],
           "towers": [aux_lib.tower(params["aux_heads"], k, mcfg.aux_head_layers) for k in range(K - 1)],
           "final_norm": params["final_norm"],
           "w": [embeddings.output_matrix(params, mcfg)] * K}

  def losses(r):
    out, h = [], embeddings.embed_tokens(mcfg, r["embed_in"], batch["inputs"], positions)
    for t, theta in enumerate(r["components"]):
      h = model.layers.run_layers(theta, h, positions, segments, prefix)
      if t == K - 1:
        out.append(family.head_loss(mcfg, h, r["final_norm"], r["w"][t], batch)[0])
      else:
        tower = r["towers"][t]
        y = aux_lib.head_hidden(getattr(model.aux_heads, "layers", None), tower, h, positions, segments, prefix)
        out.append(family.head_loss(mcfg, y, tower["norm"], r["w"][t], batch)[0])
    return jnp.stack(out)

  values, jac = jax.jit(lambda r: (losses(r), jax.jacrev(losses)(r)))(roles)
  return values, [jax.tree.map(lambda g, t=t: g[t], jac) for t in range(K)]


def _expected(params, mcfg, split, grads, shared=True):
  """The routed gradient: a parameter's gradient sums the gradients, w.r.t. its roles, of the
  losses the routing sends to it (``grads[t]``: loss t's gradient w.r.t. every role)."""
  K = split.count
  g_w = grads[K - 1]["w"][K - 1] + (sum(grads[t]["w"][t] for t in range(K - 1)) if shared else 0.0)
  expected = dict(params)
  expected["layers"] = jax.tree.map(lambda *p: jnp.concatenate(p), *[grads[split.target(k)]["components"][k]
                                                                      for k in range(K)])
  expected |= grads[split.target(0)]["embed_in"]
  expected["final_norm"] = grads[K - 1]["final_norm"]
  if mcfg.tied_embeddings:
    expected["embedding"] = expected["embedding"] + g_w.T
  else:
    expected["head"] = g_w
  towers = [grads[k]["towers"][k] for k in range(K - 1)]
  expected["aux_heads"] = {"norms": jnp.stack([t["norm"] for t in towers])}
  if mcfg.aux_head_layers:
    expected["aux_heads"]["layers"] = jax.tree.map(lambda *p: jnp.concatenate(p), *[t["layers"] for t in towers])
  return expected


def _assert_trees_close(actual, expected):
  flat_a, tree_a = jax.tree.flatten_with_path(actual)
  flat_e, tree_e = jax.tree.flatten_with_path(expected)
  assert tree_a == tree_e
  for (path, a), (_, e) in zip(flat_a, flat_e):
    scale = float(jnp.max(jnp.abs(e))) + 1e-12
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=2e-4, atol=2e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_each_component_learns_from_the_loss_n_minus_1_components_ahead():
  """Section 3: component k (1-based) learns from L_{min(k + n - 1, K)}; written out, not derived."""
  targets = {(4, 1): [1, 2, 3, 4], (4, 2): [2, 3, 4, 4], (4, 3): [3, 4, 4, 4], (4, 4): [4, 4, 4, 4],
             (3, 1): [1, 2, 3], (3, 2): [2, 3, 3], (3, 3): [3, 3, 3]}
  for (K, n), expected in targets.items():
    split = interlocking.Split((1,) * K, n)
    assert [split.target(k) + 1 for k in range(K)] == expected, (K, n)
  # The losses that reach a component's parameters are never its own auxiliary loss when n >= 2.
  for K in (3, 4):
    for n in range(2, K + 1):
      split = interlocking.Split((1,) * K, n)
      assert all(split.target(k) != k for k in range(K - 1))


@pytest.mark.parametrize("K,sizes", [(3, (2, 1, 1)), (4, ())])
def test_routed_gradients_equal_the_explicit_reference(K, sizes):
  """Every mode n = 1 (local) .. K (end-to-end): each parameter's gradient is exactly the
  gradient of the losses routed to it, and no other."""
  run, params, batch = _setup(_config(K=K, n=1, sizes=sizes))
  split = run.method.split()
  values, grads = _reference_losses(run, params, batch, split)
  for n, ((loss, aux), routed) in zip(range(1, K + 1), _routed(run, params, batch, range(1, K + 1))):
    split_n = interlocking.Split(split.sizes, n)
    assert float(loss) == pytest.approx(float(values[-1]), rel=1e-5)
    for k in range(K - 1):
      assert float(aux["method_metrics"][f"interlocking/aux_loss_{k + 1}"]) == pytest.approx(float(values[k]), rel=1e-5)
    _assert_trees_close(routed, _expected(params, run.model_cfg, split_n, grads))


@pytest.mark.parametrize("name,options", [
    # BERT: tied embedding (input use from L_t(1), output use from the final loss only: detached
    # heads), sparse prediction heads, linear auxiliary heads (0 blocks).
    ("bert", dict(sizes=(1, 2, 1), aux_output="detached", aux_head_layers=0)),
    # GPT preset: tied embedding trained by every head (shared), learned positions, 1-block heads.
    ("gpt", dict(sizes=(1, 2, 1), aux_output="shared", aux_head_layers=1)),
])
def test_tied_output_layer_routes_per_aux_output(name, options):
  if name == "gpt":
    cfg = quiet(load_config("gpt", "tiny_interlocking"))
    cfg.model.dtype = "float32"
    cfg.method.interlocking.update(components=3, n=2, grad_clip=0.0, **options)
  else:
    cfg = _config("bert", K=3, n=2, **options)
  run, params, batch = _setup(cfg)
  assert run.model_cfg.tied_embeddings
  assert ("layers" in params["aux_heads"]) == bool(options["aux_head_layers"])
  if name == "bert":
    assert run.model_cfg.max_predictions > 0
  (loss, _), routed = _routed(run, params, batch)
  split = run.method.split()
  values, grads = _reference_losses(run, params, batch, split)
  assert float(loss) == pytest.approx(float(values[-1]), rel=1e-5)
  # The reference's final loss is the family's own loss of the model (the heads aside).
  assert float(values[-1]) == pytest.approx(float(run.steps.ctx.loss_fn(
      nnx.merge(run.steps.ctx.graphdef, params), batch)[0]), rel=1e-5)
  _assert_trees_close(routed, _expected(params, run.model_cfg, split, grads, shared=options["aux_output"] == "shared"))


def test_end_to_end_without_heads_is_the_baseline_gradient():
  cfg = _config(K=4, n=4, aux_heads=False)
  run, params, batch = _setup(cfg)
  assert "aux_heads" not in params
  (loss, _), grads = _routed(run, params, batch)
  ctx = run.steps.ctx
  family = get_family("decoder")
  (base_loss, _), base_grads = jax.jit(jax.value_and_grad(
      lambda p: family.loss_fn(nnx.merge(ctx.graphdef, p), batch), has_aux=True))(params)
  assert float(loss) == pytest.approx(float(base_loss), rel=1e-6)
  _assert_trees_close(grads, base_grads)


def test_evaluation_uses_the_final_component_only(pairwise):
  """Evaluation is the model without its heads, whatever the heads hold."""
  run, params, batch, _ = pairwise
  family = get_family("decoder")
  evaluate = run.steps.eval_step()
  total, count = evaluate(params, batch, jnp.float32(0.0))
  moved = params | {"aux_heads": jax.tree.map(lambda p: p + 1.0, params["aux_heads"])}
  assert float(evaluate(moved, batch, jnp.float32(0.0))[0]) == float(total)
  plain = {k: v for k, v in params.items() if k != "aux_heads"}
  plain_cfg = dataclasses.replace(run.model_cfg, aux_heads=0)
  graphdef = nnx.split(nnx.eval_shape(lambda: family.module(plain_cfg, rngs=nnx.Rngs(params=0))))[0]
  loss, _ = family.loss_fn(nnx.merge(graphdef, plain), batch)
  assert float(total / count) == pytest.approx(float(loss), rel=1e-5)


def test_per_component_clipping_and_learning_rates(pairwise):
  run, params, _, (_, grads) = pairwise
  split = run.method.split()
  norms = jnp.sqrt(interlocking._group_sq_norms(grads, split))
  clip = float(jnp.median(norms))
  clipped, before = interlocking._clip_per_component(grads, split, clip)
  np.testing.assert_allclose(before, norms, rtol=1e-6)
  after = jnp.sqrt(interlocking._group_sq_norms(clipped, split))
  np.testing.assert_allclose(after, jnp.minimum(norms, clip), rtol=1e-5)
  # Each component is scaled as a whole: its direction is kept.
  factor = np.asarray(jnp.minimum(1.0, clip / norms))
  layer_factor = factor[split.layer_component()]
  np.testing.assert_allclose(clipped["layers"]["q"], grads["layers"]["q"] * layer_factor[:, None, None, None],
                             rtol=1e-5)
  np.testing.assert_allclose(clipped["embedding"], grads["embedding"] * factor[0], rtol=1e-5)
  np.testing.assert_allclose(clipped["final_norm"], grads["final_norm"] * factor[-1], rtol=1e-5)
  np.testing.assert_allclose(clipped["aux_heads"]["norms"], grads["aux_heads"]["norms"] * factor[:3, None],
                             rtol=1e-5)
  ones = jax.tree.map(jnp.ones_like, params)
  scaled = interlocking._scale_components(ones, split, (1.0, 0.5, 0.25, 2.0))
  assert scaled["layers"]["wi"][:, 0, 0].tolist() == [1.0, 0.5, 0.25, 2.0]
  assert scaled["aux_heads"]["layers"]["wo"][:, 0, 0].tolist() == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
  assert float(scaled["head"][0, 0]) == 2.0 and float(scaled["embedding"][0, 0]) == 1.0


def test_a_run_logs_each_head_and_component(tmp_path):
  """The GPT preset (learned positions, tied head, 1-block heads), clipped per component at
  optimizer.grad_clip, with a smaller LR for the last component."""
  config_lib.validate(load_config("gpt", "interlocking"))
  cfg = quiet(load_config("gpt", "tiny_interlocking"))
  cfg.method.interlocking.lr_scales = (1.0, 1.0, 1.0, 0.5)
  cfg.budget.value, cfg.log.every = 4, 2
  train_lib.train(cfg, str(tmp_path / "run"))
  rows = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
  assert len(rows) == 2
  for k in (1, 2, 3):
    assert np.isfinite(rows[-1][f"interlocking/aux_loss_{k}"])
  for k in (1, 2, 3, 4):
    assert rows[-1][f"interlocking/grad_norm_{k}"] > 0


def test_lr_scales_reach_the_train_step(pairwise):
  """A component with a tiny LR scale (and its head, and the final norm for the last) barely
  moves in a step; the others move as usual."""
  run, params, batch, _ = pairwise
  cfg = run.cfg.copy_and_resolve_references()
  cfg.method.interlocking.lr_scales = (1.0, 1e-6, 1.0, 1e-6)
  run = run_lib.setup(cfg)
  state = run.init()
  before = jax.tree.map(np.asarray, state.params)
  state, _ = run.steps.train_step(run.plan.stages[0])(state, batch, jax.random.key(0), jnp.float32(0.5))
  moved = lambda a, b: float(np.max(np.abs(np.asarray(a) - b)))
  wi = [moved(state.params["layers"]["wi"][k], before["layers"]["wi"][k]) for k in range(4)]
  assert wi[0] > 1e-4 and wi[2] > 1e-4 and wi[1] < 1e-8 and wi[3] < 1e-8
  assert moved(state.params["final_norm"], before["final_norm"]) < 1e-8
  heads = [moved(state.params["aux_heads"]["norms"][k], before["aux_heads"]["norms"][k]) for k in range(3)]
  assert heads[0] > 1e-4 and heads[1] < 1e-8 and heads[2] > 1e-4


@pytest.mark.parametrize("overrides,match", [
    (dict(components=5), "components=5: cut the 4 layers into 2 to 4"),
    (dict(components=3), r"does not divide model.num_layers=4 .*sizes \(e.g. \(2, 1, 1\)\)"),
    (dict(components=3, sizes=(2, 1)), r"sizes=\(2, 1\) must give 3 positive layer counts"),
    (dict(components=3, sizes=(2, 1, 2)), "summing to model.num_layers=4"),
    (dict(n=0), r"n=0 must be in \[1, 4\]"),
    (dict(n=5), r"n=5 must be in \[1, 4\]"),
    (dict(aux_heads=False), "aux_heads=False .* set method.interlocking.n=4"),
    (dict(aux_output="sum"), "aux_output must be one of"),
    (dict(lr_scales=(1.0, 2.0)), "lr_scales has 2 entries for 4 components"),
    (dict(grad_clip=-2.0), "grad_clip=-2.0"),
])
def test_bad_options_are_config_errors(overrides, match):
  cfg = _config(K=4, n=2)
  cfg.method.interlocking.update(**overrides)
  with pytest.raises(ValueError, match=match):
    config_lib.validate(cfg)


@pytest.mark.parametrize("method,stage,options,match", [
    ("interlocking", 2, {}, "mesh.stage=2 must equal method.interlocking.components=4"),
    ("interlocking", 3, dict(components=3, sizes=(2, 1, 1)), r"sizes=\(2, 1, 1\): a pipelined run"),
    ("baseline", 4, {}, r"mesh.stage=4 .* only a pipelining method runs \(interlocking\); method.name='baseline'"),
])
def test_bad_pipeline_meshes_are_config_errors(method, stage, options, match):
  cfg = _config(K=4, n=2)
  cfg.method.name = method
  cfg.method.interlocking.update(**options)
  cfg.mesh.update(data=1, stage=stage)
  with pytest.raises(ValueError, match=match):
    config_lib.validate(cfg)


def test_pipeline_routing_tables_follow_the_split():
  """Device j holds loss j + s at backward tick s: it learns at exactly one tick, the one of its
  target loss, and a loss travels down the pipe, one device per tick, to the components it
  trains and no further."""
  for K in (3, 4, 5):
    for n in range(1, K + 1):
      split = interlocking.Split((1,) * K, n)
      learn, send = interlocking_pipeline.routing_tables(split)
      assert learn.shape == send.shape == (K, n)
      for j in range(K):
        assert [s for s in range(n) if learn[j, s]] == [split.target(j) - j], (K, n, j)
        for s in range(n):
          t = j + s
          if t >= K:
            assert not send[j, s]
            continue
          # Sent down: the loss trains a component below j; and j - 1 then learns it or sends it on.
          assert send[j, s] == any(k < j for k in split.learners(t)), (K, n, j, s)
          if send[j, s]:
            assert s + 1 < n and (learn[j - 1, s + 1] or send[j - 1, s + 1])
      # End-to-end: the final loss reaches component 1 after K ticks; local: nothing is sent.
      if n == K:
        assert learn[0, K - 1] and send[1:, :].any()
      if n == 1:
        assert not send.any()


def _pipeline_check(devices: int, modes) -> list[dict]:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "interlocking_pipeline_check.py"),
                        json.dumps(modes)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("devices,modes", [
    (4, [dict(family="decoder", components=4, n=2),
         dict(family="decoder", components=4, n=4, aux_heads=False),            # no heads
         dict(family="gpt", components=4, n=4)]),                               # heads as probes, tied + shared
    (8, [dict(family="decoder", components=4, n=1, layers=8),                    # stage 4 x data 2
         dict(family="bert", components=4, n=3, aux_head_layers=0, aux_output="detached"),
         dict(family="gpt", components=2, n=2),                                  # stage 2 x data 4
         dict(family="decoder", components=8, n=2, layers=8)]),                  # stage 8
], ids=["4_devices", "8_devices"])
def test_pipelined_step_equals_the_single_device_step(devices, modes):
  """One train step pipelined over mesh.stage = K (components on their own devices, data
  parallel over the rest) against the same step on one device: the routed gradients, every
  metric and the parameter updates (per-component clipping and Adam included) agree."""
  results = _pipeline_check(devices, modes)
  assert len(results) == len(modes)
  for result, mode in zip(results, modes):
    K = mode["components"]
    others = mode.get("fsdp", 1) * mode.get("tensor", 1)
    assert result["mesh"]["stage"] == K and result["mesh"]["data"] * others == devices // K
    assert result["layer_spec"].startswith("P('stage'"), result  # each device holds its component only
    assert result["grads"] < 1e-5, result
    # Adam's first update divides by |g| + eps (eps = 1e-2 in the check), so it carries the
    # gradients' float differences times about max|g| / eps; a misrouted or misplaced update is O(1).
    assert result["updates"] < 1e-3, result
    assert max(result["metrics"].values()) < 1e-5, result
    assert not result["unmatched_metrics"], result
    expected = {f"interlocking/grad_norm_{k + 1}" for k in range(K)}
    if mode.get("aux_heads", True):
      expected |= {f"interlocking/aux_loss_{k + 1}" for k in range(K - 1)}
    assert expected <= set(result["metrics"]), sorted(result["metrics"])


def test_families_optimizers_and_compositions_it_cannot_run_are_refused():
  cfg = quiet(load_config("t5", "tiny"))
  cfg.method.name = "interlocking"
  cfg.method.interlocking.components = 2
  with pytest.raises(ValueError, match="model.family='t5' has an encoder and a decoder"):
    config_lib.validate(cfg)
  cfg = _config(K=4, n=2)
  cfg.optimizer.name = "sophia_h"
  with pytest.raises(ValueError, match="use adamw, lion or adafactor"):
    config_lib.validate(cfg)
  from raptr_jax.methods import Composite, Method  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="interlocking.value_and_grad.* cannot merge"):
    Composite([interlocking.Interlocking(_config(K=4, n=2)), Method()])


def test_flops_count_the_auxiliary_heads():
  from raptr_jax import flops  # pylint: disable=g-import-not-at-top
  cfg = _config(K=4, n=2)
  base = run_lib.model_config(cfg.model, 8192)
  heads = dataclasses.replace(base, aux_heads=3, aux_head_layers=2)
  extra = flops.family_train_flops("decoder", heads, 8, 64) - flops.family_train_flops("decoder", base, 8, 64)
  tokens = 8 * 64
  assert extra == pytest.approx(3.0 * 3 * (2 * flops.layer_forward_flops(base, tokens, 64) +
                                          2 * base.d_model * base.vocab_size * tokens))


def test_flops_count_the_backward_passes_the_routing_runs():
  """Per component (K = 4, one layer each), forward + parameter-gradient passes + input-gradient
  passes, counted by hand from the routing: local skips the input gradients (c_1 keeps its, for
  the embeddings); 2-wise's pass-throughs replace them; 3-wise runs one more (c_3 learns from L_4
  and passes L_3 to c_1, also sending L_4 on to c_2)."""
  by_hand = {1: [3, 2, 2, 2], 2: [3, 3, 3, 3], 3: [3, 3, 4, 3], 4: [3, 3, 3, 3]}
  for n, passes in by_hand.items():
    assert interlocking.layer_passes(interlocking.Split((1,) * 4, n)) == pytest.approx(sum(passes) / 4), n
  assert interlocking.layer_passes(interlocking.Split((2, 1, 1), 1)) == pytest.approx((2 * 3 + 2 + 2) / 4)
  # The stage carries it into the run's FLOPs: only the layers' share changes.
  from raptr_jax import flops  # pylint: disable=g-import-not-at-top
  run = run_lib.setup(_config(K=4, n=3))
  stage = run.plan.stages[0]
  assert stage.layer_passes == pytest.approx(3.25)
  mcfg = run.model_cfg
  b, t = run.cfg.data.batch_size, run.cfg.data.seq_len
  layers = flops.layer_forward_flops(mcfg, b * t, t) * mcfg.num_layers
  assert run.stage_flops(stage, 0.5) == pytest.approx(flops.family_train_flops("decoder", mcfg, b, t) + 0.25 * layers)


def test_time_model_is_the_papers_figure_2_in_units_and_follows_the_slowest_path():
  from raptr_jax.methods import interlocking_time as tm  # pylint: disable=g-import-not-at-top
  K = 4
  unit = tm.ComponentTimes(forward=(1.0,) * K, backward=(1.0,) * K, backward_input=(1.0,) * K,
                           head=(0.0,) * K, update=(0.0,) * K)
  # Figure 2, per step once the pipeline is full: local 2, n-wise 2n, end-to-end 2a.
  assert [tm.step_time(interlocking.Split((1,) * K, n), unit) for n in range(1, K + 1)] == [2, 4, 6, 8]
  three = interlocking.Split((1,) * K, 3)  # targets 2, 3, 3, 3: loss 2 passes through c_2 and c_3 (1-based)
  assert [tm.pass_throughs(three, j) for j in range(K)] == [0, 1, 1, 0]
  # A slow third component lengthens the cycles that run through it, and its device's load.
  slow = dataclasses.replace(unit, forward=(1.0, 1.0, 5.0, 1.0), head=(0.5, 0.5, 0.5, 0.5),
                             update=(0.25,) * K)
  pairwise = interlocking.Split((1,) * K, 2)
  assert tm.cycle(pairwise, slow, 1) == 1.0 + 5.0 + 0.5 + 1.0 + 1.0 + 0.25   # c_2 learns from L_3
  assert tm.device_load(pairwise, slow, 2) == 5.0 + 0.5 + 1.0 + 1.0 + 0.25    # one pass-through (L_3 to c_2)
  assert tm.step_time(pairwise, slow) == max(tm.cycle(pairwise, slow, k) for k in range(K))


def test_rst_charges_the_modelled_k_device_step_scaled_through_the_baseline(tmp_path):
  """Each mode is its own step kind; a table timed elsewhere (here: 10x slower) has only the
  baseline of this config, which anchors the new kinds; the run is charged the modelled time."""
  from raptr_jax import rst  # pylint: disable=g-import-not-at-top
  cfg = quiet(load_config("ul2", "tiny"))
  cfg.budget.update(unit="rst_seconds", value=1.0, rst_table=str(tmp_path / "table.json"))
  table = rst.calibrate(cfg, steps=2, warmup=0, verbose=False)
  for entry in table["entries"].values():
    entry["seconds"] *= 10.0
    entry["device_kind"] = "reference"
  rst.save_table(cfg.budget.rst_table, table)
  cfg.method.name = "interlocking"
  cfg.method.interlocking.update(components=2, n=1, aux_head_layers=1)
  keys = {}
  for n in (1, 2):
    other = cfg.copy_and_resolve_references()
    other.method.interlocking.n = n
    keys[n] = train_lib.setup(other, need_costs=False).plan.stages[0].shape
  assert keys[1] != keys[2] and ("full",) not in keys.values()
  entries = rst.calibrate(cfg, steps=2, warmup=0, verbose=False, only_missing=True)["entries"]
  train = next(e for e in entries.values() if e["kind"] == "train" and "modelled" in e)
  model = train["modelled"]
  assert model["devices"] == 2 and model["n"] == 1 and len(model["components"]["forward"]) == 2
  assert entries[train["anchor"]]["stage"] == "full" and train["device_kind"] == "reference"
  assert 3.0 < train["scaled_by"] < 30.0
  assert train["seconds"] == pytest.approx(model["seconds"] * train["scaled_by"])
  assert train_lib.setup(cfg).plan.step_costs[(keys[1], False)] == train["seconds"]


def test_pipeline_refuses_fsdp_and_tensor_axes():
  cfg = _config(K=4, n=2)
  cfg.mesh.update(data=1, stage=4, fsdp=2)
  with pytest.raises(ValueError, match="shards over stage and data only"):
    config_lib.validate(cfg)
