"""transformers checkpoints in and out (raptr_jax/hf/).

Without torch / transformers (the default suite): a checkpoint directory written from our own
random parameters (``hf_tensors`` + the architecture's config) imports back bit-exactly, and
every bad input gets its one-line error with nothing half-written. With them (``-m hf``, the
``hf`` extra): tiny random transformers models of every family and option import with logits
equal to transformers', our models export to directories transformers loads with our logits,
and import(export(x)) is bit-exact.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, load_config, quiet
from raptr_jax import pretrained
from raptr_jax.data.vocab import BUILTIN_MODEL
from raptr_jax.hf import architectures as arch_lib
from raptr_jax.hf import commands
from raptr_jax.hf.convert import hf_tensors
from raptr_jax.hf.tensors import CheckpointFormatError, write_safetensors

CONFIG = {"decoder": "gpt", "t5": "t5", "bert": "bert"}
F32 = ["model.dtype=float32"]
LLAMA = ["model.position=rotary", "model.gated_mlp=True", "model.activation=silu"]  # configs/gpt.py is GPT-2 like


def perturbed(params, seed=0, scale=0.3):
  """Every parameter (norm scales and biases included) moved randomly, so a mix-up of two
  tensors or a missing layout change cannot hide behind ones and zeros."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def our_model(family: str, overrides=()):
  """(run, random perturbed params) of a tiny model of ``family`` in float32."""
  from raptr_jax import train
  cfg = quiet(load_config(CONFIG[family], "tiny"))
  from raptr_jax.config import apply_overrides
  apply_overrides(cfg, list(F32) + list(overrides))
  run = train.setup(cfg, need_costs=False)
  # T5 attends without 1/sqrt(d_kv): large noise on its small initial queries would saturate softmax
  return run, perturbed(run.init().params, scale=0.02 if family == "t5" else 0.3)


