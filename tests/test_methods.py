"""The method interface: a method is a module plus a registry line; the loop, step, RST, FLOPs
and comparison modules never name one; the per-step hooks really run inside the step; the
package has no import cycles and nothing imports the command line."""
import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raptr_jax import methods
from raptr_jax import train as train_lib
from raptr_jax.methods import Method
from raptr_jax.metrics import read_metrics
from conftest import ROOT

PACKAGE = os.path.join(ROOT, "raptr_jax")
GENERIC = ("train.py", "step.py", "rst.py", "flops.py", "compare.py", "run.py", "plan.py")


def test_generic_modules_name_no_method():
  names = [n for n in methods.REGISTRY if n != "baseline"]
  for module in GENERIC:
    with open(os.path.join(PACKAGE, module)) as f:
      tree = ast.parse(f.read())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    imports = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "raptr_jax.methods"
               for a in n.names}
    for name in names:
      assert name not in strings and name not in attributes and name not in imports, (module, name)


def _imports_of(path):
  """raptr_jax modules a file imports (module level and inside functions)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("raptr_jax")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raptr_jax"):
      for a in node.names:  # "from raptr_jax import rst" imports the module raptr_jax.rst
        candidate = f"{node.module}.{a.name}"
        is_module = os.path.exists(os.path.join(ROOT, *candidate.split(".")) + ".py") or os.path.isdir(
            os.path.join(ROOT, *candidate.split(".")))
        out.add(candidate if is_module else node.module)
  return out


def test_no_import_cycles_and_the_command_line_is_the_top_of_the_house():
  graph = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        graph[module] = {m for m in _imports_of(path) if m != module}
  for module, deps in graph.items():
    assert "raptr_jax.main" not in deps, f"{module} imports the command line"
  state = {}

  def visit(module, path):
    if state.get(module) == "done":
      return
    assert state.get(module) != "active", f"import cycle: {' -> '.join(path + [module])}"
    state[module] = "active"
    for dep in sorted(graph.get(module, ())):
      # a package's __init__ importing its own submodules is not a cycle through the parent
      if not module.startswith(dep + "."):
        visit(dep, path + [module])
    state[module] = "done"

  for module in sorted(graph):
    visit(module, [])


class _Hooks(Method):
  """A toy method exercising the host-side hooks and the in-step ``transform_updates``."""
  name = "hooks"

  def lr_schedule(self, cfg, plan, lr_fn):
    return lambda t: 0.5 * lr_fn(t)

  def metrics(self, stage, fraction):
    return {"hooks/fraction": fraction}

  @staticmethod
  def transform_updates(updates, progress):
    return jax.tree.map(jnp.zeros_like, updates)


def test_every_hook_runs_where_the_interface_says(tiny_config, tmp_path, monkeypatch):
  cfg = tiny_config
  cfg.budget.value, cfg.log.every, cfg.optimizer.weight_decay, cfg.eval.at_start = 4, 1, 0.0, False
  train_lib.train(cfg, str(tmp_path / "base"))
  monkeypatch.setitem(methods.REGISTRY, "hooks", _Hooks)
  cfg.method.name = "hooks"
  run = train_lib.setup(cfg)
  state = run.init()
  from raptr_jax.data import pipeline
  batch = run.device_batch(pipeline.build_stream(cfg.data, "train", cfg.data.batch_size, 0, True).next_batch())
  before = jax.device_get(state.params)  # the step donates its input state
  after, _ = run.steps.train_step(run.plan.stages[0])(state, batch, jax.random.key(0), jnp.float32(0.5))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after.params)):  # zero updates
    np.testing.assert_array_equal(a, b)
  train_lib.train(cfg, str(tmp_path / "hooks"))
  base, hooks = read_metrics(tmp_path / "base"), read_metrics(tmp_path / "hooks")
  assert hooks[0]["train/loss"] == pytest.approx(base[0]["train/loss"], rel=1e-6)  # same first batch, params
  assert [r["lr"] for r in hooks] == pytest.approx([0.5 * r["lr"] for r in base])
  assert [r["hooks/fraction"] for r in hooks] == pytest.approx([r["progress"] for r in hooks])
  assert hooks[-1]["update_norm"] == 0.0


def test_unknown_methods_and_compositions_are_config_errors(tiny_config):
  from raptr_jax.config import validate
  tiny_config.method.name = "dropout"
  with pytest.raises(ValueError, match=r"unknown method.name 'dropout'; available: \['baseline'"):
    validate(tiny_config)
  tiny_config.method.name = "raptr+pld"
  with pytest.raises(ValueError, match="raptr does not compose with pld"):
    validate(tiny_config)
