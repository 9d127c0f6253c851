"""Tuned comparisons: grid / random-search expansion and names, best-setting selection, parallel
workers, a killed sweep that resumes, bad sweep configs."""
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from raptr_jax import compare, sweep
from raptr_jax.metrics import read_metrics
from raptr_jax.sweep_presets import appendix_c
from conftest import ROOT


def test_grids_expand_to_named_settings_and_searches_draw_reproducibly():
  s = sweep.method_settings("lion", {"overrides": ["optimizer.name=lion"],
                                     "grid": {"schedule.peak": [1e-4, 3e-4], "optimizer.weight_decay": [0.03, 0.1]}})
  assert [x.name for x in s] == ["peak=0.0001,weight_decay=0.03", "peak=0.0001,weight_decay=0.1",
                                 "peak=0.0003,weight_decay=0.03", "peak=0.0003,weight_decay=0.1"]
  assert s[3].overrides == ("optimizer.name=lion", "schedule.peak=0.0003", "optimizer.weight_decay=0.1")
  same_last = sweep.method_settings("m", {"grid": {"optimizer.b1": [0.9], "method.x.b1": [1]}})
  assert same_last[0].name == "optimizer.b1=0.9,method.x.b1=1"  # two keys end in b1: full keys
  tuples = sweep.method_settings("stacking", {"grid": {"method.stacking.grow_at": [(0.1, 0.3)]}})
  assert tuples[0].name == "grow_at=0.1-0.3" and tuples[0].overrides == ("method.stacking.grow_at=(0.1, 0.3)",)
  search = {"grid": {"optimizer.rho": [0.01, 0.05]},
            "search": {"schedule.peak": ("log_uniform", 1e-4, 1e-2), "optimizer.b2": ("uniform", 0.9, 0.99),
                       "log.every": ("int", 1, 3), "optimizer.name": ("choice", ["lion", "adamw"])},
            "draws": 5, "search_seed": 3}
  a, b = sweep.method_settings("x", search), sweep.method_settings("x", search)
  assert [x.values for x in a] == [x.values for x in b] and len(a) == 10  # 2 grid points x 5 draws
  for x in a:
    v = dict(x.values)
    assert 1e-4 <= v["schedule.peak"] <= 1e-2 and v["schedule.peak"] == float(f"{v['schedule.peak']:.3g}")
    assert 0.9 <= v["optimizer.b2"] <= 0.99 and v["log.every"] in (1, 2, 3) and v["optimizer.name"] in ("lion", "adamw")
  peaks = [math.log10(dict(x.values)["schedule.peak"]) for x in a[:5]]
  assert max(peaks) - min(peaks) > 0.5  # spread over the decades, not bunched at the top
  assert sweep.method_settings("base", ["optimizer.name=lion"])[0].name == ""
  spec = compare.RunSpec(60.0, s[0], 2)
  assert spec.key == "budget_60/lion/peak=0.0001,weight_decay=0.03/seed_2"
  assert compare.RunSpec(60.0, sweep.method_settings("base", [])[0], 0).key == "budget_60/base/seed_0"


def test_appendix_c_presets_hold_the_papers_grids():
  bert, t5 = appendix_c("bert"), appendix_c("t5", batch_size=144)
  assert bert["stacking"]["grid"]["method.stacking.grow_at"] == [(0.1, 0.3), (0.125, 0.3), (0.3, 0.4)]
  assert bert["selective_backprop"]["grid"]["method.selective_backprop.scale"] == [1.0, 2.0, 3.0]
  assert bert["lion"]["grid"] == {"schedule.peak": [1e-4, 3e-4, 5e-4, 7e-4], "optimizer.weight_decay": [0.03, 0.05, 0.07, 0.1]}
  assert t5["lion"]["grid"] == {"schedule.peak": [5e-4, 7.5e-4, 1e-3, 2.5e-3, 5e-3, 2e-2]}
  assert "optimizer.weight_decay=0.0" in t5["lion"]["overrides"] and "optimizer.rms_scaling=True" in t5["lion"]["overrides"]
  assert t5["sophia_g"]["grid"]["optimizer.rho"] == [0.05, 0.01]
  assert t5["rho_loss"]["grid"]["method.rho_loss.mega_batch"] == [288, 576, 1440]
  assert t5["pld"]["grid"]["schedule.peak"] == [1e-2, 2e-2]
  assert appendix_c("bert", lr_scale=2.0)["lion"]["grid"]["schedule.peak"] == [2e-4, 6e-4, 1e-3, 1.4e-3]
  assert len(sweep.expand(bert)) == 3 + 3 + 3 + 1 + 16 + 12


