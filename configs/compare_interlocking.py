"""Interlocking backprop against end-to-end training (Gomez et al. 2022, Figure 7 at small
size): the 12-layer GPT decoder of ``configs/gpt.py:interlocking`` in K = 4 components of 3
layers, 1-block auxiliary heads with the tied embedding as output layer, on the built-in corpus
(batch 16 x 128 tokens), under one budget of 180 seconds of reference system time (the 2-core
CPU of ``rst_tables/cpu_2core.json``). About 40 minutes on 2 CPU cores.

    python -m raptr_jax.compare --config=configs/compare_interlocking.py --workdir=runs/compare_interlocking

The RST clock charges each interlocking mode what its step takes with one component per device
(``time_model="devices"``: the Figure 2 critical path from per-component times measured at
calibration, ``methods/interlocking_time.py``), the paper's fixed-time perspective; the
baseline (the same decoder without heads, one device) is charged its measured step. The runner
writes ``loss_vs_rst_<budget>.png`` (time-wise) and ``loss_vs_steps_<budget>.png`` (step-wise),
the two panels of Figure 7; the committed output is in ``docs/compare_interlocking/``.
"""


def get_comparison():
  return dict(
      config="configs/gpt.py:interlocking",
      common=["budget.unit=rst_seconds", "budget.rst_table=rst_tables/cpu_2core.json",
              "data.batch_size=16", "schedule.peak=1e-3", "schedule.warmup=0.1", "eval.every=0.25",
              "checkpoint.every=0", "log.every=5"],
      methods={
          "baseline": ["method.name=baseline"],
          "end_to_end": ["method.interlocking.n=4"],
          "pairwise": ["method.interlocking.n=2"],
          "local": ["method.interlocking.n=1"],
      },
      seeds=[0],
      budgets=[180.0],
      calibrate_missing=True,
  )
