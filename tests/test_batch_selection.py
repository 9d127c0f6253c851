"""Batch selection: selective backprop and RHO loss (No Train No Gain, Section 5)."""
import os
import types

import numpy as np
import pytest

from raptr_jax import il_losses
from raptr_jax import run as run_lib
from raptr_jax import train as train_lib
from raptr_jax.config import validate
from raptr_jax.data import holdout, il_store, objectives, packing, pipeline
from raptr_jax.methods import batch_selection, rho_loss
from raptr_jax.methods import selective_backprop as sb
from raptr_jax.metrics import read_metrics
from conftest import load_config, quiet, straight_and_resumed


def bert(preset="tiny", **overrides):
  cfg = quiet(load_config("bert", preset))
  cfg.model.dtype = "float32"
  for key, value in overrides.items():
    section, field = key.split("__")
    cfg[section][field] = value
  validate(cfg)
  return cfg


class FakeFeed(sb.SelectiveBackpropFeed):
  """The selective-backprop feed with losses given by the test instead of a model."""

  def __init__(self, batch_size, beta, history, stream):
    run = types.SimpleNamespace(cfg=types.SimpleNamespace(data=types.SimpleNamespace(batch_size=batch_size)))
    super().__init__(run, stream, seed=0, beta=beta, history=history)

  def score(self, params, candidates):
    losses = candidates["loss"][:, None].astype(np.float64)
    return losses, np.ones_like(losses)


class LossStream:
  """Candidate batches whose rows carry a loss drawn by the test."""

  def __init__(self, rows, draw):
    self.rows, self.draw, self.n = rows, draw, 0

  def next_batch(self):
    ids = np.arange(self.n, self.n + self.rows)
    self.n += self.rows
    return {"example_ids": ids[:, None], "loss": self.draw(self.rows)}


# ---- selective backprop ---------------------------------------------------------------------

def test_keep_probabilities_match_algorithm_3_one_loss_at_a_time():
  rng = np.random.default_rng(0)
  history, length, beta = list(rng.normal(size=7)), 10, 1.5
  losses = rng.normal(size=9)
  losses[3] = losses[1]  # a tie counts as <=
  probs, new = sb.keep_probabilities(np.asarray(history), losses, length, beta)
  h = list(history)
  for j, loss in enumerate(losses):  # Algorithm 3, lines 7-8, literally
    h.append(loss)
    window = h[-length:]
    assert probs[j] == pytest.approx((sum(x <= loss for x in window) / len(window)) ** beta)
  np.testing.assert_array_equal(new, np.asarray(h[-length:]))


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_keep_rate_is_one_over_beta_plus_one(beta):
  rng = np.random.default_rng(int(beta))
  feed = FakeFeed(batch_size=32, beta=beta, history=1000, stream=LossStream(64, lambda n: rng.normal(size=n)))
  for step in range(150):
    batch, _ = feed.next_batch(None, step)
    assert len(batch["example_ids"]) == 32
  scored, chosen = feed.totals["scored"], feed.totals["chosen"]
  expected = 1.0 / (beta + 1.0)
  sigma = np.sqrt(expected * (1 - expected) / scored)
  assert abs(chosen / scored - expected) < 4 * sigma + 2.0 / 1000  # + the history's discreteness
  assert feed.metrics()["select/share"] == pytest.approx(chosen / scored)


def test_a_dominant_loss_is_always_kept():
  rng = np.random.default_rng(3)
  for trial in range(20):
    draw = lambda n: np.where(np.arange(n) == 5, 100.0, rng.normal(size=n))
    feed = FakeFeed(batch_size=4, beta=1.0, history=200, stream=LossStream(16, draw))
    batch, _ = feed.next_batch(None, trial)
    kept = np.concatenate([batch["example_ids"][:, 0], feed.carry["example_ids"][:, 0] if feed.carry else []])
    assert 5 in kept


