"""The built-in small comparison: AdamW, Lion and Sophia-G on the default UL2 decoder, at one
budget of 60 seconds of reference system time, 2 seeds each (about 8 minutes on 2 CPU cores).

    python -m raptr_jax.compare --config=configs/compare_small.py --workdir=runs/compare_small

The reference system is the 2-core CPU whose calibration is committed in
``rst_tables/cpu_2core.json`` (missing step kinds are calibrated on the current device).
"""


def get_comparison():
  return dict(
      config="configs/ul2.py",
      common=["budget.unit=rst_seconds", "budget.rst_table=rst_tables/cpu_2core.json",
              "eval.every=0.25", "checkpoint.every=0", "log.every=5"],
      methods={
          "adamw": ["optimizer.name=adamw"],
          "lion": ["optimizer.name=lion", "schedule.peak=1e-3", "optimizer.weight_decay=0.3"],
          "sophia_g": ["optimizer.name=sophia_g", "optimizer.rho=0.05", "optimizer.weight_decay=0.2"],
      },
      seeds=[0, 1],
      budgets=[60.0],
      calibrate_missing=True,
  )
