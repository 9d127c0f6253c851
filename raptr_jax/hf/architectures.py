"""The transformers architectures each family equals, field by field and tensor by tensor.

One table per architecture: ``to_model_fields(hf_config, names)`` reads a transformers
``config.json`` into our ``model`` section (refusing what the core cannot compute exactly),
``to_hf_config(model_cfg)`` writes it back (refusing options transformers' class cannot hold),
and ``tensors(model_cfg)`` lists every parameter of ours with the transformers tensor(s) it is
made of and the layout change (transformers stores linear weights as [out, in]; we keep
[in, out] kernels and split heads: q / k / v [d, N, H], o [N, H, d]).

| family | transformers class | model_type |
|---|---|---|
| decoder | ``LlamaForCausalLM`` (rotary with rotate_half and ``rope_theta``, RMSNorm, gated MLP, GQA, tied or untied head, optional biases) | llama |
| t5 | ``T5ForConditionalGeneration`` (T5 v1.1: gated-GELU, untied head; T5: ReLU, tied head with the d_model^-1/2 rescale) | t5, mt5 |
| bert | ``BertForMaskedLM`` (post-LayerNorm, biases, learned positions, token types, embedding LayerNorm, MLM transform head and output bias, tied head) | bert |
"""
import dataclasses

import numpy as np

# transformers activation names -> ours (gelu is the tanh approximation here, as in T5 v1.1).
ACT_FROM_HF = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": None, "gelu": "gelu_exact",
               "silu": "silu", "swish": "silu", "relu": "relu"}
ACT_TO_HF = {"gelu": "gelu_pytorch_tanh", "gelu_exact": "gelu", "silu": "silu", "relu": "relu"}
T5_ACT_TO_HF = {"gelu": "gelu_new", "gelu_exact": "gelu", "silu": "silu", "relu": "relu"}


class UnsupportedArchitecture(ValueError):
  """A checkpoint or a model that the other side cannot express exactly (names the field)."""