# A BERT WordPiece vocabulary: specials at BERT's positions are not needed, their names are.
WORDS = ["[PAD]"] + [f"[unused{i}]" for i in range(4)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + \
    "the a of to and in is was he she it that for on with as his her by at from".split() + \
    [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["##" + chr(c) for c in range(ord("a"), ord("z") + 1)]


def write_checkpoint(directory, run, params, tokenizer=None, extra=None):
  """A transformers checkpoint directory of our ``params`` (what ``export`` would write), with
  the built-in SentencePiece model as its tokenizer (``spiece.model`` / ``tokenizer.model``), or
  for BERT a WordPiece ``vocab.txt``."""
  os.makedirs(directory, exist_ok=True)
  family = run.cfg.model.family
  config = arch_lib.for_family(family).config(run.model_cfg) | (extra or {})
  write_safetensors(str(directory), hf_tensors(params, run.model_cfg, family))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  tokenizer = tokenizer or {"bert": "vocab.txt", "t5": "spiece.model"}.get(family, "tokenizer.model")
  if tokenizer == "vocab.txt":
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
      f.write("\n".join(WORDS) + "\n")
  else:
    shutil.copy(BUILTIN_MODEL, os.path.join(directory, tokenizer))
  return str(directory)


def imported_params(workdir, family, overrides=()):
  from raptr_jax.evaluate import restore
  from raptr_jax.config import apply_overrides
  cfg = quiet(load_config(CONFIG[family], "tiny"))
  apply_overrides(cfg, list(F32) + list(overrides))
  run, step, params, _ = restore(cfg, str(workdir))
  return run, params


def do_import(hf_dir, workdir, family, overrides=()):
  from raptr_jax.config import apply_overrides
  cfg = quiet(load_config(CONFIG[family], "tiny"))
  apply_overrides(cfg, list(F32) + list(overrides))
  return commands.import_checkpoint(cfg, str(hf_dir), str(workdir), log=lambda *_: None)


def test_our_checkpoint_round_trips_bit_exactly(tmp_path):
  """decoder with GQA, biases and a tied head: export layout -> import gives the same arrays."""
  run, params = our_model("decoder", LLAMA + ["model.num_kv_heads=1", "model.biases=True", "model.tied_embeddings=True",
                                      "model.rotary_base=500.0"])
  hf_dir = write_checkpoint(tmp_path / "hf", run, params, tokenizer="tokenizer.model")
  record = do_import(hf_dir, tmp_path / "run", "decoder")
  assert record["model"]["num_kv_heads"] == 1 and record["model"]["tied_embeddings"] and record["model"]["biases"]
  run2, back = imported_params(tmp_path / "run", "decoder")
  assert run2.model_cfg.rotary_base == 500.0 and run2.model_cfg.vocab_size == run.model_cfg.vocab_size
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def _expect_refused(tmp_path, hf_dir, match, family="decoder"):
  workdir = tmp_path / "refused"
  with pytest.raises((ValueError, OSError)) as info:
    do_import(hf_dir, workdir, family)
  assert info.match(match), str(info.value)
  assert "\n" not in str(info.value).strip()
  assert not os.path.exists(workdir / "pretrained"), "a failed import left a half-written import"
  assert not [n for n in os.listdir(workdir) if ".tmp" in n] if os.path.exists(workdir) else True


def test_bad_checkpoints_are_refused_with_the_file_named(tmp_path):
  run, params = our_model("decoder", LLAMA)
  good = write_checkpoint(tmp_path / "good", run, params, tokenizer="tokenizer.model")

  def variant(name, edit):
    d = tmp_path / name
    shutil.copytree(good, d)
    edit(str(d))
    return str(d)

  _expect_refused(tmp_path, str(tmp_path / "missing"), "not a directory")
  _expect_refused(tmp_path, variant("no_config", lambda d: os.remove(f"{d}/config.json")), "no config.json")
  _expect_refused(tmp_path, variant("no_weights", lambda d: os.remove(f"{d}/model.safetensors")), "has no weights")
  _expect_refused(tmp_path, variant("no_tokenizer", lambda d: os.remove(f"{d}/tokenizer.model")), "has no tokenizer")

  def edit_config(**change):
    def edit(d):
      conf = json.load(open(f"{d}/config.json"))
      json.dump(conf | change, open(f"{d}/config.json", "w"))
    return edit

  _expect_refused(tmp_path, variant("gpt2", edit_config(model_type="gpt2")), "model_type='gpt2' is not supported")
  _expect_refused(tmp_path, variant("shape", edit_config(intermediate_size=run.model_cfg.mlp_dim * 2)),
                  r"mlp.gate_proj.weight has shape .* the config implies")
  _expect_refused(tmp_path, variant("rope", edit_config(rope_scaling={"rope_type": "yarn", "factor": 4.0})), "yarn")

  def rewrite(transform):
    def edit(d):
      from safetensors.numpy import load_file, save_file
      tensors = load_file(f"{d}/model.safetensors")
      save_file(transform(tensors), f"{d}/model.safetensors")
    return edit

  def nan(tensors):
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = np.nan
    return tensors

  _expect_refused(tmp_path, variant("nan", rewrite(nan)), r"model.layers.1.mlp.down_proj.weight holds NaN")
  _expect_refused(tmp_path, variant("int", rewrite(lambda t: t | {"model.norm.weight": t["model.norm.weight"].astype(np.int8)})),
                  "dtype int8")
  _expect_refused(tmp_path, variant("partial", rewrite(lambda t: {k: v for k, v in t.items() if "layers.1." not in k})),
                  "missing tensor model.layers.N")
  _expect_refused(tmp_path, variant("truncated", lambda d: open(f"{d}/model.safetensors", "r+b").truncate(100)),
                  "not a readable safetensors file")
  with pytest.raises(ValueError, match="model.family='t5' cannot hold"):
    do_import(good, tmp_path / "t5", "t5")


def test_sharded_checkpoint_with_index_imports(tmp_path):
  run, params = our_model("t5")
  hf_dir = tmp_path / "hf"
  os.makedirs(hf_dir)
  family = "t5"
  config = arch_lib.for_family(family).config(run.model_cfg)
  files = write_safetensors(str(hf_dir), hf_tensors(params, run.model_cfg, family), max_shard_bytes=200_000)
  assert len(files) > 2 and files[-1] == "model.safetensors.index.json"
  json.dump(config, open(hf_dir / "config.json", "w"))
  shutil.copy(BUILTIN_MODEL, hf_dir / "spiece.model")
  record = do_import(hf_dir, tmp_path / "run", "t5")
  assert record["data"]["extra_ids"] == 100
  _, back = imported_params(tmp_path / "run", "t5")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


BERT_ARCH = ["model.norm=layer", "model.norm_position=post", "model.norm_eps=1e-12", "model.biases=True",
             "model.token_types=2", "model.embedding_norm=True", "model.head_transform=True", "model.output_bias=True",
             "model.activation=gelu_exact", "data.max_predictions=0"]
GROWTH = {
    # an imported BERT (post-LN) grown in width: d 32 -> 64, heads 2 -> 4, MLP 64 -> 128
    "bert": (BERT_ARCH + ["model.d_model=32", "model.num_heads=2", "model.head_dim=16", "model.mlp_dim=64"],
             ["model.d_model=64", "model.num_heads=4", "model.mlp_dim=128", "method.growth.d_model=(32, 64)",
              "method.growth.num_heads=(2, 4)", "method.growth.mlp_dim=(64, 128)"]),
    # an imported Llama-like decoder grown in depth and width: 2 -> 4 layers, d 64 -> 128
    "decoder": (LLAMA, ["model.d_model=128", "model.num_heads=4", "model.mlp_dim=512", "model.num_layers=4",
                        "method.growth.num_layers=(2, 4)", "method.growth.d_model=(64, 128)",
                        "method.growth.num_heads=(2, 4)", "method.growth.mlp_dim=(256, 512)"]),
}


@pytest.mark.parametrize("family,operator", [("bert", "bert2bert"), ("bert", "lemon"), ("decoder", "lemon"),
                                             ("decoder", "bert2bert")])
def test_growth_from_an_imported_model_preserves_its_function(tmp_path, family, operator):
  """init.source = an import; grow_at=(0.0,) grows it before the first step: the grown model's
  logits equal the imported model's (bert2BERT's fan-in division, LEMON's random split and
  zero-output blocks; depth by bert2BERT's stacking does not preserve, so only width there)."""
  from raptr_jax import train
  from raptr_jax.config import apply_overrides
  small_overrides, grown_overrides = GROWTH[family]
  if operator == "bert2bert" and family == "decoder":
    grown_overrides = [o for o in grown_overrides if "num_layers" not in o]
  run, params = our_model(family, small_overrides)
  do_import(write_checkpoint(tmp_path / "hf", run, params), tmp_path / "small", family, small_overrides)
  small_run, small = imported_params(tmp_path / "small", family, small_overrides)
  cfg = quiet(load_config(CONFIG[family], "tiny"))
  apply_overrides(cfg, F32 + small_overrides + grown_overrides +
                  ["method.name=growth", f"method.growth.operator={operator}", "method.growth.grow_at=(0.0,)",
                   f"init.source={tmp_path / 'small'}"])
  cfg, source = pretrained.resolve(cfg, str(tmp_path / "grown"))
  grown_run = train.setup(cfg, need_costs=False)
  state = pretrained.load(grown_run, grown_run.init(), source)
  assert grown_run.plan.stage_index(0.0) == 1  # the growth happens before step 1
  grown = grown_run.transition(state, 0, 1).params
  from flax import nnx
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 12)))
  before = nnx.merge(small_run.steps.ctx.graphdef, small)(ids)
  after = nnx.merge(grown_run.steps.ctx.graphdef, grown)(ids)
  np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-4, atol=1e-4 * float(jnp.abs(before).max()))


