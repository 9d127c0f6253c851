"""Cross-checks against transformers (``pytest -m hf``; the ``hf`` extra: torch CPU, transformers).

Tiny random transformers models of each family and option, in float32: imported, our logits
equal transformers' (relative 1e-5); our models exported, transformers' logits equal ours; and a
transformers checkpoint imported then exported gives back its tensors bit for bit.
"""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, quiet
from raptr_jax.data.vocab import BUILTIN_MODEL
from raptr_jax.hf import commands
from test_hf import LLAMA, WORDS, do_import, imported_params, our_model, write_checkpoint

pytestmark = pytest.mark.hf
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

def randomized(model, scale=0.02):
  """Norm scales and biases moved off ones and zeros (transformers initialises them so)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(torch.randn_like(p) * 0.2)
  return model.eval()


def save(model, directory, tokenizer):
  model.save_pretrained(directory)
  if tokenizer == "vocab.txt":
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
      f.write("\n".join(WORDS) + "\n")
  else:
    shutil.copy(BUILTIN_MODEL, os.path.join(directory, tokenizer))
  return directory


def llama(tied=False, bias=False, kv=2, act="silu"):
  cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=kv, rope_theta=5000.0,
                                 tie_word_embeddings=tied, rms_norm_eps=1e-5, attention_bias=bias, mlp_bias=bias,
                                 hidden_act=act, max_position_embeddings=64)
  return transformers.LlamaForCausalLM(cfg), "tokenizer.model"


def t5(v1_1=True):
  cfg = transformers.T5Config(vocab_size=8320, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
                              num_heads=4, feed_forward_proj="gated-gelu" if v1_1 else "relu",
                              tie_word_embeddings=not v1_1, relative_attention_num_buckets=8,
                              relative_attention_max_distance=20, decoder_start_token_id=0)
  model = transformers.T5ForConditionalGeneration(cfg)
  if v1_1:  # transformers 5 ties T5's head at construction: untie it, as the Hub's v1.1 checkpoints are
    model.lm_head.weight = torch.nn.Parameter(torch.randn(8320, 32) * 32 ** -0.5)
  return model, "spiece.model"


def bert():
  cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=64, type_vocab_size=2)
  return transformers.BertForMaskedLM(cfg), "vocab.txt"


CASES = {
    "llama_gqa_untied": (lambda: llama(), "decoder"),
    "llama_tied_biases_tanh_gelu": (lambda: llama(tied=True, bias=True, kv=4, act="gelu_pytorch_tanh"), "decoder"),
    "t5_v1_1": (lambda: t5(True), "t5"),
    "t5_original": (lambda: t5(False), "t5"),
    "bert_token_types": (bert, "bert"),
}
IDS = np.random.default_rng(0).integers(3, 60, (2, 13))
DEC = np.random.default_rng(1).integers(3, 60, (2, 7))
TYPES = np.random.default_rng(2).integers(0, 2, IDS.shape)


def hf_logits(model, family):
  with torch.no_grad():
    if family == "t5":
      return model(input_ids=torch.tensor(IDS), decoder_input_ids=torch.tensor(DEC)).logits.numpy()
    if family == "bert":
      return model(input_ids=torch.tensor(IDS), token_type_ids=torch.tensor(TYPES)).logits.numpy()
    return model(torch.tensor(IDS)).logits.numpy()


def our_logits(run, params, family):
  from flax import nnx
  model = nnx.merge(run.steps.ctx.graphdef, params)
  if family == "t5":
    return np.asarray(model(jnp.asarray(IDS), jnp.asarray(DEC)))
  if family == "bert":
    return np.asarray(model(jnp.asarray(IDS), token_types=jnp.asarray(TYPES)))
  return np.asarray(model(jnp.asarray(IDS)))


def assert_close(ours, theirs, what):
  ours = ours[..., :theirs.shape[-1]]
  err = np.abs(ours - theirs).max() / np.abs(theirs).max()
  assert err < 1e-5, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_gives_transformers_logits(tmp_path, case):
  build, family = CASES[case]
  model, tokenizer = build()
  hf_dir = save(randomized(model), str(tmp_path / "hf"), tokenizer)
  reference = type(model).from_pretrained(hf_dir).eval()  # what transformers reads from the directory
  do_import(hf_dir, tmp_path / "run", family)
  run, params = imported_params(tmp_path / "run", family)
  assert_close(our_logits(run, params, family), hf_logits(reference, family), case)
  # import(export(x)) == x, tensor by tensor and bit for bit
  out = str(tmp_path / "exported")
  commands.export_checkpoint(str(tmp_path / "run"), out, log=lambda *_: None)
  from safetensors.numpy import load_file
  original, exported = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
  tied_copies = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "cls.predictions.decoder.bias"}
  assert set(original) - tied_copies <= set(exported), set(original) - set(exported)
  for name, value in original.items():
    if name in exported:
      np.testing.assert_array_equal(exported[name], value, err_msg=name)


@pytest.mark.parametrize("shards", [1, 3])
def test_import_of_pytorch_bin_files(tmp_path, shards):
  """Older checkpoints: ``pytorch_model.bin``, or sharded ``.bin`` files with their index, as
  transformers 4 wrote them (transformers 5 writes safetensors only, so the files are written
  here with torch.save); read through torch.load(weights_only=True)."""
  model, tokenizer = llama(tied=False, kv=2)
  randomized(model)
  hf_dir = tmp_path / "hf"
  model.config.save_pretrained(hf_dir)
  shutil.copy(BUILTIN_MODEL, hf_dir / tokenizer)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  if shards == 1:
    torch.save(state, hf_dir / "pytorch_model.bin")
  else:
    names, weight_map = sorted(state), {}
    for i in range(shards):
      file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
      part = {k: state[k] for k in names[i::shards]}
      torch.save(part, hf_dir / file)
      weight_map |= dict.fromkeys(part, file)
    (hf_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  do_import(str(hf_dir), tmp_path / "run", "decoder")
  run, params = imported_params(tmp_path / "run", "decoder")
  assert_close(our_logits(run, params, "decoder"), hf_logits(model, "decoder"), f"{shards} .bin file(s)")


class _RunsCode:
  """A pickled object that would create a folder when unpickled without weights_only."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.makedirs, (self.path,)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
  model, tokenizer = llama()
  hf_dir = tmp_path / "hf"
  model.config.save_pretrained(hf_dir)
  shutil.copy(BUILTIN_MODEL, hf_dir / tokenizer)
  marker = tmp_path / "code_ran"
  torch.save({"model.embed_tokens.weight": _RunsCode(str(marker))}, hf_dir / "pytorch_model.bin")
  from raptr_jax.hf.tensors import CheckpointFormatError
  with pytest.raises(CheckpointFormatError, match="could not be read as tensors only"):
    do_import(str(hf_dir), tmp_path / "run", "decoder")
  assert not marker.exists() and not (tmp_path / "run" / "pretrained").exists()