@dataclasses.dataclass(frozen=True)
class Tensor:
  """Our parameter ``path`` (keys into the pure parameter dict) made of transformers tensor
  ``name`` (``{i}``: the layer, for stacked parameters), with ``layout``:

  * ``same``: identical; ``t``: transposed ([out, in] <-> [in, out]);
  * ``heads_in``: [N H, d] <-> [d, N, H] (q / k / v); ``heads_out``: [d, N H] <-> [N, H, d] (o);
  * ``heads_bias``: [N H] <-> [N, H]."""
  path: tuple[str, ...]
  name: str
  layout: str = "same"
  optional: bool = False   # absent in the checkpoint: keep ours (e.g. a tied copy saved once)
  export_only: bool = False  # a copy written for transformers' sake, never read back

  @property
  def stacked(self) -> bool:
    return "{i}" in self.name

  def to_ours(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One layer's (or an unstacked) transformers tensor -> our layout of ``shape``."""
    if self.layout == "same":
      return x.reshape(shape)
    if self.layout == "t":
      return x.T
    if self.layout == "heads_in":
      return x.T.reshape(shape)
    if self.layout == "heads_out":
      return x.T.reshape(shape)
    if self.layout == "heads_bias":
      return x.reshape(shape)
    raise ValueError(self.layout)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.layout == "same":
      return x
    if self.layout == "t":
      return x.T
    if self.layout == "heads_in":
      d = x.shape[0]
      return x.reshape(d, -1).T
    if self.layout == "heads_out":
      return x.reshape(-1, x.shape[-1]).T
    if self.layout == "heads_bias":
      return x.reshape(-1)
    raise ValueError(self.layout)

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The transformers tensor's shape for our (per-layer) ``shape``."""
    if self.layout == "same":
      return shape
    if self.layout == "t":
      return shape[::-1]
    if self.layout == "heads_in":
      return (shape[1] * shape[2], shape[0])
    if self.layout == "heads_out":
      return (shape[2], shape[0] * shape[1])
    return (int(np.prod(shape)),)


def _get(hf: dict, *keys, default=None):
  for k in keys:
    if k in hf and hf[k] is not None:
      return hf[k]
  return default


def _act(name: str, field: str) -> str:
  ours = ACT_FROM_HF.get(name)
  if ours is None:
    raise UnsupportedArchitecture(f"config.json {field}={name!r} has no exact equivalent here (activations: "
                                  f"{', '.join(k for k, v in ACT_FROM_HF.items() if v)})")
  return ours


def _rope_theta(hf: dict) -> float:
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", "default")
  if kind not in ("default", None):
    raise UnsupportedArchitecture(f"config.json rope scaling {kind!r} is not implemented (only plain rotary "
                                  "positions with rope_theta); use a checkpoint without rope_scaling")
  return float(_get(hf, "rope_theta", default=params.get("rope_theta", 10000.0)))


# ----------------------------------------------------------------------------------------------
# Llama (decoder)

def llama_fields(hf: dict, names) -> dict:
  d, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  kv = int(_get(hf, "num_key_value_heads", default=n))
  attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
  if attention_bias != mlp_bias:
    raise UnsupportedArchitecture(f"config.json attention_bias={attention_bias} with mlp_bias={mlp_bias}: "
                                  "model.biases puts biases on every projection or none")
  head = int(_get(hf, "head_dim", default=d // n))
  return dict(family="decoder", vocab_size=int(hf["vocab_size"]), d_model=d, num_layers=int(hf["num_hidden_layers"]),
              num_heads=n, num_kv_heads=0 if kv == n else kv, head_dim=head, mlp_dim=int(hf["intermediate_size"]),
              gated_mlp=True, activation=_act(hf.get("hidden_act", "silu"), "hidden_act"), position="rotary",
              rotary_base=_rope_theta(hf), norm="rms", norm_position="pre", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
              biases=attention_bias, attention_scale="head_dim",
              tied_embeddings="lm_head.weight" not in names, max_len=int(hf.get("max_position_embeddings", 2048)))


def llama_config(m) -> dict:
  _require(m, "decoder", "LlamaForCausalLM", position="rotary", gated_mlp=True, norm="rms", norm_position="pre",
           attention_scale="head_dim", token_types=0, embedding_norm=False, head_transform=False,
           output_bias=False, tied_output_scale=False)
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": m.vocab_size,
          "hidden_size": m.d_model, "intermediate_size": m.mlp_dim, "num_hidden_layers": m.num_layers,
          "num_attention_heads": m.num_heads, "num_key_value_heads": m.kv_heads, "head_dim": m.head_dim,
          "hidden_act": ACT_TO_HF[m.activation], "max_position_embeddings": m.max_len, "rms_norm_eps": m.norm_eps,
          "rope_theta": m.rotary_base, "rope_parameters": {"rope_type": "default", "rope_theta": m.rotary_base},
          "rope_scaling": None, "attention_bias": m.biases, "mlp_bias": m.biases,
          "tie_word_embeddings": m.tied_embeddings, "attention_dropout": 0.0, "initializer_range": m.init_std}


def llama_tensors(m) -> list[Tensor]:
  out = [Tensor(("embedding",), "model.embed_tokens.weight"), Tensor(("final_norm",), "model.norm.weight")]
  if not m.tied_embeddings:
    out.append(Tensor(("head",), "lm_head.weight", "t"))
  p = "model.layers.{i}."
  layer = {"attn_norm": ("input_layernorm.weight", "same"), "mlp_norm": ("post_attention_layernorm.weight", "same"),
           "q": ("self_attn.q_proj.weight", "heads_in"), "k": ("self_attn.k_proj.weight", "heads_in"),
           "v": ("self_attn.v_proj.weight", "heads_in"), "o": ("self_attn.o_proj.weight", "heads_out"),
           "wi": ("mlp.gate_proj.weight", "t"), "wg": ("mlp.up_proj.weight", "t"), "wo": ("mlp.down_proj.weight", "t")}
  if m.biases:
    layer |= {"q_bias": ("self_attn.q_proj.bias", "heads_bias"), "k_bias": ("self_attn.k_proj.bias", "heads_bias"),
              "v_bias": ("self_attn.v_proj.bias", "heads_bias"), "o_bias": ("self_attn.o_proj.bias", "same"),
              "wi_bias": ("mlp.gate_proj.bias", "same"), "wg_bias": ("mlp.up_proj.bias", "same"),
              "wo_bias": ("mlp.down_proj.bias", "same")}
  return out + [Tensor(("layers", k), p + name, layout) for k, (name, layout) in layer.items()]


# ----------------------------------------------------------------------------------------------
# T5 (t5)

def t5_fields(hf: dict, names) -> dict:
  proj = str(hf.get("feed_forward_proj", "relu"))
  parts = proj.split("-")
  gated = parts[0] == "gated"
  if len(parts) > 2 or (len(parts) == 2 and not gated):
    raise UnsupportedArchitecture(f"config.json feed_forward_proj={proj!r} is not '{{act}}' or 'gated-{{act}}'")
  act = "gelu_new" if proj == "gated-gelu" else parts[-1]
  # transformers 5 ties T5's head unless the checkpoint stores a different lm_head, and rescales the
  # decoder output by d_model^-1/2 as its config's scale_decoder_outputs says (saved by 5.x), or
  # else unless tie_word_embeddings is false (4.x configs: the Hub's T5 v1.1 say false).
  untied = "lm_head.weight" in names
  scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
  layers = int(hf["num_layers"])
  return dict(family="t5", vocab_size=int(hf["vocab_size"]), d_model=int(hf["d_model"]), num_layers=layers,
              num_decoder_layers=int(_get(hf, "num_decoder_layers", default=layers)), num_heads=int(hf["num_heads"]),
              head_dim=int(hf["d_kv"]), mlp_dim=int(hf["d_ff"]), gated_mlp=gated,
              activation=_act(act, "feed_forward_proj"), position="relative",
              relative_buckets=int(hf.get("relative_attention_num_buckets", 32)),
              relative_max_distance=int(hf.get("relative_attention_max_distance", 128)), norm="rms",
              norm_position="pre", norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)), biases=False,
              attention_scale="none", num_kv_heads=0, tied_embeddings=not untied, tied_output_scale=bool(scale))


