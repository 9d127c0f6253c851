"""Named architectures (raptr_jax/models/presets.py) and the options they are made of."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_config
from raptr_jax.models import embeddings, get_family, model_config
from raptr_jax.models.presets import ARCHITECTURES


def test_crammed_bert_is_geiping_and_goldstein_option_by_option():
  cfg = load_config("bert", "crammed")
  m = cfg.model
  assert (m.norm, m.norm_position, m.norm_eps, m.biases) == ("layer", "pre", 1e-12, False)
  assert (m.gated_mlp, m.activation, m.mlp_dim) == (True, "gelu_exact", 1536)  # 3072 split into value and gate
  assert (m.position, m.embedding_norm, m.token_types) == ("sinusoidal", True, 0)
  assert (m.head_transform, m.output_bias, m.tied_embeddings) == (True, False, True)
  mcfg = model_config(cfg.model, 32768)
  module = get_family("bert").module
  abstract = nnx.state(nnx.eval_shape(lambda: module(mcfg, rngs=nnx.Rngs(0))), nnx.Param)
  count = sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(abstract)))
  assert 115e6 < count < 125e6  # No Train No Gain: "120M parameters" (a 32768 vocabulary)


def test_scaled_sinusoidal_positions():
  positions = jnp.arange(5)[None]
  got = np.asarray(embeddings.sinusoid(positions, 8))[0]
  pos, i = np.arange(5)[:, None], np.arange(4)[None]
  angle = pos / 10000 ** (2 * i / 8)
  np.testing.assert_allclose(got[:, 0::2], np.sin(angle), atol=1e-6)
  np.testing.assert_allclose(got[:, 1::2], np.cos(angle), atol=1e-6)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_builds_and_runs(name):
  cfg = load_config("t5" if name.startswith("t5") else "bert" if "bert" in name else "gpt", "tiny")
  cfg.model.update(ARCHITECTURES[name])
  cfg.model.dtype = "float32"
  mcfg = model_config(cfg.model, 256)
  model = get_family(cfg.model.family).module(mcfg, rngs=nnx.Rngs(0))
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 250, (2, 9)))
  logits = model(ids, ids) if cfg.model.family == "t5" else model(ids)
  assert logits.shape == (2, 9, mcfg.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))
