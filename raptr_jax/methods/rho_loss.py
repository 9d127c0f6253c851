"""RHO loss (Mindermann et al. 2022, "Prioritized Training on Points that are Learnable, Worth
Learning, and Not Yet Learnt"; Algorithm 4 of No Train No Gain, as NTNG ran it on BERT).

Before training, an irreducible-loss (IL) model of the same architecture is trained on a held-out
share of the training data (NTNG: 20%, ``data.holdout_share``, split by example id) and its loss
on every other training example is stored, keyed by stable example id and data version
(``python -m raptr_jax.il_losses build``, ``data/il_store.py``). Each training step then scores a
mega-batch of ``mega_batch`` rows with the current model (forward only, on the device), computes
each row's reducible loss = its loss - its IL loss (both the mean over the row's loss positions;
the IL side summed over the row's packed examples from the store), and trains on the top
``data.batch_size`` rows (``top_rows``, ties to the earlier row).

The join is by example id, and masks are a function of (noise seed, example id) alone
(``data.resample_noise=False``), so the IL loss and the training loss are taken under the same
mask: the feed checks it (each example's loss weight must equal the store's) and stops otherwise.
The reference code joined by stream position under different masks.

Defaults: mega-batch 2 x data.batch_size (NTNG's tuned choice; Mindermann et al. use 10x), the
IL model trained for ``il_budget`` (0: the run's budget) in the run's budget unit. Scoring passes
are charged on the run's clock (``budget.free_scoring`` drops them, NTNG Section 5.4); the IL
model's training and the store's scoring pass are not (NTNG amortizes them over runs) and are
reported in the store's ``meta.json`` and the run's ``select/il_*`` metrics.
"""
import numpy as np

from raptr_jax.data import il_store
from raptr_jax.methods.batch_selection import BatchFeed, BatchSelection, row_losses
from raptr_jax.plan import Scoring


def mega_batch_rows(cfg) -> int:
  return int(cfg.method.rho_loss.mega_batch) or 2 * cfg.data.batch_size


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices (ascending) of the ``k`` largest scores, ties to the earlier row."""
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  return np.sort(order[:k])


class RhoFeed(BatchFeed):

  def __init__(self, run, batches, seed: int, store: il_store.ILStore):
    super().__init__(run, batches, seed)
    self.store = store
    self.reducible = {"chosen": 0.0, "all": 0.0}

  def choose(self, candidates, losses, weights, rng):
    il_sum, il_weight = self.store.lookup(candidates["example_ids"])
    bad = np.abs(il_weight - weights) > 1e-3
    if np.any(bad):
      row, seg = np.argwhere(bad)[0]
      raise ValueError(
          f"example {int(candidates['example_ids'][row, seg])} has {weights[row, seg]:g} loss positions in this "
          f"run and {il_weight[row, seg]:g} in the irreducible-loss store {self.store.path!r}: its masks "
          "differ, so its IL loss does not apply. Keep data.noise_seed, data.resample_noise=False and the "
          f"objective as the store was built, or rebuild it: `{il_store.BUILD_COMMAND}`")
    reducible = row_losses(losses, weights) - row_losses(il_sum, il_weight)
    chosen = top_rows(reducible, self.batch_size)
    self.reducible = {"chosen": float(np.mean(reducible[chosen])), "all": float(np.mean(reducible))}
    return chosen

  def metrics(self) -> dict:
    il = self.store.meta.get("il_model", {})  # the IL model's cost, reported, not charged
    return super().metrics() | {"select/reducible_mean": self.reducible["chosen"],
                                "select/reducible_mean_all": self.reducible["all"]} | {
                                    f"select/il_{k}": v for k, v in il.items() if k in ("steps", "wall_s", "rst_s")}


class RhoLoss(BatchSelection):
  name = "rho_loss"
  prepare = ("raptr_jax.il_losses:build",)  # the IL store (skipped when it exists)

  def validate(self, cfg) -> None:
    o, d = cfg.method.rho_loss, cfg.data
    rows = mega_batch_rows(cfg)
    if rows <= d.batch_size or rows % d.batch_size:
      raise ValueError(f"method.rho_loss.mega_batch is the rows scored per step and must be a multiple of "
                       f"data.batch_size={d.batch_size} larger than it (NTNG: 2x, {2 * d.batch_size}; 0 = 2x); "
                       f"got {o.mega_batch}")
    if not 0.0 < d.holdout_share < 1.0:
      raise ValueError(f"rho_loss trains its irreducible-loss model on a held-out share of the training "
                       f"data: set data.holdout_share in (0, 1) (NTNG: 0.2); got {d.holdout_share}")
    if d.holdout_part != "rest":
      raise ValueError("rho_loss trains the target model on the rest of the data: data.holdout_part must "
                       f"be 'rest' (the IL model's run sets 'holdout' itself); got {d.holdout_part!r}")
    if d.resample_noise:
      raise ValueError("rho_loss compares each example's loss with its stored IL loss, so the example must "
                       "be masked the same way every epoch: set data.resample_noise=False")
    if o.il_budget < 0:
      raise ValueError(f"method.rho_loss.il_budget must be >= 0 (0: the run's budget), got {o.il_budget}")
    for item in o.il_overrides:
      if "=" not in str(item) or str(item).startswith("data."):
        raise ValueError(f"method.rho_loss.il_overrides entries are 'section.field=value' for the IL model "
                         f"(data fields are the run's, so the masks match); got {item!r}")
    super().validate(cfg)

  def scoring(self, cfg) -> Scoring:
    return Scoring(rows=mega_batch_rows(cfg), passes_per_step=1.0)

  def make_feed(self, run, batches):
    store = il_store.ILStore.load(il_store.default_path(run.cfg), run.cfg)
    return RhoFeed(run, batches, run.cfg.seed, store)