def test_best_settings_are_chosen_by_mean_validation_loss_and_tabled(tmp_path):
  s = sweep.method_settings("lion", {"grid": {"schedule.peak": [1e-4, 3e-4, 7e-4]}})
  base = sweep.method_settings("baseline", [])
  results = {  # (train, val, extra sets) per seed
      (60.0, s[0]): [(5.0, 6.0, {}), (5.0, 6.4, {})],   # mean val 6.2
      (60.0, s[1]): [(4.0, 6.1, {}), (4.2, 6.2, {})],   # mean val 6.15: best at 60
      (60.0, s[2]): [(4.0, 6.15, {}), (4.0, 6.15, {})],  # 6.15 too: a tie, the earlier one wins
      (60.0, base[0]): [(5.5, 6.5, {})],
      (120.0, s[0]): [(3.0, 5.0, {})], (120.0, s[1]): [(3.0, 5.2, {})], (120.0, s[2]): [(3.0, 4.9, {})],
  }
  best = sweep.select_best(results, base + s)
  assert best == {(60.0, "lion"): s[1], (60.0, "baseline"): base[0], (120.0, "lion"): s[2]}
  chosen = {(60.0, "baseline"): results[(60.0, base[0])], (60.0, "lion"): results[(60.0, s[1])]}
  text = compare.write_tables(chosen, str(tmp_path), "rst_seconds", {k: v.name for k, v in best.items()},
                              tried={"lion": 3, "baseline": 1})
  assert ("| budget (rst_seconds) | method | chosen setting | settings tried | seeds | final train loss | "
          "final validation loss | validation loss vs baseline (paired) |") in text
  # 2 seeds: mean +- 12.706 * s / sqrt(2) (s = 0.1414 and 0.0707); vs the baseline's one seed: no interval
  assert ("| 60 | lion | peak=0.0003 | 3 | 2 | 4.1000 [2.8294, 5.3706] | 6.1500 [5.5147, 6.7853] | "
          "-0.4000 (n=1, no interval) undecided |") in text
  assert "| 60 | baseline | - | 1 | 1 |" in text
  table = compare.write_settings_table(results, str(tmp_path), "rst_seconds")
  lines = [l for l in table.splitlines() if "| lion |" in l]
  assert [l.split(" | ")[2] for l in lines] == ["peak=0.0003", "peak=0.0007", "peak=0.0001", "peak=0.0007",
                                              "peak=0.0001", "peak=0.0003"]  # best first, per budget


def _comparison(tmp_path, name="cmp.py", methods=None, **extra):
  methods = methods or {"adamw": ["optimizer.name=adamw"],
                        "lion": {"overrides": ["optimizer.name=lion"], "grid": {"schedule.peak": [3e-4, 1e-3]}}}
  body = dict(config="configs/ul2.py:tiny",
              common=["budget.unit=rst_seconds", f"budget.rst_table={tmp_path / 'table.json'}", "eval.every=0.5",
                      "log.every=2", "log.tensorboard=False", "checkpoint.every=4"],
              methods=methods, seeds=[0], budgets=[0.4]) | extra
  path = tmp_path / name
  path.write_text(f"def get_comparison():\n  return {body!r}\n")
  return str(path)