def test_carry_fills_every_batch_and_loses_no_chosen_row():
  rng = np.random.default_rng(4)
  stream = LossStream(10, lambda n: rng.normal(size=n))
  feed = FakeFeed(batch_size=8, beta=2.0, history=50, stream=stream)
  trained = []
  for step in range(40):
    batch, passes = feed.next_batch(None, step)
    assert len(batch["example_ids"]) == 8 and passes >= 1
    trained.extend(batch["example_ids"][:, 0].tolist())
  carried = [] if feed.carry is None else feed.carry["example_ids"][:, 0].tolist()
  assert len(trained) + len(carried) == feed.totals["chosen"]
  assert trained + carried == sorted(trained + carried)  # first chosen, first trained
  # The feed's state round-trips (what a checkpoint holds).
  saved = feed.state()
  other = FakeFeed(batch_size=8, beta=2.0, history=50, stream=stream)
  other.restore(saved)
  np.testing.assert_array_equal(other.history, feed.history)
  assert other.totals == feed.totals
  assert (other.carry is None) == (feed.carry is None)
  if feed.carry is not None:
    np.testing.assert_array_equal(other.carry["example_ids"], feed.carry["example_ids"])


def test_selective_backprop_resumes_exactly(tmp_path):
  cfg = bert("tiny_selective_backprop")
  cfg.budget.value, cfg.checkpoint.every, cfg.log.every = 12, 6, 1
  rows = straight_and_resumed(cfg, tmp_path, 6, ("loss", "train/loss", "grad_norm", "select/share",
                                                 "select/history_p50", "select/scoring_passes"))
  assert rows[-1]["select/scoring_passes"] > 12  # about (beta + 1) passes a step
  assert 0.2 < rows[-1]["select/share"] < 0.8


# ---- scoring pass ---------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["bert", "t5", "ul2"])
def test_score_step_equals_each_example_scored_alone(preset):
  cfg = quiet(load_config(preset, "tiny"))
  cfg.model.dtype = "float32"
  run = run_lib.setup(cfg)
  state = run.init()
  stream = pipeline.build_stream(cfg.data, "train", 8, 0, train=True)
  batch = stream.next_batch()
  score = run.steps.score_step(batch["example_ids"].shape[1])
  losses, weights = (np.asarray(x) for x in score(state.params, run.device_batch(batch)))
  eval_step = run.steps.eval_step()
  # The last example of the fullest row (packed behind others where rows hold several), alone.
  counts = (batch["example_ids"] >= 0).sum(axis=1)
  row = int(np.argmax(counts))
  seg = int(counts[row]) - 1
  groups = stream.objective.groups
  alone = packing.RowPacker(groups, stream.objective.max_row_weight)
  example = {}
  for g in groups:
    inside = batch[g.segment_field][row] == seg + 1
    example |= {k: batch[k][row][inside] for k in g.fields}
  alone.add(example, int(batch["example_ids"][row, seg]))
  single = packing.stack_rows([alone.pop()] + [packing.RowPacker(groups).pop()] * 3, 64)
  loss_sum, count = eval_step(state.params, run.device_batch(single), np.float32(0))
  assert weights[row, seg] == pytest.approx(float(count))
  assert losses[row, seg] == pytest.approx(float(loss_sum), rel=1e-4)
  # Row sums are the row's loss positions.
  seg_field = groups[-1].segment_field
  assert weights[row].sum() == pytest.approx(batch["weights"][row][batch[seg_field][row] > 0].sum())


# ---- RHO loss --------------------------------------------------------------------------------

def test_top_rows_match_a_numpy_reference():
  rng = np.random.default_rng(5)
  scores = np.round(rng.normal(size=200), 1)  # many ties
  got = rho_loss.top_rows(scores, 50)
  reference = sorted(sorted(range(200), key=lambda i: (-scores[i], i))[:50])
  np.testing.assert_array_equal(got, reference)


def test_holdout_split_is_by_id_and_stable():
  ids = np.arange(100_000, dtype=np.int64) * 4096 + 3
  share = holdout.in_holdout(ids, 0.2).mean()
  assert abs(share - 0.2) < 0.01
  np.testing.assert_array_equal(holdout.in_holdout(ids[::-1], 0.2), holdout.in_holdout(ids, 0.2)[::-1])
  source = pipeline.ListSource([(int(i), np.arange(10)) for i in ids[:500]], seed=1, shuffle=True)
  rest = {i for i, _ in holdout.HoldoutSplit(source, 0.2, "rest").iterate(0, 0)}
  held = {i for i, _ in holdout.HoldoutSplit(source, 0.2, "holdout").iterate(3, 0)}
  assert not rest & held and len(rest | held) == 500
  resumed = [i for i, _ in holdout.HoldoutSplit(source, 0.2, "rest").iterate(0, 7)]
  assert resumed == [i for i, _ in holdout.HoldoutSplit(source, 0.2, "rest").iterate(0, 0)][7:]