def t5_config(m) -> dict:
  _require(m, "t5", "T5ForConditionalGeneration", position="relative", norm="rms", norm_position="pre",
           biases=False, attention_scale="none", num_kv_heads=0, token_types=0, embedding_norm=False,
           head_transform=False, output_bias=False)
  if not m.tied_embeddings and m.tied_output_scale:
    raise UnsupportedArchitecture("model.tied_embeddings=False with tied_output_scale=True (an untied head that "
                                  "reads rescaled states) has no transformers 4.x equivalent and is re-tied by "
                                  "transformers 5's tie_weights(); export a tied or a v1.1-style (unscaled) head")
  # tie_word_embeddings says both "tied" and "rescaled" to transformers 4.x; 5.x reads
  # scale_decoder_outputs and ties lm_head only when it is absent or equal to shared.weight. A tied
  # head without the rescale is written as an lm_head copy (t5_tensors), so both read it right.
  tie = m.tied_output_scale
  proj = ("gated-" if m.gated_mlp else "") + T5_ACT_TO_HF[m.activation]
  proj = "gated-gelu" if proj == "gated-gelu_new" else proj
  return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": m.vocab_size,
          "d_model": m.d_model, "d_kv": m.head_dim, "d_ff": m.mlp_dim, "num_layers": m.num_layers,
          "num_decoder_layers": m.decoder_layers, "num_heads": m.num_heads,
          "relative_attention_num_buckets": m.relative_buckets,
          "relative_attention_max_distance": m.relative_max_distance, "layer_norm_epsilon": m.norm_eps,
          "feed_forward_proj": proj, "tie_word_embeddings": tie, "scale_decoder_outputs": m.tied_output_scale,
          "is_encoder_decoder": True,
          "decoder_start_token_id": 0, "dropout_rate": 0.0, "initializer_factor": 1.0}