def _finals(workdir, comparison):
  return {s.key: [r.get("train/loss") for r in read_metrics(os.path.join(workdir, s.key))]
          for s in compare.tuning_runs(compare.load_comparison(comparison))}


def test_two_parallel_workers_give_the_results_of_one_and_a_killed_sweep_resumes(tmp_path):
  path = _comparison(tmp_path, selection={"final_seeds": [1]})
  one = str(tmp_path / "one")
  compare.main([f"--config={path}", f"--workdir={one}"])  # calibrates the table, then in this process
  two = str(tmp_path / "two")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "raptr_jax.compare", f"--config={path}", f"--workdir={two}",
                        "--workers=2", "--platform=cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "worker 1:" in out.stdout  # two at once
  assert _finals(one, path) == _finals(two, path)  # the same charges from the table: the same runs
  assert open(os.path.join(one, "results.md")).read() == open(os.path.join(two, "results.md")).read()
  assert "chosen setting" in open(os.path.join(two, "results.md")).read()
  assert os.path.exists(os.path.join(two, "all_settings.md")) and os.path.exists(os.path.join(two, "tuning_lion_0.4.png"))
  best = [l for l in open(os.path.join(two, "results.md")).read().splitlines() if "| lion |" in l][0]
  assert "| 2 | 1 |" in best  # 2 settings tried; the chosen one reported on its fresh final seed only
  # A sweep killed (SIGKILL) while its workers train: they stop with it (checkpointing); the same
  # command then finishes the sweep with the results of the uninterrupted one.
  three = str(tmp_path / "three")
  proc = subprocess.Popen([sys.executable, "-m", "raptr_jax.compare", f"--config={path}", f"--workdir={three}",
                           "--workers=2", "--platform=cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  started = 0
  for line in proc.stdout:
    started += "== worker" in line and "(pid" in line
    if started == 2:
      break
  time.sleep(4)
  proc.kill()
  proc.wait()
  for _ in range(300):  # the orphaned workers got SIGTERM and are writing their checkpoints
    busy = subprocess.run(["pgrep", "-f", "--", f"--workdir={three}"], capture_output=True, text=True).stdout.split()
    if not busy:
      break
    time.sleep(0.2)
  assert not busy
  out = subprocess.run([sys.executable, "-m", "raptr_jax.compare", f"--config={path}", f"--workdir={three}",
                        "--workers=2", "--platform=cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  assert _finals(one, path) == _finals(three, path)


def test_emit_writes_one_command_per_pending_run_and_a_worker_runs_one(tmp_path):
  path = _comparison(tmp_path, budgets=[0.2])
  workdir, jobs = str(tmp_path / "w"), str(tmp_path / "jobs")
  compare.main([f"--config={path}", f"--workdir={workdir}", f"--emit={jobs}"])
  lines = open(os.path.join(jobs, "tune", "runs.txt")).read().splitlines()
  assert len(lines) == 3 and all("--only=budget_0.2/" in l for l in lines)
  assert "#SBATCH --array=0-2" in open(os.path.join(jobs, "tune", "slurm.sbatch")).read()
  import shlex
  out = subprocess.run(shlex.split(lines[1]), cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  compare.main([f"--config={path}", f"--workdir={workdir}", f"--emit={jobs}"])  # only the other two now
  assert len(open(os.path.join(jobs, "tune", "runs.txt")).read().splitlines()) == 2


def test_bad_sweeps_are_refused_before_any_run_starts(tmp_path):
  bad_key = _comparison(tmp_path, "k.py", methods={"lion": {"grid": {"optimizer.lr": [1e-3]}}})
  with pytest.raises(ValueError, match=r"lion \(lr=0.001\).*unknown config field 'optimizer.lr'"):
    compare.run_all(compare.load_comparison(bad_key), str(tmp_path / "k"))
  assert not os.path.exists(tmp_path / "k")
  with pytest.raises(ValueError, match="grid 'schedule.peak' has no values"):
    compare.load_comparison(_comparison(tmp_path, "e.py", methods={"a": {"grid": {"schedule.peak": []}}}))
  big = _comparison(tmp_path, "big.py", methods={"a": {"grid": {"schedule.peak": [1e-3, 2e-3, 3e-3]}}}, max_runs=2)
  with pytest.raises(ValueError, match="makes 3 runs, more than max_runs=2; pass --yes"):
    compare.run_all(compare.load_comparison(big), str(tmp_path / "big"))
  dup = tmp_path / "dup.py"
  dup.write_text(textwrap.dedent("""
      def get_comparison():
        return dict(config="configs/ul2.py:tiny", seeds=[0], budgets=[1],
                    methods={"lion": ["optimizer.name=lion"], "adamw": [], "lion": []})
      """))
  with pytest.raises(ValueError, match=r"dup.py:4: 'lion' is given twice in one dict"):
    compare.load_comparison(str(dup))
  for spec, match in [({"grid": {}, "draws": 2}, "draws=2 without a search"),
                      ({"search": {"x.y": ("gauss", 0, 1)}}, "kind in"),
                      ({"search": {"x.y": ("log_uniform", 0.0, 1.0)}}, "lo > 0"),
                      ({"overides": []}, "unknown keys"), ("optimizer.name=lion", "list of overrides")]:
    with pytest.raises(ValueError, match=match):
      sweep.method_settings("m", spec)


def test_worker_environments_give_each_worker_its_own_devices():
  cpu = sweep.worker_env("cpu", 1, 4, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"})
  assert cpu["JAX_PLATFORMS"] == "cpu" and cpu["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
  assert sweep.worker_env("gpu", 2, 2, {})["CUDA_VISIBLE_DEVICES"] == "4,5"
  tpu = sweep.worker_env("tpu", 3, 1, {})
  assert tpu["TPU_VISIBLE_CHIPS"] == "3" and tpu["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,1,1"
  with pytest.raises(ValueError, match="1, 2 or 4 chips"):
    sweep.worker_env("tpu", 0, 3, {})


def test_a_diverged_setting_ranks_last_and_every_final_run_is_a_worker_job(tmp_path, monkeypatch, capsys):
  from raptr_jax import train as train_lib
  path = _comparison(tmp_path, budgets=[0.2], selection={"final_seeds": [1]})
  comparison = compare.load_comparison(path)
  keys = set(compare.every_run(comparison))
  for s in comparison.settings:  # a worker can run any setting's final seed, chosen or not
    assert compare.RunSpec(0.2, s, 1).key in keys
  real = train_lib.train

  def diverging(cfg, where):
    if cfg.schedule.peak == 1e-3 and cfg.optimizer.name == "lion":
      raise train_lib.TrainingError("non-finite training metrics {'loss': nan} at step 3 (10% of the budget)")
    return real(cfg, where)

  monkeypatch.setattr(train_lib, "train", diverging)
  workdir = str(tmp_path / "w")
  compare.main([f"--config={path}", f"--workdir={workdir}"])
  out = capsys.readouterr().out
  assert "diverged, counted as an infinite loss" in out
  settings = open(os.path.join(workdir, "all_settings.md")).read()
  lion = [l for l in settings.splitlines() if "| lion |" in l]
  assert "peak=0.0003" in lion[0] and "peak=0.001" in lion[1] and "diverged" in lion[1]  # last
  assert "| lion | peak=0.0003 | 2 | 1 |" in open(os.path.join(workdir, "results.md")).read()  # fresh seed 1 only
  compare.main([f"--config={path}", f"--workdir={workdir}"])  # a diverged run is finished: not re-run
  assert "budget_0.2/lion/peak=0.001/seed_0: already complete" in capsys.readouterr().out