def test_masks_are_a_function_of_seed_and_id_without_resampling():
  cfg = bert("tiny_rho_loss")
  a = pipeline.build_stream(cfg.data, "train", 8, seed=0, train=True)
  first = {}
  for _ in range(3):
    batch = a.next_batch()
    for r in range(8):
      for s, example_id in enumerate(batch["example_ids"][r]):
        if example_id >= 0:
          first[int(example_id)] = batch["inputs"][r][batch["segment_ids"][r] == s + 1]
  # Another shuffle (run seed), second epoch: each example is masked the same way.
  b = pipeline.build_stream(cfg.data, "train", 8, seed=7, train=True)
  b.set_state({"epoch": 1, "cursor": 0})
  b.noise_seed = a.noise_seed
  seen = set()
  while len(seen) < len(first) and b.epoch == 1:
    batch = b.next_batch()
    for r in range(8):
      for s, example_id in enumerate(batch["example_ids"][r]):
        if int(example_id) in first:
          np.testing.assert_array_equal(batch["inputs"][r][batch["segment_ids"][r] == s + 1], first[int(example_id)])
          seen.add(int(example_id))
  assert len(seen) == len(first) > 20
  rng0, rng1 = objectives.example_rng(0, 123, 0), objectives.example_rng(0, 123, 1)
  assert rng0.random() != rng1.random()  # with resample_noise (the default) epochs differ


@pytest.fixture(scope="module")
def rho_store(tmp_path_factory):
  """A tiny IL store: the IL model trained 6 steps on 90% of the data, the other 10% scored."""
  cfg = bert("tiny_rho_loss")
  cfg.data.holdout_share = 0.9
  cfg.method.rho_loss.il_budget = 6
  cfg.method.rho_loss.store = str(tmp_path_factory.mktemp("il") / "store")
  il_losses.build(cfg, verbose=False)
  return cfg


def test_il_store_joins_by_id_across_orders_hosts_and_epochs(rho_store):
  cfg = rho_store
  store = il_store.ILStore.load(cfg.method.rho_loss.store, cfg)
  assert store.meta["il_model"]["steps"] == 6 and store.meta["examples"] == len(store.ids) > 100
  per_id = {}
  for seed, epoch, hosts in ((0, 0, 1), (5, 1, 2), (9, 2, 4)):
    stream = pipeline.build_stream(cfg.data, "train", 8, seed=seed, train=True)
    stream.set_state({"epoch": epoch, "cursor": 0})
    for _ in range(4):
      batch = stream.next_batch()
      for host in range(hosts):
        rows = pipeline.host_rows(batch, host, hosts)
        sums, weights = store.lookup(rows["example_ids"])
        for i, s, w in zip(rows["example_ids"].ravel(), sums.ravel(), weights.ravel()):
          if i >= 0:
            assert per_id.setdefault(int(i), (s, w)) == (s, w)
  assert len(per_id) > 40
  with pytest.raises(ValueError, match="not in the irreducible-loss store.*il_losses build"):
    store.lookup(np.array([[12345678901, -1]]))


def test_rho_loss_trains_on_the_top_reducible_rows(rho_store, tmp_path):
  cfg = rho_store.copy_and_resolve_references()
  cfg.budget.value, cfg.log.every = 4, 1
  train_lib.train(cfg, str(tmp_path / "run"))
  rows = read_metrics(tmp_path / "run")
  last = rows[-1]
  assert last["select/scoring_passes"] == 4 and last["select/share"] == pytest.approx(0.5)
  assert last["select/reducible_mean"] >= last["select/reducible_mean_all"]
  assert last["select/il_steps"] == 6


