"""The polynomial experiment (RaPTr Section 3 / D.3): target, component error, and a tiny run."""
import itertools
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from raptr_jax.experiments import polynomial
from raptr_jax.config import import_config

CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "polynomial.py")


def test_component_error_is_zero_for_the_target_and_one_for_zero_on_the_whole_cube():
  target = polynomial.make_target(0, relevant=6, max_degree=4, per_degree=3)
  x = jnp.asarray(list(itertools.product([-1.0, 1.0], repeat=6)))  # all of {-1, 1}^6: exact expectations
  assert float(jnp.mean(target(x) ** 2)) == pytest.approx(1.0, rel=1e-5)  # normalised label
  np.testing.assert_allclose(polynomial.component_errors(target(x), target, x), 0.0, atol=1e-10)
  np.testing.assert_allclose(polynomial.component_errors(jnp.zeros(len(x)), target, x), 1.0, rtol=1e-6)
  # Each degree holds distinct monomials of exactly that degree.
  for l in range(1, 5):
    monomials = {tuple(s[s >= 0]) for s in target.subsets[l - 1]}
    assert len(monomials) == 3 and all(len(m) == l for m in monomials)


def test_too_many_monomials_per_degree_is_an_error():
  with pytest.raises(ValueError, match="distinct"):
    polynomial.make_target(0, relevant=4, max_degree=4, per_degree=2)


def test_tiny_run_writes_table_and_plot_with_the_methods_flops(tmp_path):
  cfg = import_config(CONFIG + ":tiny")
  results = polynomial.run(cfg, str(tmp_path), log=lambda *_: None)
  by = {r["method"]: r for r in results}
  assert by["baseline"]["relative_layer_flops"] == 1.0
  assert by["raptr"]["relative_layer_flops"] == pytest.approx(6.5 / 8, abs=0.01)  # target average 6.5 of 8
  assert 0.75 < by["pld"]["relative_layer_flops"] < 0.95
  assert len(by["raptr"]["stage_ends"]) == 2
  for r in results:
    assert len(r["curve"]["degree_error"][-1]) == 4 and np.isfinite(r["curve"]["eval_loss"][-1])
    assert r["curve"]["eval_loss"][-1] < r["curve"]["eval_loss"][0] * 1.05
  assert json.load(open(tmp_path / "results.json"))["config"]["methods"] == ["baseline", "raptr", "pld"]
  table = open(tmp_path / "table.md").read()
  assert table.count("\n") == 5 and "| raptr |" in table
  assert os.path.exists(tmp_path / "polynomial.png")
