"""The papers' qualitative claims that a run here can test, and the committed comparison that
tests each (``claims.py`` decides them into ``docs/claims.md``:
``python -m raptr_jax.claims --out=docs/claims.md``).

Margins are in nats of validation loss: 0.02 for the claims of "no worse" / "no better" (a
difference under 0.02 nats is what these papers call matching), 0 for "ahead". A claim's
comparison must be a folder the comparison runner wrote; a claim none of the committed ones
tests says why under ``untested``.
"""

RAPTR = "RaPTr (Panigrahi et al. 2024)"
NTNG = "No Train No Gain (Kaddour et al. 2023)"
LTD = "random-LTD (Yao et al. 2022)"
INTERLOCKING = "Interlocking backprop (Gomez et al. 2022)"
MATCH = 0.02

CLAIMS = [
    dict(claim="RaPTr at equal compute is not worse than the baseline", paper=f"{RAPTR}, Sec. 4",
         comparison="docs/compare_methods", method="raptr", baseline="baseline", direction="not worse",
         margin=MATCH),
    dict(claim="RaPTr is ahead of progressive layer dropping at equal compute", paper=f"{RAPTR}, Sec. 3-4",
         comparison="docs/compare_methods", method="raptr", baseline="pld", direction="ahead"),
    dict(claim="Layer stacking is ahead of the baseline early in the budget", paper=f"{NTNG}, Sec. 4.3, Fig. 1",
         comparison="docs/compare_methods", method="stacking", baseline="baseline", direction="ahead", at=0.25,
         note="Early: each run's first evaluation at or after 25% of its RST budget."),
    dict(claim="Layer stacking (tuned) is ahead of the baseline early in the budget", paper=f"{NTNG}, Sec. 4.3",
         comparison="docs/tune_ntng", method="stacking", baseline="baseline", direction="ahead", at=0.25,
         note="docs/tune_ntng was committed before the runner wrote per-seed results: its means of a tuned "
              "method include the tuning seed its setting was chosen on (selection-biased)."),
    dict(claim="Selective backprop is not ahead of the baseline once scoring is charged",
         paper=f"{NTNG}, Sec. 5, Table 3", comparison="docs/compare_methods", method="selective_backprop",
         baseline="baseline", direction="not ahead", margin=MATCH),
    dict(claim="RHO loss is not ahead of the baseline once scoring is charged", paper=f"{NTNG}, Sec. 5, Table 3",
         comparison="docs/compare_methods", method="rho_loss", baseline="baseline", direction="not ahead",
         margin=MATCH),
    dict(claim="Selective backprop (tuned) is not ahead of the baseline once scoring is charged",
         paper=f"{NTNG}, Sec. 5, App. C.3", comparison="docs/tune_ntng", method="selective_backprop",
         baseline="baseline", direction="not ahead", margin=MATCH),
    dict(claim="RHO loss (tuned) is not ahead of the baseline once scoring is charged",
         paper=f"{NTNG}, Sec. 5, App. C.4", comparison="docs/tune_ntng", method="rho_loss", baseline="baseline",
         direction="not ahead", margin=MATCH),
    dict(claim="Lion after tuning is not ahead of AdamW", paper=f"{NTNG}, Sec. 6, App. C.5",
         comparison="docs/tune_ntng", method="lion", baseline="baseline", direction="not ahead", margin=MATCH,
         note="The baseline of docs/tune_ntng is AdamW at its default LR (untuned)."),
    dict(claim="Sophia-G after tuning is not ahead of AdamW", paper=f"{NTNG}, Sec. 6, App. C.6",
         comparison="docs/tune_ntng", method="sophia_g", baseline="baseline", direction="not ahead", margin=MATCH),
    dict(claim="Random-LTD at equal layer-tokens is not worse than the baseline", paper=f"{LTD}, Sec. 4-5",
         method="random_ltd", baseline="baseline", direction="not worse", margin=MATCH,
         untested="no committed comparison has a layer_tokens budget (docs/compare_methods charges RST "
                  "seconds); run configs/compare_methods.py with budget.unit=layer_tokens"),
    dict(claim="Random-LTD at equal time (RST) is not worse than the baseline", paper=f"{LTD}, Sec. 4 (time saved)",
         comparison="docs/compare_methods", method="random_ltd", baseline="baseline", direction="not worse",
         margin=MATCH),
    dict(claim="Interlocking 2-wise is ahead of end-to-end training at equal time",
         paper=f"{INTERLOCKING}, Sec. 4.3, Fig. 7", comparison="docs/compare_interlocking", method="pairwise",
         baseline="end_to_end", direction="ahead",
         note="Interlocking modes are charged their modelled step on 4 devices (methods/interlocking_time.py)."),
    dict(claim="Interlocking local (1-wise) is ahead of end-to-end training at equal time",
         paper=f"{INTERLOCKING}, Fig. 7", comparison="docs/compare_interlocking", method="local",
         baseline="end_to_end", direction="ahead"),
]
