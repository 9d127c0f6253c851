"""Gradient accumulation (train.microbatches): the accumulated step is the un-accumulated step,
for every family and for methods whose selections act on layers, tokens or per-step draws."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raptr_jax import config as config_lib
from raptr_jax import run as run_lib
from raptr_jax.data import pipeline
from raptr_jax.models.selection import Selection, TokenSelection, selection_rows
from raptr_jax.step import split_microbatches
from conftest import load_config, quiet

CASES = {
    "ul2": ("ul2", []),
    "bert": ("bert", []),
    "t5": ("t5", []),
    "raptr": ("ul2", ["method.name=raptr", "model.num_layers=4"]),
    "pld": ("ul2", ["method.name=pld", "model.num_layers=4"]),
    "random_ltd": ("ul2", ["method.name=random_ltd", "model.num_layers=4"]),
    "t5_random_ltd": ("t5", ["method.name=random_ltd", "method.random_ltd.layers='1'", "method.random_ltd.stacks=both"]),
}


def _step(name, microbatches):
  family, overrides = CASES[name]
  cfg = quiet(load_config(family, "tiny"))
  # eps 1: Adam's first step is ~g / (|g| + 1), linear in g, so float noise is not amplified to sign flips.
  # float32 compute: bf16 activations summed in another order differ by ~0.5% of an update.
  cfg = config_lib.apply_overrides(cfg, [*overrides, "optimizer.eps=1.0", "model.dtype=float32",
                                         f"train.microbatches={microbatches}"])
  run = run_lib.setup(cfg)
  stream = pipeline.build_stream(cfg.data, "train", cfg.data.batch_size, cfg.seed, train=True)
  batch = run.device_batch(stream.next_batch())
  state = run.init()
  new, metrics = run.steps.train_step(run.plan.stages[0])(state, batch, jax.random.key(7), jnp.float32(0.1))
  return jax.tree.map(np.asarray, run.init().params), jax.tree.map(np.asarray, new.params), jax.device_get(metrics)


@pytest.mark.parametrize("name", sorted(CASES))
def test_accumulated_step_equals_the_full_batch_step(name):
  before, full, full_metrics = _step(name, 1)
  _, micro, micro_metrics = _step(name, 4)  # batch 8: 4 microbatches of 2 rows
  for key in ("loss", "grad_norm", "update_norm", "loss_tokens"):
    np.testing.assert_allclose(micro_metrics[key], full_metrics[key], rtol=2e-5, err_msg=key)
  updates = jax.tree.map(lambda a, b: a - b, full, before)
  scale = max(float(np.max(np.abs(u))) for u in jax.tree.leaves(updates))
  assert scale > 0
  for path, a, b in zip(jax.tree_util.tree_flatten_with_path(full)[0], jax.tree.leaves(full), jax.tree.leaves(micro)):
    np.testing.assert_allclose(b, a, atol=1e-4 * scale, rtol=0, err_msg=jax.tree_util.keystr(path[0]))


def test_microbatches_are_strided_rows_and_token_draws_follow_them():
  batch = {"x": jnp.arange(8 * 3).reshape(8, 3)}
  parts = split_microbatches(batch, 4, run_lib.shd.make_mesh(config_lib.base_config().mesh))
  np.testing.assert_array_equal(parts["x"][1], batch["x"][1::4])
  indices = jnp.arange(2 * 8 * 3).reshape(2, 8, 3)  # [layers, B, r]
  sel = Selection(tokens=TokenSelection(indices))
  np.testing.assert_array_equal(selection_rows(sel, 3, 4).tokens.indices, indices[:, 3::4])
  assert selection_rows(Selection(), 1, 4) == Selection() and selection_rows(None, 0, 2) is None


@pytest.mark.parametrize("value,match", [
    (3, r"train.microbatches=3 must be a positive integer that divides data.batch_size=8.*train.microbatches=8"),
    (0, "must be a positive integer"),
])
def test_microbatches_that_do_not_divide_the_batch_are_config_errors(value, match):
  cfg = load_config("ul2", "tiny")
  cfg.train.microbatches = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(cfg)
