"""Metric writers (``metrics.jsonl`` and TensorBoard) and the progress bar."""
import json
import math
import os
import time

import jax
import numpy as np
import tqdm


class MetricWriter:
  """One JSON object per logged step in WORKDIR/metrics.jsonl, mirrored to TensorBoard."""

  def __init__(self, workdir: str, tensorboard: bool, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._tb = None
    if enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        print("tensorboardX is not installed: TensorBoard logging is off (pip install tensorboardX)")

  def truncate_after(self, step: int) -> None:
    """On resume: drop rows logged after the restored step (they will be logged again)."""
    if not (self.enabled and os.path.exists(self.path)):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(rows)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else str(v)
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, float):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


class ProgressBar:
  """tqdm over the budget's unit: shows steps, loss, tokens/s and the ETA."""

  def __init__(self, budget: float, unit: str, initial: float, enabled: bool):
    self._bar = tqdm.tqdm(total=budget, initial=initial, unit=unit[:-1] if unit.endswith("s") else unit,
                          disable=not enabled, dynamic_ncols=True, unit_scale=unit != "steps",
                          bar_format="{l_bar}{bar}| {n:.4g}/{total:.4g} [{elapsed}<{remaining}{postfix}]")

  def update(self, amount: float, step: int, loss: float | None, tokens_per_s: float | None):
    post = {"step": step}
    if loss is not None:
      post["loss"] = f"{loss:.3f}"
    if tokens_per_s:
      post["tok/s"] = f"{tokens_per_s:,.0f}"
    self._bar.set_postfix(post, refresh=False)
    self._bar.update(amount)

  def write(self, text: str) -> None:
    self._bar.write(text)

  def close(self) -> None:
    self._bar.close()


class StepTimer:
  """Train-loss mean, step time, tokens/s and MFU over the steps since the last report.

  Steps that compiled are left out (``skip``), so timings are steady-state. Metrics stay on
  device until ``report`` fetches them, which keeps the loop free of per-step host syncs.
  """

  def __init__(self, peak_flops_per_s: float | None, devices: int):
    self.peak = peak_flops_per_s
    self.devices = devices
    self.reset()

  def reset(self) -> None:
    self._metrics, self._tokens, self._flops = [], 0.0, 0.0
    self._t0 = time.perf_counter()

  skip = reset  # after a compiling step: start timing afresh

  def add(self, metrics, tokens: float, flops: float) -> None:
    self._metrics.append(metrics)
    self._tokens += tokens
    self._flops += flops

  def report(self, last_loss: float) -> dict:
    dt = time.perf_counter() - self._t0
    losses = [float(m["loss"]) for m in jax.device_get(self._metrics)] or [float(last_loss)]
    row = {"train/loss": float(np.mean(losses))}
    if self._metrics:
      row |= {"step_time": dt / len(self._metrics), "tokens_per_s": self._tokens / dt}
      if self.peak:
        row["mfu"] = self._flops / dt / (self.peak * self.devices)
    self.reset()
    return row
