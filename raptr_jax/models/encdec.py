"""Encoder-decoder transformer (T5 v1.1; Raffel et al. 2020 and the T5 v1.1 release notes).

T5 v1.1 choices: RMSNorm pre-LN blocks without biases, gated-GELU MLP (tanh GELU, transformers'
``gelu_new``), relative-position attention bias (32 buckets, max distance 128; bidirectional
buckets in the encoder, causal in the decoder; one table per stack shared by its layers, none in
cross-attention), attention logits NOT divided by sqrt(head_dim) (``attention_scale='none'``:
T5 folds that factor into the queries' initialisation, ``init='t5'``), a token embedding shared
by encoder and decoder inputs, and an untied output head. The original T5 (``model.activation=
relu``, ``gated_mlp=False``, ``tied_embeddings=True``, ``tied_output_scale=True``) is the same
module; ``models/presets.py`` maps both to ``T5ForConditionalGeneration``. Both stacks are the stacked-layer core, so a method's
selection can act on the encoder, the decoder or both (``EncoderDecoderSelection``; a plain
``Selection`` is refused rather than guessed at). The loss is cross-entropy on the targets.
"""
from flax import nnx

from raptr_jax.models import embeddings, layers
from raptr_jax.models.config import ModelConfig
from raptr_jax.models.core import StackedLayers
from raptr_jax.models.selection import EncoderDecoderSelection

BATCH_FIELDS = ("encoder_inputs", "encoder_segment_ids", "encoder_positions", "decoder_inputs",
                "targets", "weights", "decoder_segment_ids", "decoder_positions")


class EncoderDecoderLM(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    embeddings.init_embeddings(self, cfg, rngs)
    self.encoder_layers = StackedLayers(cfg, rngs=rngs, causal=False)
    embeddings.add_norm(self, "encoder_norm", rngs, cfg)
    self.decoder_layers = StackedLayers(cfg, rngs=rngs, causal=True, cross_attention=True,
                                        num_layers=cfg.decoder_layers)
    embeddings.init_output(self, cfg, rngs, "decoder_norm")
    if cfg.position == "relative":
      self.encoder_relative = embeddings.relative_table(rngs, cfg)
      self.decoder_relative = embeddings.relative_table(rngs, cfg)

  def __call__(self, encoder_inputs, decoder_inputs, encoder_positions=None, decoder_positions=None,
               encoder_segment_ids=None, decoder_segment_ids=None,
               selection: EncoderDecoderSelection | None = None):
    """Input ids [B, S] and decoder input ids [B, T] -> fp32 logits [B, T, V]."""
    if selection is not None and not isinstance(selection, EncoderDecoderSelection):
      raise TypeError("an encoder-decoder model takes an EncoderDecoderSelection (one Selection per "
                      "stack); wrap the method's select function with models.selection.for_stacks")
    enc_sel = selection.encoder if selection is not None else None
    dec_sel = selection.decoder if selection is not None else None
    relative = self.cfg.position == "relative"
    enc_pos = embeddings.default_positions(encoder_inputs, encoder_positions)
    x = embeddings.embed(self, encoder_inputs, enc_pos)
    x = self.encoder_layers(x, enc_pos, encoder_segment_ids, None, enc_sel,
                            relative_table=self.encoder_relative.value if relative else None)
    encoded = layers.norm(x, embeddings.params_of(self, ("encoder_norm", "encoder_norm_bias")), "encoder_norm", self.cfg)
    dec_pos = embeddings.default_positions(decoder_inputs, decoder_positions)
    y = embeddings.embed(self, decoder_inputs, dec_pos)
    y = self.decoder_layers(y, dec_pos, decoder_segment_ids, None, dec_sel,
                            relative_table=self.decoder_relative.value if relative else None,
                            context=encoded, context_segment_ids=encoder_segment_ids)
    return embeddings.output_logits(self, y, "decoder_norm")


def logits_fn(model: EncoderDecoderLM, batch, selection=None, packed: bool = True):
  seg = lambda k: batch[k] if packed else None
  return model(batch["encoder_inputs"], batch["decoder_inputs"], batch["encoder_positions"],
               batch["decoder_positions"], seg("encoder_segment_ids"), seg("decoder_segment_ids"),
               selection)


def loss_fn(model: EncoderDecoderLM, batch, selection=None, packed: bool = True):
  logits = logits_fn(model, batch, selection, packed)
  return embeddings.token_mean_loss(logits, batch["targets"], batch["weights"],
                                    batch["decoder_segment_ids"] if packed else None)
