"""Batch selection (No Train No Gain, Section 5): what selective backprop and RHO loss share.

A batch-selection method trains on rows it picks from candidates the current model has scored:

    while fewer than data.batch_size rows are chosen:
      candidates = stream.next_batch()                     # scoring.rows packed rows
      losses, weights = score_step(params, candidates)     # forward only, jitted, on the device
      chosen += method.choose(candidates, row losses, rng(seed, step, pass))   # host, numpy
    train_step(state, the first data.batch_size chosen rows)   # the rest wait for the next step

The unit of selection is a packed row, the "example" NTNG's BERT trained on (a 128-token
sequence): its loss is the mean over its loss positions (masked tokens for MLM, targets for span
corruption and UL2). ``score_step`` (``step.make_score_step``) also returns every packed
example's summed loss and weight, which RHO loss joins to its irreducible losses by example id.

Static shapes: every scoring pass scores the same number of rows and every train step trains on
``data.batch_size`` rows, so one scoring pass and one train step are compiled. Rows chosen
beyond a batch are carried to the next step (selective backprop keeps a random number of rows
per pass); the carry and the method's own state (the loss history) are saved with each
checkpoint (``state()`` / ``restore()``), and each pass draws its randomness from
``(seed, step, pass)``, so a resumed run chooses the same rows as one never stopped.

Cost: each scoring pass is a forward pass over ``scoring.rows`` rows (about a third of a train
step's FLOPs per row) plus one device-to-host copy of two ``[rows, segments]`` float arrays; the
host waits for it before it assembles the train batch, so the device idles for that copy and
the host's gather of the chosen rows. Passes are charged on the run's clock
(``plan.Plan.scoring_charge``): their RST time from the calibration table, their tokens on the
tokens clock, nothing with ``budget.free_scoring`` (NTNG Section 5.4).
"""
import jax
import numpy as np

from raptr_jax.methods.base import Method


def check_optimizer(cfg, method: str) -> None:
  if cfg.optimizer.name == "sophia_g":
    raise ValueError(f"method.name={method!r} feeds the step rows it chose, and Sophia-G's Hessian pass "
                     "would need a batch of its own: use optimizer.name adamw, lion or sophia_h")


def row_losses(losses: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """[rows] mean loss of each row from per-example sums ``[rows, segments]`` (0 for a row with no
  loss positions)."""
  total, count = losses.sum(axis=1), weights.sum(axis=1)
  return np.where(count > 0, total / np.maximum(count, 1e-9), 0.0)


def take_rows(batch: dict, rows) -> dict:
  return {k: v[rows] for k, v in batch.items()}


def concat_rows(a: dict | None, b: dict) -> dict:
  return b if a is None else {k: np.concatenate([a[k], b[k]]) for k in b}


def fetch(x) -> np.ndarray:
  """A global device array on every host (all-gathered across processes when there are several)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


class BatchFeed:
  """Training batches of chosen rows for the loop (see the module docstring).

  Subclasses implement ``choose(candidates, losses, weights, rng) -> row indices`` (numpy) and
  may keep state of their own (``_own_state`` / ``_restore_own``) and report ``metrics()``."""

  def __init__(self, run, batches, seed: int):
    self.batches = batches                    # the stream (Prefetcher) of candidate batches
    self.batch_size = run.cfg.data.batch_size
    self.seed = seed
    self._score = None
    self._run = run
    self.carry = None                         # chosen rows not yet trained on
    self._fields = {}                         # candidate arrays: (row shape, dtype)
    self.totals = {"passes": 0, "scored": 0, "chosen": 0}

  def score(self, params, candidates):
    """(losses, weights) ``[rows, segments]`` of the candidates under ``params``, on the host."""
    if self._score is None:
      self._score = self._run.steps.score_step(candidates["example_ids"].shape[1])
    losses, weights = self._score(params, self._run.device_batch(candidates))
    return fetch(losses), fetch(weights)

  def choose(self, candidates: dict, losses: np.ndarray, weights: np.ndarray, rng) -> np.ndarray:
    raise NotImplementedError

  def next_batch(self, params, step: int) -> tuple[dict, int]:
    """(the train batch of ``step``, the scoring passes run to fill it)."""
    passes = 0
    while self.carry is None or len(self.carry["example_ids"]) < self.batch_size:
      candidates = self.batches.next_batch()
      if candidates is None:
        raise ValueError("the training stream ended while batch selection was filling a batch")
      self._fields = {k: (v.shape[1:], v.dtype) for k, v in candidates.items()}
      losses, weights = self.score(params, candidates)
      rng = np.random.default_rng([self.seed, step, passes, 0xBA7C])
      chosen = np.asarray(self.choose(candidates, losses, weights, rng), np.int64)
      self.carry = concat_rows(self.carry, take_rows(candidates, chosen))
      passes += 1
      self.totals["passes"] += 1
      self.totals["scored"] += len(candidates["example_ids"])
      self.totals["chosen"] += len(chosen)
    batch = take_rows(self.carry, slice(0, self.batch_size))
    rest = take_rows(self.carry, slice(self.batch_size, None))
    self.carry = rest if len(rest["example_ids"]) else None
    return batch, passes

  def metrics(self) -> dict:
    t = self.totals
    return {"select/share": t["chosen"] / max(t["scored"], 1), "select/scoring_passes": t["passes"],
            "select/scored_rows": t["scored"]}

  # Checkpointing: fixed shapes (orbax saves arrays, not empty ones), counts alongside.
  def state(self) -> dict:
    """Arrays to save with a checkpoint (after the first ``next_batch``)."""
    carry = {k: np.zeros((self.batch_size,) + shape, dtype) for k, (shape, dtype) in self._fields.items()}
    n = 0 if self.carry is None else len(self.carry["example_ids"])
    for k in carry if n else ():
      carry[k][:n] = self.carry[k]
    return {"carry": carry, "carry_rows": np.int64(n),
            "totals": np.asarray([self.totals[k] for k in ("passes", "scored", "chosen")], np.int64),
            **self._own_state()}

  def restore(self, saved: dict) -> None:
    n = int(saved["carry_rows"])
    self.carry = {k: np.asarray(v)[:n] for k, v in saved["carry"].items()} if n else None
    self._fields = {k: (np.shape(v)[1:], np.asarray(v).dtype) for k, v in saved["carry"].items()}
    self.totals = dict(zip(("passes", "scored", "chosen"), (int(x) for x in saved["totals"])))
    self._restore_own(saved)

  def _own_state(self) -> dict:
    return {}

  def _restore_own(self, saved: dict) -> None:
    pass


class BatchSelection(Method):
  """What the batch-selection methods share as methods: the optimizer check, the feed the run
  builds once (``make_feed``) and its metrics logged with every logged step."""
  feed: BatchFeed | None = None

  def validate(self, cfg) -> None:
    check_optimizer(cfg, self.name)

  def make_feed(self, run, batches) -> BatchFeed:
    raise NotImplementedError

  def batch_feed(self, run, batches) -> BatchFeed:
    self.feed = self.make_feed(run, batches)
    return self.feed

  def metrics(self, stage, fraction) -> dict:
    return self.feed.metrics() if self.feed is not None else {}
