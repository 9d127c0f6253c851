"""No Train No Gain's tuning protocol (Appendix C) at CPU size: every method's grid under one RST
budget, the best setting per method by final validation loss, re-run with a second seed.

    python -m raptr_jax.compare --config=configs/tune_ntng.py --workdir=runs/tune_ntng --yes
    python -m raptr_jax.compare --config=configs/tune_ntng.py --workdir=runs/tune_ntng --yes --workers=2
    python -m raptr_jax.compare --config=configs/tune_ntng.py --workdir=runs/tune_ntng --yes --emit=jobs/

The run config is the default BERT encoder of ``configs/bert.py`` (4 layers, d=256, built-in
corpus, batch 32 x 128) at 60 s of reference system time on the 2-core CPU reference
(``rst_tables/cpu_2core.json``; missing step kinds are timed here first). The grids are
``raptr_jax/sweep_presets.py``'s ``appendix_c("bert")``: stacking times (hours of 24 as budget
fractions), PLD's gamma_f, selective backprop's beta, RHO loss's mega-batch (2x, 4x, 10x), Lion's
LR x WD (Table 5) and Sophia-G's LR x rho, with every LR doubled (``lr_scale=2``: this model's
AdamW peak is 2e-3 where crammed BERT's is 1e-3). 41 settings, 1 tuning seed, the chosen
ones re-run with seed 1: 48 runs, about an hour on 2 CPU cores. ``results.md`` has the chosen
setting per method, ``all_settings.md`` every setting, ``tuning_<method>_60.png`` the curves.
For the paper's scale use ``configs/bert.py:crammed`` with a real corpus, ``budget.value=24``
in ``rst_hours`` and ``lr_scale=1``.
"""
from raptr_jax.sweep_presets import appendix_c

BATCH = 32


def get_comparison():
  return dict(
      config="configs/bert.py",
      common=["budget.unit=rst_seconds", "budget.rst_table=rst_tables/cpu_2core.json",
              "eval.every=0.25", "checkpoint.every=0", "log.every=5"],
      methods={"baseline": [], **appendix_c("bert", lr_scale=2.0, batch_size=BATCH)},
      seeds=[0],
      budgets=[60.0],
      selection=dict(final_seeds=[1]),
      max_runs=64,
      calibrate_missing=True,
  )
