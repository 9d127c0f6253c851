import math
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from raptr_jax import config as config_lib
from raptr_jax import plan as plan_lib
from raptr_jax import run as run_lib
from raptr_jax import train as train_lib
from raptr_jax.metrics import read_metrics
from raptr_jax.models import LayerSelection, Selection
from conftest import ROOT, load_config, quiet, register_method


@pytest.mark.parametrize("family_config", ["ul2", "bert", "t5"])
def test_resumed_run_reaches_the_losses_of_an_uninterrupted_one(family_config, tiny_config, tmp_path):
  cfg = tiny_config if family_config == "ul2" else quiet(load_config(family_config, "tiny"))
  cfg.budget.value, cfg.checkpoint.every, cfg.log.every, cfg.eval.every = 12, 4, 1, 0.5
  train_lib.train(cfg, str(tmp_path / "straight"))
  cfg.train.stop_at_step = 6  # "killed" after step 6: steps 5 and 6 are lost, step 4 is saved
  out = train_lib.train(cfg, str(tmp_path / "killed"))
  assert out["stopped"] and out["step"] == 6
  cfg.train.stop_at_step = 0
  train_lib.train(cfg, str(tmp_path / "killed"))
  straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
  assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(0, 13))
  for a, b in zip(straight, resumed):
    for key in ("train/loss", "lr", "grad_norm", "eval/loss"):
      assert (key in a) == (key in b)
      if key in a:
        assert a[key] == b[key], (a["step"], key)


def test_default_objective_learns_and_metrics_have_the_promised_fields(tiny_config, tmp_path):
  cfg = tiny_config
  cfg.budget.value, cfg.eval.every = 40, 0.25
  out = train_lib.train(cfg, str(tmp_path))
  rows = read_metrics(tmp_path)
  evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
  assert len(evals) == 5 and rows[0]["step"] == 0
  assert abs(evals[0] - math.log(8192)) < 0.5  # an untrained model is near uniform
  assert evals[-1] < evals[1] < evals[0] and evals[-1] < 0.85 * evals[0]
  for key in ("step", "progress", "train/loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time"):
    assert key in rows[-1], key
  assert rows[-1]["progress"] == pytest.approx(1.0)
  assert rows[-1]["tokens"] == 40 * cfg.data.batch_size * cfg.data.seq_len
  assert out["step"] == 40


def test_tokens_budget_stops_at_the_budget(tiny_config, tmp_path):
  cfg = tiny_config
  per_step = cfg.data.batch_size * cfg.data.seq_len
  cfg.budget.unit, cfg.budget.value = "tokens", 7.5 * per_step
  out = train_lib.train(cfg, str(tmp_path))
  assert out["step"] == 8
  rows = read_metrics(tmp_path)
  assert rows[-1]["progress_units"] == 8 * per_step


def test_each_stage_shape_compiles_once_and_stages_switch_on_the_clock(tiny_config, tmp_path, monkeypatch):
  traces = []

  def half_depth(key, batch, progress):
    traces.append("half")
    return Selection(layers=LayerSelection(jnp.array([1], jnp.int32), jnp.ones(1)))

  def two_stages(cfg):
    return (plan_lib.Stage("half", 0.5, shape=("layers", 1), select=half_depth, active_layers=1),
            plan_lib.Stage("full", 1.0))

  register_method(monkeypatch, "two_stages", two_stages)
  cfg = tiny_config
  cfg.method.name = "two_stages"
  cfg.budget.value, cfg.log.every = 10, 1
  train_lib.train(cfg, str(tmp_path))
  rows = read_metrics(tmp_path)[1:]
  assert [r["stage"] for r in rows] == [0] * 5 + [1] * 5
  assert traces == ["half"]  # traced (compiled) once for the whole stage


def test_nan_stops_with_advice_and_the_run_resumes_from_a_good_checkpoint(tiny_config, tmp_path, monkeypatch):
  def lr_that_breaks(t, **kwargs):
    return jnp.where(t > 0.35, jnp.nan, 1e-3)

  monkeypatch.setattr(run_lib, "learning_rate", lr_that_breaks)
  cfg = tiny_config
  cfg.budget.value, cfg.checkpoint.every, cfg.log.every = 10, 1, 5
  with pytest.raises(train_lib.TrainingError, match="non-finite.*step 5.*latest: step 4.*schedule.peak"):
    train_lib.train(cfg, str(tmp_path))
  saved = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
  assert saved[-1] == 4
  monkeypatch.undo()
  out = train_lib.train(cfg, str(tmp_path))  # resumes from step 4 with a sane schedule
  assert out["step"] == 10 and math.isfinite(out["train/loss"])