def test_lemon_depth_growth_of_a_post_norm_model_is_refused():
  from raptr_jax.config import apply_overrides, validate
  cfg = load_config("bert", "tiny")
  apply_overrides(cfg, BERT_ARCH + ["method.name=growth", "method.growth.operator=lemon", "model.num_layers=4",
                                    "method.growth.num_layers=(2, 4)", "method.growth.grow_at=(0.0,)"])
  with pytest.raises(ValueError, match="post-norm block"):
    validate(cfg)


def test_training_continues_from_the_import_with_a_method(tmp_path):
  """main on an import's workdir: the model section and vocabulary come from the import, the
  first evaluation is the imported model's, and RaPTr trains it from there."""
  from raptr_jax import train
  from raptr_jax.config import apply_overrides
  from raptr_jax.metrics import read_metrics
  run, params = our_model("decoder", LLAMA)
  do_import(write_checkpoint(tmp_path / "hf", run, params, tokenizer="tokenizer.model"), tmp_path / "run", "decoder",
            LLAMA)
  cfg = quiet(load_config("gpt", "tiny"))  # GPT-2-like sizes and options: the import's replace them
  apply_overrides(cfg, ["budget.value=3", "method.name=raptr", "checkpoint.every=0", "model.dtype=float32"])
  train.train(cfg, str(tmp_path / "run"))
  rows = read_metrics(str(tmp_path / "run"))
  assert rows[0]["step"] == 0 and rows[-1]["step"] == 3
  check = quiet(load_config("gpt", "tiny"))
  apply_overrides(check, ["model.dtype=float32"])
  check, _ = pretrained.resolve(check, str(tmp_path / "run"))
  imported_run = train.setup(check, need_costs=False)
  from raptr_jax.data import pipeline
  batches = [b for _, b in zip(range(cfg.eval.batches), pipeline.build_stream(imported_run.cfg.data, "validation",
                                                                              cfg.data.batch_size, cfg.seed, train=False))]
  from raptr_jax.run import evaluate
  assert rows[0]["eval/loss"] == pytest.approx(evaluate(imported_run, params, batches), rel=1e-6)
  assert json.load(open(tmp_path / "run" / "config.json"))["model"]["position"] == "rotary"


