"""Selective backprop (Jiang et al. 2019, "Accelerating Deep Learning by Focusing on the Biggest
Losers"; Algorithm 3 of No Train No Gain, as NTNG ran it on BERT).

Each candidate row's loss (forward only, on the device) is pushed onto a loss history of the
last ``history`` losses (NTNG: 5000; Jiang et al.: 1024), one row at a time, and the row is kept
with probability CDF(loss)^beta, the CDF taken over the history including the row itself
(``keep_probabilities``). With losses from a continuous distribution the CDF is uniform and a
row is kept with probability E[U^beta] = 1 / (beta + 1): beta = ``scale`` = 1 (NTNG's choice)
keeps half, 2 a third. Kept rows fill the train batch; the rest of a pass's kept rows wait for
the next step (``batch_selection.BatchFeed``), so every train step sees ``data.batch_size``
rows and about (beta + 1) x batch / ``candidates`` scoring passes of ``candidates`` rows.

Defaults: scale 1.0, history 5000, candidates 0 (a pass scores data.batch_size rows). The scoring
passes are charged on the run's clock (``budget.free_scoring`` drops them, NTNG Section 5.4).
"""
import numpy as np

from raptr_jax.methods.batch_selection import BatchFeed, BatchSelection, row_losses
from raptr_jax.plan import Scoring


def check(scale: float, history: int, candidates: int) -> None:
  if not scale > 0:
    raise ValueError(f"method.selective_backprop.scale is beta of P(keep) = CDF(loss)^beta and must be "
                     f"> 0 (NTNG: 1.0 keeps about half the rows, 2.0 a third); got {scale}")
  if int(history) < 1:
    raise ValueError(f"method.selective_backprop.history is the loss-history length (NTNG: 5000), "
                     f"at least 1; got {history}")
  if int(candidates) < 0:
    raise ValueError(f"method.selective_backprop.candidates is the rows one scoring pass scores "
                     f"(0: data.batch_size); got {candidates}")


def keep_probabilities(history: np.ndarray, losses: np.ndarray, length: int, beta: float):
  """(P(keep) of each loss, the new history): Algorithm 3, lines 6-9, one loss at a time.

  Loss j is appended to the history, then its probability is CDF(loss_j)^beta over the last
  ``length`` entries (itself included): the share of them that are <= loss_j."""
  losses = np.asarray(losses, np.float64)
  joined = np.concatenate([np.asarray(history, np.float64), losses])
  padded = np.concatenate([np.full(length, np.nan), joined])  # NaN <= x is False: not counted
  ends = len(history) + 1 + np.arange(len(losses))          # exclusive end of loss j's window
  windows = np.lib.stride_tricks.sliding_window_view(padded, length)[ends]  # joined[end - length:end]
  cdf = np.sum(windows <= losses[:, None], axis=1) / np.minimum(ends, length)
  return cdf ** beta, joined[-length:]


class SelectiveBackpropFeed(BatchFeed):

  def __init__(self, run, batches, seed: int, beta: float, history: int):
    super().__init__(run, batches, seed)
    self.beta, self.length = float(beta), int(history)
    self.history = np.zeros(0, np.float64)

  def choose(self, candidates, losses, weights, rng):
    probs, self.history = keep_probabilities(self.history, row_losses(losses, weights), self.length, self.beta)
    return np.flatnonzero(rng.random(len(probs)) < probs)

  def metrics(self) -> dict:
    out = super().metrics()
    if len(self.history):
      q = np.quantile(self.history, [0.1, 0.5, 0.9])
      out |= {"select/history_p10": q[0], "select/history_p50": q[1], "select/history_p90": q[2]}
    return out

  def _own_state(self) -> dict:
    history = np.zeros(self.length, np.float64)
    history[:len(self.history)] = self.history
    return {"history": history, "history_len": np.int64(len(self.history))}

  def _restore_own(self, saved) -> None:
    self.history = np.asarray(saved["history"], np.float64)[:int(saved["history_len"])]


class SelectiveBackprop(BatchSelection):
  name = "selective_backprop"

  def validate(self, cfg) -> None:
    o = cfg.method.selective_backprop
    check(o.scale, o.history, o.candidates)
    super().validate(cfg)

  def scoring(self, cfg) -> Scoring:
    o = cfg.method.selective_backprop
    rows = int(o.candidates) or cfg.data.batch_size
    return Scoring(rows=rows, passes_per_step=(o.scale + 1.0) * cfg.data.batch_size / rows)

  def make_feed(self, run, batches):
    o = run.cfg.method.selective_backprop
    return SelectiveBackpropFeed(run, batches, run.cfg.seed, o.scale, o.history)