def test_config_validation_names_the_field():
  cfg = config_lib.base_config()
  cfg.model.dmodel = 3
  with pytest.raises(ValueError, match="unknown config field 'model.dmodel'"):
    config_lib.validate(cfg)
  for field, value, match in [("budget.value", 0, "positive"), ("budget.unit", "hours", "budget.unit"),
                              ("optimizer.name", "sgd", "optimizer.name"), ("eval.every", 2, "eval.every")]:
    cfg = config_lib.base_config()
    section, key = field.split(".")
    cfg[section][key] = value
    with pytest.raises(ValueError, match=match):
      config_lib.validate(cfg)


def _main(*args, devices=1):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "raptr_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_clear_line(tmp_path):
  out = _main("--config=configs/ul2.py:tiny", f"--workdir={tmp_path}", "--config.modle.d_model=3")
  assert out.returncode != 0 and 'Did you mean "model"' in out.stderr and "Traceback" not in out.stderr
  out = _main("--config=configs/ul2.py:tiny", f"--workdir={tmp_path}", "--config.mesh.data=8",
              "--config.data.batch_size=4", devices=8)
  assert out.returncode != 0 and "not divisible by the data-parallel size 8" in out.stderr
  assert "Traceback" not in out.stderr
  out = _main("--config=configs/ul2.py:huge", f"--workdir={tmp_path}")
  assert out.returncode != 0 and "unknown preset 'huge'" in out.stderr and "Traceback" not in out.stderr
  out = _main("--config=configs/nope.py", f"--workdir={tmp_path}")
  assert out.returncode != 0 and "config file 'configs/nope.py' not found" in out.stderr and "ul2.py" in out.stderr
  assert "Traceback" not in out.stderr
  out = _main("--config=configs/ul2.py:tiny", f"--workdir={tmp_path}", "--config.data.vocab_path=setup.py")
  assert out.returncode != 0 and "data.vocab_path='setup.py' is not a SentencePiece model" in out.stderr
  assert "Traceback" not in out.stderr
  out = _main("--config=configs/ul2.py:tiny", f"--workdir={tmp_path}", "--config.method.name=raptr",
              "--config.method.raptr.fixed=(0, 9)")
  assert out.returncode != 0 and "layer 9 is outside the 2-layer model" in out.stderr and "Traceback" not in out.stderr


def test_raptr_runs_on_the_default_and_tiny_models_and_wraps_no_fixed_layer():
  from raptr_jax.methods.raptr import build_schedule
  for preset, layers in (("", 4), ("tiny", 2)):
    cfg = load_config("ul2", preset)
    cfg.method.name = "raptr"
    config_lib.validate(cfg)
    stages = run_lib.build_plan(cfg).stages
    assert len(stages) == 4 and stages[-1].select is None, (preset, stages)  # ends on the full model
  assert build_schedule(4, fixed=(0, -1))[0].fixed == (0, 3)
  with pytest.raises(ValueError, match="layer 4 is outside the 4-layer model"):
    build_schedule(4, fixed=(0, 4))


def test_profile_steps_write_a_trace_into_the_workdir(tiny_config, tmp_path):
  """log.profile_steps=(2, 3): a jax.profiler trace of those steps (TensorBoard's xplane and
  Perfetto's trace.json.gz) under WORKDIR/profile; a malformed range is refused at once."""
  import glob
  from raptr_jax import config as config_lib
  from raptr_jax import train as train_lib
  cfg = tiny_config
  cfg.budget.value = 4
  cfg.log.profile_steps = (2, 3)
  train_lib.train(cfg, str(tmp_path / "w"))
  runs = glob.glob(str(tmp_path / "w" / "profile" / "plugins" / "profile" / "*"))
  assert len(runs) == 1
  assert glob.glob(os.path.join(runs[0], "*.xplane.pb")) and glob.glob(os.path.join(runs[0], "*.trace.json.gz"))
  cfg.log.profile_steps = (3, 2)
  with pytest.raises(ValueError, match="log.profile_steps"):
    config_lib.validate(cfg)