def test_init_source_can_be_a_trained_run(tmp_path):
  """init.source = another run's workdir: its newest checkpoint's parameters start this run."""
  from raptr_jax import train
  from raptr_jax.config import apply_overrides
  from raptr_jax.evaluate import restore
  cfg = quiet(load_config("ul2", "tiny"))
  apply_overrides(cfg, ["budget.value=2", "eval.at_start=False"])
  train.train(cfg, str(tmp_path / "first"))
  _, _, first, _ = restore(cfg, str(tmp_path / "first"))
  cfg = quiet(load_config("ul2", "tiny"))
  apply_overrides(cfg, ["budget.value=2", "eval.at_start=False", f"init.source={tmp_path / 'first'}", "seed=7"])
  cfg, source = pretrained.resolve(cfg, str(tmp_path / "second"))
  run = train.setup(cfg, need_costs=False)
  started = pretrained.load(run, run.init(), source).params
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(started)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_t5_family_attends_unscaled_and_initialises_as_t5():
  """T5 divides no attention logit by sqrt(d_kv): the factor is in the queries' initialisation
  (std (d d_kv)^-1/2), and every other projection is fan-in scaled; the other families keep
  1/sqrt(head_dim) and N(0, 0.02)."""
  from raptr_jax import train
  from raptr_jax.config import apply_overrides
  cfg = quiet(load_config("t5", "tiny"))
  apply_overrides(cfg, ["model.d_model=128", "model.head_dim=32", "model.num_heads=4", "model.mlp_dim=256"])
  run = train.setup(cfg, need_costs=False)
  m = run.model_cfg
  assert (m.attention_scale, m.init) == ("none", "t5")
  p = run.init().params
  std = lambda x: float(np.std(np.asarray(x)))
  layers = p["encoder_layers"]
  expected = {"q": (m.d_model * m.head_dim) ** -0.5, "k": m.d_model ** -0.5, "v": m.d_model ** -0.5,
              "o": (m.num_heads * m.head_dim) ** -0.5, "wi": m.d_model ** -0.5, "wo": m.mlp_dim ** -0.5}
  for name, want in expected.items():
    assert std(layers[name]) == pytest.approx(want, rel=0.05), name
  assert std(p["embedding"]) == pytest.approx(1.0, rel=0.05) and std(p["head"]) == pytest.approx(m.d_model ** -0.5, rel=0.05)
  from raptr_jax.models import layers as layers_lib
  assert layers_lib.attention_logit_scale(m) == 1.0
  decoder = train.setup(quiet(load_config("ul2", "tiny")), need_costs=False).model_cfg
  assert (decoder.attention_scale, decoder.init) == ("head_dim", "normal")
  assert layers_lib.attention_logit_scale(decoder) is None  # jax's own 1 / sqrt(head_dim)
