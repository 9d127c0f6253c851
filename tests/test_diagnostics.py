"""Stability diagnostics (Section 5): norms, Psi_l and the loss gap against explicit computations."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_config, quiet
from raptr_jax import diagnostics
from raptr_jax import train as train_lib
from raptr_jax.data import pipeline
from raptr_jax.models import layers
from raptr_jax.models.selection import LayerSelection, Selection


def _setup(cfg, num_layers=3):
  cfg.model.update(num_layers=num_layers, dtype="float32")
  run = train_lib.setup(cfg)
  val = pipeline.build_stream(cfg.data, "validation", cfg.data.batch_size, cfg.seed, train=False)
  return run, run.init().params, [val.next_batch()]


def test_norms_psi_and_loss_gap_match_an_explicit_forward(tiny_config):
  run, params, batches = _setup(tiny_config)
  result = diagnostics.stability(run, params, batches)
  b = {k: jnp.asarray(v) for k, v in batches[0].items()}
  cfg, L = run.model_cfg, 3
  mask = layers.attention_mask(b["segment_ids"], b["prefix"], causal=True)
  tokens = np.asarray(b["segment_ids"] > 0)

  def stack_outputs(skip=None):
    x = jnp.take(params["embedding"], b["inputs"], axis=0)
    ys = [x]
    for i in range(L):
      if i != skip:
        x = layers.block({k: v[i] for k, v in params["layers"].items()}, x, b["positions"], mask, jnp.float32(1), cfg)
      ys.append(x)
    return ys

  token_norm = lambda y: float(np.linalg.norm(np.asarray(y), axis=-1)[tokens].mean())
  ys = stack_outputs()
  np.testing.assert_allclose(result["norm"], [token_norm(y) for y in ys], rtol=1e-4)
  psi = [token_norm(stack_outputs(skip=l)[-1] - ys[-1]) for l in range(L)]
  np.testing.assert_allclose(result["psi"], psi, rtol=1e-4)
  np.testing.assert_allclose(result["psi_ratio"], np.asarray(psi) / psi[0], rtol=1e-4)
  model = nnx.merge(run.steps.ctx.graphdef, params)
  loss_of = lambda sel: float(run.steps.ctx.loss_fn(model, b, sel)[0])
  drops = [loss_of(Selection(LayerSelection(jnp.asarray(np.delete(np.arange(L), l), jnp.int32), jnp.ones(L - 1))))
           for l in range(L)]
  np.testing.assert_allclose(result["loss_drop"], drops, rtol=1e-5)
  assert result["loss_gap"] == pytest.approx(loss_of(None) - np.mean(drops), abs=1e-5)


def test_t5_diagnostics_report_the_decoder_stack():
  cfg = quiet(load_config("t5", "tiny"))
  run, params, batches = _setup(cfg, num_layers=2)
  result = diagnostics.stability(run, params, batches, scaling="sqrt")
  assert result["stack"] == "decoder_layers" and len(result["norm"]) == 3 and len(result["psi"]) == 2
  assert all(np.isfinite(result["loss_drop"])) and min(result["psi"]) > 0


def test_command_reads_the_latest_checkpoint_and_writes_its_outputs(tiny_config, tmp_path, capsys):
  cfg = tiny_config
  cfg.budget.value = 6
  train_lib.train(cfg, str(tmp_path))
  config = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "ul2.py:tiny")
  diagnostics.main([f"--config={config}", f"--workdir={tmp_path}", "--batches=1", "budget.value=6"])
  out = capsys.readouterr().out
  assert "loss gap" in out and "checkpoints/6" in out
  result = json.load(open(tmp_path / "diagnostics.json"))
  assert result["step"] == 6 and len(result["psi"]) == cfg.model.num_layers
  assert os.path.exists(tmp_path / "stability.png")
  with pytest.raises(SystemExit, match="no checkpoint"):
    diagnostics.main([f"--config={config}", f"--workdir={tmp_path / 'none'}"])