def t5_tensors(m) -> list[Tensor]:
  out = [Tensor(("embedding",), "shared.weight"), Tensor(("encoder_norm",), "encoder.final_layer_norm.weight"),
         Tensor(("decoder_norm",), "decoder.final_layer_norm.weight"),
         Tensor(("encoder_relative",), "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
         Tensor(("decoder_relative",), "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")]
  if not m.tied_embeddings:
    out.append(Tensor(("head",), "lm_head.weight", "t"))
  elif not m.tied_output_scale:
    out.append(Tensor(("embedding",), "lm_head.weight", export_only=True))

  def attention(block, prefix):
    return {prefix + "q": (block + ".q.weight", "heads_in"), prefix + "k": (block + ".k.weight", "heads_in"),
            prefix + "v": (block + ".v.weight", "heads_in"), prefix + "o": (block + ".o.weight", "heads_out")}

  def mlp(layer):
    ff = layer + ".DenseReluDense."
    if m.gated_mlp:
      return {"wi": (ff + "wi_0.weight", "t"), "wg": (ff + "wi_1.weight", "t"), "wo": (ff + "wo.weight", "t")}
    return {"wi": (ff + "wi.weight", "t"), "wo": (ff + "wo.weight", "t")}

  enc = {"attn_norm": ("layer.0.layer_norm.weight", "same"), **attention("layer.0.SelfAttention", ""),
         "mlp_norm": ("layer.1.layer_norm.weight", "same"), **mlp("layer.1")}
  dec = {"attn_norm": ("layer.0.layer_norm.weight", "same"), **attention("layer.0.SelfAttention", ""),
         "cross_norm": ("layer.1.layer_norm.weight", "same"), **attention("layer.1.EncDecAttention", "cross_"),
         "mlp_norm": ("layer.2.layer_norm.weight", "same"), **mlp("layer.2")}
  out += [Tensor(("encoder_layers", k), "encoder.block.{i}." + name, layout) for k, (name, layout) in enc.items()]
  out += [Tensor(("decoder_layers", k), "decoder.block.{i}." + name, layout) for k, (name, layout) in dec.items()]
  return out


# ----------------------------------------------------------------------------------------------
# BERT (bert)

def bert_fields(hf: dict, names) -> dict:
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise UnsupportedArchitecture(f"config.json position_embedding_type={hf['position_embedding_type']!r}: only "
                                  "BERT's absolute (learned) positions are implemented")
  if not any(n.startswith("cls.predictions.") for n in names):
    raise UnsupportedArchitecture("the checkpoint has no MLM head (cls.predictions.*): it is a BertModel, not a "
                                  "BertForMaskedLM / BertForPreTraining; the bert family trains the MLM head too")
  d, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  return dict(family="bert", vocab_size=int(hf["vocab_size"]), d_model=d, num_layers=int(hf["num_hidden_layers"]),
              num_heads=n, head_dim=d // n, mlp_dim=int(hf["intermediate_size"]), gated_mlp=False,
              activation=_act(hf.get("hidden_act", "gelu"), "hidden_act"), position="learned",
              max_len=int(hf.get("max_position_embeddings", 512)), token_types=int(hf.get("type_vocab_size", 2)),
              norm="layer", norm_position="post", norm_eps=float(hf.get("layer_norm_eps", 1e-12)), biases=True,
              embedding_norm=True, head_transform=True, output_bias=True, attention_scale="head_dim",
              num_kv_heads=0, tied_embeddings="cls.predictions.decoder.weight" not in names)


def bert_config(m) -> dict:
  _require(m, "bert", "BertForMaskedLM", position="learned", gated_mlp=False, norm="layer", norm_position="post",
           biases=True, embedding_norm=True, head_transform=True, output_bias=True, attention_scale="head_dim",
           num_kv_heads=0, tied_output_scale=False)
  if m.d_model != m.num_heads * m.head_dim:
    raise UnsupportedArchitecture(f"BertForMaskedLM has head_dim = hidden_size / heads; model.head_dim={m.head_dim} "
                                  f"with {m.num_heads} heads and d_model={m.d_model}")
  return {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": m.vocab_size,
          "hidden_size": m.d_model, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
          "intermediate_size": m.mlp_dim, "hidden_act": ACT_TO_HF[m.activation],
          "max_position_embeddings": m.max_len, "type_vocab_size": max(m.token_types, 1),
          "layer_norm_eps": m.norm_eps, "position_embedding_type": "absolute", "hidden_dropout_prob": 0.0,
          "attention_probs_dropout_prob": 0.0, "tie_word_embeddings": m.tied_embeddings,
          "initializer_range": m.init_std}


def bert_tensors(m) -> list[Tensor]:
  e = "bert.embeddings."
  out = [Tensor(("embedding",), e + "word_embeddings.weight"), Tensor(("pos_embedding",), e + "position_embeddings.weight"),
         Tensor(("embedding_norm",), e + "LayerNorm.weight"), Tensor(("embedding_norm_bias",), e + "LayerNorm.bias"),
         Tensor(("head_dense",), "cls.predictions.transform.dense.weight", "t"),
         Tensor(("head_dense_bias",), "cls.predictions.transform.dense.bias"),
         Tensor(("head_norm",), "cls.predictions.transform.LayerNorm.weight"),
         Tensor(("head_norm_bias",), "cls.predictions.transform.LayerNorm.bias"),
         Tensor(("output_bias",), "cls.predictions.bias")]
  if m.token_types:
    out.append(Tensor(("type_embedding",), e + "token_type_embeddings.weight"))
  if not m.tied_embeddings:
    out.append(Tensor(("head",), "cls.predictions.decoder.weight", "t"))
  a = "attention."
  layer = {"q": (a + "self.query.weight", "heads_in"), "q_bias": (a + "self.query.bias", "heads_bias"),
           "k": (a + "self.key.weight", "heads_in"), "k_bias": (a + "self.key.bias", "heads_bias"),
           "v": (a + "self.value.weight", "heads_in"), "v_bias": (a + "self.value.bias", "heads_bias"),
           "o": (a + "output.dense.weight", "heads_out"), "o_bias": (a + "output.dense.bias", "same"),
           "attn_norm": (a + "output.LayerNorm.weight", "same"), "attn_norm_bias": (a + "output.LayerNorm.bias", "same"),
           "wi": ("intermediate.dense.weight", "t"), "wi_bias": ("intermediate.dense.bias", "same"),
           "wo": ("output.dense.weight", "t"), "wo_bias": ("output.dense.bias", "same"),
           "mlp_norm": ("output.LayerNorm.weight", "same"), "mlp_norm_bias": ("output.LayerNorm.bias", "same")}
  return out + [Tensor(("layers", k), "bert.encoder.layer.{i}." + name, layout) for k, (name, layout) in layer.items()]


# Old BERT checkpoints (TensorFlow ports) name LayerNorm parameters gamma / beta.
LEGACY_NAMES = ((".LayerNorm.weight", ".LayerNorm.gamma"), (".LayerNorm.bias", ".LayerNorm.beta"))


@dataclasses.dataclass(frozen=True)
class Architecture:
  model_types: tuple[str, ...]
  family: str
  hf_class: str
  auto_class: str
  fields: object      # (hf config dict, tensor names) -> model section fields
  config: object      # ModelConfig -> transformers config dict
  tensors: object     # ModelConfig -> [Tensor]


ARCHITECTURES = (
    Architecture(("llama",), "decoder", "LlamaForCausalLM", "AutoModelForCausalLM", llama_fields, llama_config,
                 llama_tensors),
    Architecture(("t5", "mt5"), "t5", "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM", t5_fields, t5_config,
                 t5_tensors),
    Architecture(("bert",), "bert", "BertForMaskedLM", "AutoModelForMaskedLM", bert_fields, bert_config, bert_tensors),
)


def for_model_type(model_type: str) -> Architecture:
  for arch in ARCHITECTURES:
    if model_type in arch.model_types:
      return arch
  supported = ", ".join(f"{t} ({a.hf_class} -> model.family={a.family})" for a in ARCHITECTURES for t in a.model_types)
  raise UnsupportedArchitecture(f"config.json model_type={model_type!r} is not supported; supported: {supported}")


def for_family(family: str) -> Architecture:
  for arch in ARCHITECTURES:
    if arch.family == family:
      return arch
  raise UnsupportedArchitecture(f"model.family={family!r} has no transformers equivalent")


def _require(m, family, hf_class, **fields):
  """Refuses a model whose options ``hf_class`` cannot hold, naming the first one."""
  for name, want in fields.items():
    if getattr(m, name) != want:
      raise UnsupportedArchitecture(f"{hf_class} has no equivalent of model.{name}={getattr(m, name)!r} (it needs "
                                    f"{want!r}); this {family} model cannot be exported to transformers")
