"""Runs the notebooks headlessly, top to bottom, and saves them with their outputs.

    python notebooks/execute.py                        # every notebook here, saved in place
    python notebooks/execute.py quickstart.ipynb       # one (a path or a name in notebooks/)
    python notebooks/execute.py --no-save              # run only: fails on the first cell error

Each notebook runs in a fresh Jupyter kernel (nbclient) with its working directory in
``notebooks/``, at the parameters of its cell tagged ``parameters``; its workdir under ``runs/``
is emptied first so the saved outputs are those of a whole run. ``tests/test_notebooks.py`` runs
the same ``execute`` with the workdir redirected into a temporary folder (papermill's
convention: a cell tagged ``injected-parameters`` after the parameters cell).
"""
import argparse
import glob
import os
import shutil
import sys

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def notebooks() -> list[str]:
  return sorted(glob.glob(os.path.join(HERE, "*.ipynb")))


def parameters(nb) -> dict:
  """The parameters cell's assignments, evaluated (the defaults a run uses)."""
  values = {}
  for cell in nb.cells:
    if "parameters" in cell.metadata.get("tags", []):
      exec(cell.source, {}, values)  # pylint: disable=exec-used  (our own notebooks' literals)
      return values
  raise ValueError("the notebook has no cell tagged 'parameters'")


def inject(nb, values: dict) -> None:
  """Adds a cell after the parameters cell that sets ``values`` (papermill's convention)."""
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  source = "# Parameters set by the executor\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
  cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(index + 1, cell)


def execute(path: str, values: dict | None = None, save: str | None = None, timeout: int = 600,
            fresh: bool = True):
  """Runs ``path`` (with ``values`` injected) and returns the executed notebook; ``save`` writes it
  there. Raises ``nbclient.exceptions.CellExecutionError`` (the cell, the traceback) on an error.
  ``fresh``: remove the notebook's WORKDIR / OUT first when it is a folder under the repository's
  ``runs/`` (elsewhere, e.g. a test's temporary folder, it is left as it is)."""
  nb = nbformat.read(path, as_version=4)
  if values:
    inject(nb, values)
  if fresh:
    settings = parameters(nb) | (values or {})
    for key in ("WORKDIR", "OUT"):
      if key in settings:
        where, runs = os.path.abspath(os.path.join(REPO, settings[key])), os.path.join(REPO, "runs")
        if os.path.isdir(where) and os.path.commonpath([where, runs]) == runs and where != runs:
          shutil.rmtree(where)  # only an output folder under runs/, never anything else
  client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}})
  backend = os.environ.get("MPLBACKEND")
  os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # the kernel's: figures inline
  try:
    client.execute()
  finally:
    if backend is None:
      os.environ.pop("MPLBACKEND")
    else:
      os.environ["MPLBACKEND"] = backend
  if save:
    nbformat.write(nb, save)
  return nb


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("notebooks", nargs="*", help="default: every notebook in notebooks/")
  parser.add_argument("--no-save", action="store_true", help="do not write the outputs back")
  args = parser.parse_args(argv)
  paths = [p if os.path.exists(p) else os.path.join(HERE, p) for p in args.notebooks] or notebooks()
  for path in paths:
    print(f"running {os.path.relpath(path, REPO)} ...", flush=True)
    execute(path, save=None if args.no_save else path)
  print("done")


if __name__ == "__main__":
  sys.exit(main())
