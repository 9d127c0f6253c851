"""Baseline, RaPTr, progressive layer dropping, layer stacking, random-LTD, selective backprop and
RHO loss on the default UL2 decoder
(4 layers, built-in corpus) under one budget of 180 seconds of reference system time, the
2-core CPU reference of ``rst_tables/cpu_2core.json`` (step kinds missing there are timed on
the current device first and scaled to the reference through the full model's train step, which
the table has). About an hour on 2 CPU cores.

    python -m raptr_jax.compare --config=configs/compare_methods.py --workdir=runs/compare_methods

Each method at its defaults: RaPTr's recommended 4-stage schedule (2-2.7-3.3-4 of 4 layers,
first and last fixed, h_sqrt scaling), PLD (theta_bar 0.5, gamma_f 100), stacking 1 -> 2 -> 4
layers at 12.5% and 30% of the budget (No Train No Gain's fractions), random-LTD on the middle
2 layers with kept length 16 -> 128 by 16 over 70% of the budget (the run's LR on the RST clock:
the LayerToken LR needs step counts an RST budget does not fix), selective backprop (beta 1,
history 5000) and RHO loss (mega-batch 2x, IL model trained for the same 180 s of RST on a 20%
holdout, built once before its run and not charged, as in NTNG), their scoring passes charged.
Writes results.md,
results.csv and loss_vs_rst_180.png in the workdir; the committed output is in
``docs/compare_methods/``.
"""


def get_comparison():
  return dict(
      config="configs/ul2.py",
      common=["budget.unit=rst_seconds", "budget.rst_table=rst_tables/cpu_2core.json",
              "eval.every=0.25", "checkpoint.every=0", "log.every=5"],
      methods={
          "baseline": [],
          "raptr": ["method.name=raptr"],
          "pld": ["method.name=pld"],
          "stacking": ["method.name=stacking"],
          "random_ltd": ["method.name=random_ltd", "method.random_ltd.lr=budget"],
          "selective_backprop": ["method.name=selective_backprop"],
          "rho_loss": ["method.name=rho_loss", "data.holdout_share=0.2", "data.resample_noise=False"],
      },
      seeds=[0],
      budgets=[180.0],
      calibrate_missing=True,
  )
