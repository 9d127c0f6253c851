"""Our scorer against lm-evaluation-harness (``pytest -m hf``; the ``hf`` extra).

A decoder and a T5 model trained here are exported (``python -m raptr_jax.hf export``) and
scored by lm-evaluation-harness's Hugging Face backend (``HFLM(...).loglikelihood``, causal and
seq2seq) on requests rendered as our tasks render them (HellaSwag, PIQA, ARC, COPA formats, on
the built-in corpus's text; edge cases included: an empty context, trailing whitespace moved to
the continuation). ``raptr_jax.downstream.scoring.Scorer`` gives the same log-likelihood per
request (1e-4) and the same greedy flags.
"""
import gzip
import json
import os

import numpy as np
import pytest

from conftest import load_config, quiet
from raptr_jax.hf import commands

pytestmark = pytest.mark.hf
pytest.importorskip("torch")
pytest.importorskip("transformers")
lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")


def corpus_lines(n: int, seed: int = 0) -> list[str]:
  """Lines of the built-in corpus (Shakespeare), 3 to 12 words long."""
  folder = os.path.join(os.path.dirname(commands.__file__), "..", "data", "builtin")
  lines = []
  for name in sorted(os.listdir(folder)):
    if name.endswith(".jsonl.gz"):
      with gzip.open(os.path.join(folder, name), "rt") as f:
        for row in f:
          lines += [l.strip() for l in json.loads(row)["text"].splitlines() if 3 <= len(l.split()) <= 12]

  rng = np.random.default_rng(seed)
  return [lines[i] for i in rng.choice(len(lines), n, replace=False)]


def requests(per_task: int = 60) -> dict[str, list[tuple[str, str]]]:
  """(context, continuation) pairs in our tasks' renderings (raptr_jax/downstream/tasks.py)."""
  from raptr_jax.downstream import tasks
  text = iter(corpus_lines(10 * per_task))
  out = {"hellaswag": [], "piqa": [], "arc_easy": []}
  for i in range(per_task):
    out["hellaswag"].append((f"{next(text).split()[0]}: {next(text)}", " " + next(text)))
    out["piqa"].append((f"Goal: {next(text)}\nAnswer:", " " + next(text)))
    out["arc_easy"].append((f"Question: {next(text)}?\nAnswer:", " " + next(text)))
  rows = [{"premise": next(text).rstrip(".") + ".", "choice1": next(text), "choice2": next(text),
           "question": ("cause", "effect")[i % 2], "idx": i, "label": i % 2} for i in range(per_task // 2)]
  out["copa"] = [pair for q in tasks.render_copa(rows) for pair in zip(q.contexts, q.continuations)]
  out["edge"] = [("", " " + next(text)), (next(text) + " ", "and more"), (next(text) + "\n", "Answer"),
                 ("ROMEO:", " O, she doth teach the torches to burn bright!")]
  return out


def trained_export(tmp_path, name, overrides):
  from raptr_jax import train
  from raptr_jax.config import apply_overrides
  from raptr_jax.evaluate import restore
  cfg = quiet(load_config(name, "tiny"))
  apply_overrides(cfg, ["model.dtype=float32", "budget.value=6", "eval.at_start=False", "data.seq_len=128"] + overrides)
  train.train(cfg, str(tmp_path / "run"))
  out = str(tmp_path / "exported")
  commands.export_checkpoint(str(tmp_path / "run"), out, log=lambda *_: None)
  run, _, params, _ = restore(cfg, str(tmp_path / "run"))
  return run, params, out


def compare(run, params, lm, pairs_by_task):
  from lm_eval.api.instance import Instance
  from raptr_jax.downstream.scoring import Scorer
  scorer = Scorer(run, params, progress=False)
  for task, pairs in pairs_by_task.items():
    ours = scorer.score(pairs)
    assert not ours["truncated"].any()
    theirs = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                              disable_tqdm=True)
    ll = np.asarray([t[0] for t in theirs])
    np.testing.assert_allclose(ours["logprob"], ll, atol=1e-4, rtol=0, err_msg=task)
    np.testing.assert_array_equal(ours["greedy"], [bool(t[1]) for t in theirs], err_msg=task)


def test_decoder_scores_equal_lm_evaluation_harness(tmp_path):
  run, params, out = trained_export(tmp_path, "ul2", ["data.objective=causal_lm"])
  lm = lm_eval_hf.HFLM(pretrained=out, backend="causal", device="cpu", dtype="float32", batch_size=16)
  pairs = requests()
  assert sum(len(p) for t, p in pairs.items() if t != "edge") >= 150
  compare(run, params, lm, pairs)


@pytest.mark.parametrize("head", ["tied_t5", "untied_v1_1"])
def test_t5_scores_equal_lm_evaluation_harness_seq2seq(tmp_path, head):
  """The seq2seq backend: context (plus eos, T5's tokenizer appends it) into the encoder, the
  continuation encoded apart as decoder targets. transformers 5's ``tie_weights()``, which HFLM
  calls, re-ties a v1.1 model's untied head to the embedding; the untied case is therefore given
  to HFLM as a loaded model whose ``tie_weights`` is a no-op (a transformers 5 behaviour, not ours)."""
  import transformers
  overrides = ["model.tied_embeddings=True", "model.tied_output_scale=True"] if head == "tied_t5" else []
  run, params, out = trained_export(tmp_path, "t5", overrides)
  pretrained = out
  if head == "untied_v1_1":
    pretrained = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    pretrained.tie_weights = lambda *args, **kwargs: None
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  lm = lm_eval_hf.HFLM(pretrained=pretrained, tokenizer=tokenizer, backend="seq2seq", device="cpu",
                       dtype="float32", batch_size=16)
  pairs = requests(20)
  compare(run, params, lm, pairs)
