"""Named architectures: which ``model.*`` options make up each public model, option by option.

``ARCHITECTURES[name]`` is a dict of model fields; ``apply_architecture(cfg, name)`` sets them on
a run config (sizes stay the config's). The table is the README's "Architectures" table; the
transformers classes are cross-checked in ``tests/test_hf_transformers.py`` (equal logits).

| option | decoder (default) | llama | t5_v1_1 | t5 | bert | crammed_bert |
|---|---|---|---|---|---|---|
| transformers class | LlamaForCausalLM (hidden_act gelu_pytorch_tanh) | LlamaForCausalLM | T5ForConditionalGeneration | T5ForConditionalGeneration | BertForMaskedLM | none (Geiping & Goldstein's own code) |
| norm, placement | RMSNorm, pre | RMSNorm, pre | RMSNorm, pre | RMSNorm, pre | LayerNorm, post | LayerNorm, pre |
| biases | none | none (attention_bias / mlp_bias: model.biases) | none | none | everywhere | none in linear layers |
| attention logits | / sqrt(head_dim) | / sqrt(head_dim) | unscaled (in the init) | unscaled | / sqrt(head_dim) | / sqrt(head_dim) |
| MLP | gated, tanh GELU | gated, SiLU (SwiGLU) | gated, tanh GELU | ReLU | GELU (erf) | gated, GELU (erf) |
| positions | rotary (theta 1e4) | rotary (rope_theta) | relative buckets | relative buckets | learned + 2 token types | scaled sinusoidal |
| key/value heads | all | num_key_value_heads | all | all | all | all |
| embedding norm | no | no | no | no | LayerNorm | LayerNorm |
| output | final norm, untied head | final norm, tied or untied | final norm, untied | final norm, tied, x d^-1/2 | MLM transform (dense, GELU, LayerNorm), tied, bias | final norm, MLM transform, tied, no bias |
| init | N(0, 0.02), GPT-2 output scaling | same | T5's fan-in normals | T5's | N(0, 0.02) | N(0, 0.02) |
"""
ARCHITECTURES = {
    # transformers' LlamaForCausalLM with SwiGLU; the project's decoders differ only in the activation.
    "llama": dict(position="rotary", gated_mlp=True, activation="silu", norm="rms", norm_position="pre",
                  biases=False, attention_scale="head_dim", token_types=0, embedding_norm=False,
                  head_transform=False, output_bias=False, tied_output_scale=False, init="normal"),
    # T5 v1.1 (Raffel et al. 2020; the v1.1 release): gated-GELU, untied head, no output rescale.
    "t5_v1_1": dict(position="relative", gated_mlp=True, activation="gelu", norm="rms", norm_position="pre",
                    biases=False, attention_scale="none", tied_embeddings=False, tied_output_scale=False,
                    init="t5", norm_eps=1e-6),
    # The original T5: ReLU MLP, head tied to the embedding, decoder output x d_model^-1/2.
    "t5": dict(position="relative", gated_mlp=False, activation="relu", norm="rms", norm_position="pre",
               biases=False, attention_scale="none", tied_embeddings=True, tied_output_scale=True, init="t5",
               norm_eps=1e-6),
    # BERT (Devlin et al. 2019) as transformers' BertForMaskedLM.
    "bert": dict(position="learned", token_types=2, gated_mlp=False, activation="gelu_exact", norm="layer",
                 norm_position="post", norm_eps=1e-12, biases=True, embedding_norm=True, head_transform=True,
                 output_bias=True, tied_embeddings=True, attention_scale="head_dim", init="normal"),
    # Crammed BERT (Geiping & Goldstein 2023, section 4.2), No Train No Gain's BERT: pre-norm LayerNorm
    # (eps 1e-12) with a final norm, no biases in the linear layers (QKV, attention output, MLP), a
    # gated GELU MLP (its 3072-unit input projection split into value and gate halves: mlp_dim 1536
    # gated), scaled sinusoidal positions, a LayerNorm after the embedding, no token types, the MLM
    # transform head (dense, GELU, LayerNorm) into the tied embedding without an output bias, sparse
    # prediction (data.max_predictions), no dropout.
    "crammed_bert": dict(position="sinusoidal", token_types=0, gated_mlp=True, activation="gelu_exact",
                         norm="layer", norm_position="pre", norm_eps=1e-12, biases=False, embedding_norm=True,
                         head_transform=True, output_bias=False, tied_embeddings=True, attention_scale="head_dim",
                         init="normal"),
}


def apply_architecture(cfg, name: str):
  """Sets the ``model.*`` options of architecture ``name`` on the run config ``cfg``."""
  if name not in ARCHITECTURES:
    raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
  cfg.model.update(ARCHITECTURES[name])
  return cfg
