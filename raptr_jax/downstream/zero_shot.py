"""Zero- and few-shot evaluation: ranking accuracy and LAMBADA from continuation scores.

``rank(scorer, questions, shots)``: every choice's continuation is scored given its context
(``scoring.Scorer``); ``acc`` picks the choice with the highest summed log-likelihood, and
``acc_norm`` the highest log-likelihood per character of the continuation, as
lm-evaluation-harness reports them (OLMES's ``acc_raw`` and ``acc_per_char``).
``lambada(scorer, items)``: ``acc`` the share of passages whose last word is the greedy
continuation, ``ppl`` exp of the mean negative log-likelihood of the last word.
"""
import numpy as np

from raptr_jax.downstream import tasks as tasks_lib


def rank(scorer, questions, shots: int = 0, name: str = "") -> dict:
  questions = tasks_lib.with_shots(questions, shots)
  pairs = [(c, x) for q in questions for c, x in zip(q.contexts, q.continuations)]
  s = scorer.score(pairs, desc=f"{name} {shots}-shot" if name else "ranking")
  correct = correct_norm = 0
  i = 0
  for q in questions:
    k = len(q.continuations)
    logprob = s["logprob"][i:i + k]
    chars = np.asarray([max(len(x), 1) for x in q.continuations], np.float64)
    correct += int(np.argmax(logprob)) == q.gold
    correct_norm += int(np.argmax(logprob / chars)) == q.gold
    i += k
  n = len(questions)
  return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n,
          "chance": float(np.mean([1.0 / len(q.continuations) for q in questions])),
          "truncated": float(s["truncated"].mean())}


def lambada(scorer, items) -> dict:
  s = scorer.score([(q.contexts[0], q.continuations[0]) for q in items], desc="lambada")
  return {"acc": float(s["greedy"].mean()), "ppl": float(np.exp(-s["logprob"].mean())), "n": len(items),
          "truncated": float(s["truncated"].mean())}