def test_rho_loss_refuses_a_missing_or_mismatched_store(rho_store, tmp_path):
  cfg = rho_store.copy_and_resolve_references()
  cfg.method.rho_loss.store = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="does not exist.*python -m raptr_jax.il_losses build"):
    train_lib.train(cfg, str(tmp_path / "a"))
  cfg = rho_store.copy_and_resolve_references()
  cfg.data.noise_seed = 11  # other masks
  with pytest.raises(ValueError, match="built for other data.*noise_seed"):
    train_lib.train(cfg, str(tmp_path / "b"))


# ---- charging and configuration ---------------------------------------------------------------

def test_scoring_passes_are_charged_on_every_clock():
  cfg = bert("tiny_selective_backprop")
  for unit, per_pass in (("steps", 0.0), ("tokens", 8 * 64)):
    cfg.budget.unit = unit
    plan = run_lib.setup(cfg).plan
    assert plan.scoring_charge(3) == 3 * per_pass
  cfg.budget.unit = "layer_tokens"
  run = run_lib.setup(cfg)
  assert run.plan.scoring_charge(2) == 2 * run.stage_flops.full_layer_tokens
  cfg.budget.free_scoring = True
  assert run_lib.setup(cfg).plan.scoring_charge(2) == 0.0
  plan = run_lib.build_plan(bert("tiny_rho_loss"))
  assert plan.scoring.rows == 16 and plan.scoring.passes_per_step == 1.0


@pytest.mark.parametrize("preset, key, value, match", [
    ("tiny_selective_backprop", "method.selective_backprop.scale", 0.0, "scale"),
    ("tiny_selective_backprop", "method.selective_backprop.history", 0, "history"),
    ("tiny_selective_backprop", "optimizer.name", "sophia_g", "sophia_h"),
    ("tiny_rho_loss", "method.rho_loss.mega_batch", 12, "multiple of data.batch_size"),
    ("tiny_rho_loss", "method.rho_loss.mega_batch", 8, "larger than it"),
    ("tiny_rho_loss", "data.holdout_share", 0.0, "holdout_share in \\(0, 1\\)"),
    ("tiny_rho_loss", "data.holdout_share", 1.5, "holdout_share"),
    ("tiny_rho_loss", "data.resample_noise", True, "resample_noise=False"),
    ("tiny_rho_loss", "data.holdout_part", "holdout", "holdout_part"),
    ("tiny_rho_loss", "method.rho_loss.il_overrides", ("data.seq_len=32",), "il_overrides"),
])
def test_bad_batch_selection_options_name_the_key(preset, key, value, match):
  cfg = quiet(load_config("bert", preset))
  section, *rest = key.split(".")
  node = cfg[section]
  for part in rest[:-1]:
    node = node[part]
  node[rest[-1]] = value
  with pytest.raises(ValueError, match=match):
    validate(cfg)


def test_a_mega_batch_that_does_not_divide_over_the_mesh_is_refused(monkeypatch):
  monkeypatch.setattr(run_lib.shd, "data_parallel_size", lambda mesh: 8)  # as on 8 devices
  cfg = bert("tiny_selective_backprop")
  cfg.method.selective_backprop.candidates = 12
  with pytest.raises(ValueError, match="do not divide over the data-parallel size"):
    run_lib.setup(cfg)


def test_row_losses_are_masked_token_means():
  losses = np.array([[2.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
  weights = np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(batch_selection.row_losses(losses, weights), [1.5, 0.0])


def test_source_without_stable_ids_is_refused():
  class Anonymous:
    def iterate(self, epoch, start):
      yield from ()
  with pytest.raises(ValueError, match="no stable example ids"):
    holdout.HoldoutSplit(Anonymous(), 0.2, "rest")


def test_il_model_config_trains_the_holdout_with_the_il_budget(rho_store):
  il = il_losses.il_model_config(rho_store)
  assert il.method.name == "baseline" and il.data.holdout_part == "holdout" and il.budget.value == 6
  assert os.path.basename(il_store.default_path(rho_store)) == "store"


def test_comparison_runner_runs_the_methods_preparation(rho_store, capsys):
  from raptr_jax import compare  # pylint: disable=g-import-not-at-top
  compare.prepare(rho_store)  # Method.prepare -> il_losses:build, which finds the store built
  assert "already built" in capsys.readouterr().out
  compare.prepare(bert("tiny"))  # the baseline declares nothing