@pytest.mark.parametrize("family,overrides", [
    ("decoder", LLAMA[:2]),                                    # the project's decoder: tanh-GELU, untied
    ("decoder", LLAMA + ["model.num_kv_heads=1", "model.tied_embeddings=True", "model.biases=True"]),
    ("t5", []),                                                # T5 v1.1 as configs/t5.py trains it
    ("t5", ["model.gated_mlp=False", "model.activation=relu", "model.tied_embeddings=True",
            "model.tied_output_scale=True"]),                  # the original T5
    ("t5", ["model.tied_embeddings=True"]),                    # tied without the rescale
])
def test_export_loads_in_transformers_with_our_logits(tmp_path, family, overrides):
  run, params = our_model(family, overrides)
  source = write_checkpoint(tmp_path / "ours", run, params)
  do_import(source, tmp_path / "run", family)
  out = str(tmp_path / "exported")
  config = commands.export_checkpoint(str(tmp_path / "run"), out, log=lambda *_: None)
  auto = getattr(transformers, {"decoder": "AutoModelForCausalLM", "t5": "AutoModelForSeq2SeqLM"}[family])
  model = auto.from_pretrained(out).eval()
  assert type(model).__name__ == config["architectures"][0]
  assert_close(our_logits(run, params, family), hf_logits(model, family), f"{family} {overrides}")


def test_export_of_a_trained_run(tmp_path):
  """A run trained with a method (RaPTr) exports its full model at its last checkpoint."""
  from raptr_jax import train
  from raptr_jax.config import apply_overrides
  from raptr_jax.evaluate import restore
  cfg = quiet(load_config("ul2", "tiny"))
  apply_overrides(cfg, ["model.dtype=float32", "budget.value=4", "method.name=raptr", "eval.at_start=False"])
  train.train(cfg, str(tmp_path / "run"))
  out = str(tmp_path / "exported")
  commands.export_checkpoint(str(tmp_path / "run"), out, log=lambda *_: None)
  run, _, params, _ = restore(cfg, str(tmp_path / "run"))
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert_close(our_logits(run, params, "decoder"), hf_logits(model, "decoder"), "trained ul2")
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  from raptr_jax.data.vocab import load_vocabulary
  text = "ROMEO: But soft, what light through yonder window breaks?"
  assert tokenizer.encode(text, add_special_tokens=False) == load_vocabulary("", 100).encode(text)
