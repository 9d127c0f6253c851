"""Analytic training FLOPs of the transformer (model FLOPs: no remat recompute), and MFU.

Per token, the forward pass of one layer costs 2 * (matmul parameters) FLOPs plus attention
scores: QK^T and AV each 2 * T * heads * head_dim, halved for causal attention (MaxText's
convention). The head adds 2 * d * V. Training = 3 x forward (backward = 2 x forward).
A layer that sees only ``r`` of ``T`` tokens costs its matmuls on r tokens and attention on r^2.
"""
import dataclasses

import jax

# Dense bf16 peak FLOP/s per device (no sparsity).
PEAK_BF16_FLOPS = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
    "A100": 312e12, "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
    "TPU v3": 123e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def layer_forward_flops(cfg, tokens: int, seq_len: int, causal: bool = True) -> float:
  """Forward FLOPs of one block over ``tokens`` tokens arranged in rows of ``seq_len``."""
  d, n, h, f = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  proj = 2 * d * n * h * 4
  mlp = 2 * d * f * (3 if cfg.gated_mlp else 2)
  attn = 2 * 2 * seq_len * n * h * (0.5 if causal else 1.0)
  return tokens * (proj + mlp + attn)


def train_flops_per_step(cfg, batch: int, seq_len: int, num_layers: int | None = None,
                         dropped_layers: int = 0, kept_tokens: int | None = None,
                         causal: bool = True) -> float:
  """Model FLOPs of one training step (forward + backward) of ``num_layers`` active layers,
  ``dropped_layers`` of which see only ``kept_tokens`` tokens per row."""
  num_layers = cfg.num_layers if num_layers is None else num_layers
  tokens = batch * seq_len
  full = layer_forward_flops(cfg, tokens, seq_len, causal) * (num_layers - dropped_layers)
  if dropped_layers:
    r = kept_tokens or seq_len
    full += layer_forward_flops(cfg, batch * r, r, causal) * dropped_layers
  head = 2 * cfg.d_model * cfg.vocab_size * tokens
  return 3.0 * (full + head)


def cross_attention_forward_flops(cfg, batch: int, q_len: int, kv_len: int) -> float:
  """Forward FLOPs of one cross-attention sublayer: q/o projections on the queries, k/v on the
  encoder tokens, scores and values over every encoder position."""
  proj = 2 * cfg.d_model * cfg.num_heads * cfg.head_dim
  return batch * (2 * proj * q_len + 2 * proj * kv_len + 2 * 2 * q_len * kv_len * cfg.num_heads * cfg.head_dim)


def family_train_flops(family: str, cfg, batch: int, seq_len: int, target_len: int = 0,
                       num_layers: int | None = None, token_drop: dict | None = None,
                       layer_passes: float = 3.0) -> float:
  """Model FLOPs of one training step of a family (``num_layers`` active layers per stack).

  decoder: causal layers + head on every position. bert: bidirectional layers + head on the
  ``max_predictions`` sparse positions (every position when 0). t5: bidirectional encoder on
  ``seq_len`` inputs; causal decoder with cross-attention on ``target_len`` targets; head on
  the targets. ``token_drop`` ({stack: (kept tokens per row, layers that keep them)}, stacks
  ``layers`` or t5's ``encoder`` / ``decoder``): random-LTD's layers that see only their kept
  tokens (a decoder layer's cross-attention then has that many queries over every input).
  ``layer_passes``: forward-equivalent passes of the layers per step, 3 (forward, then input and
  parameter gradients) unless a method's gradient routing runs other backward passes
  (``Stage.layer_passes``); embedding, heads and loss keep 3 (interlocking's probe heads, whose
  losses train no component, need no input gradient: 2 would be exact, one head forward less)."""
  drop = token_drop or {}

  def stack(name, length, layers, causal, cross=0):
    kept, wrapped = drop.get(name, (length, 0))
    one = lambda q: layer_forward_flops(cfg, batch * q, q, causal) + (
        cross_attention_forward_flops(cfg, batch, q, cross) if cross else 0.0)
    return one(length) * (layers - wrapped) + one(kept) * wrapped

  head = lambda positions: 2 * cfg.d_model * cfg.vocab_size * batch * positions
  # Interlocking backprop's auxiliary heads: their blocks on every token and a head each.
  aux = lambda causal, positions: getattr(cfg, "aux_heads", 0) * (
      layer_forward_flops(cfg, batch * seq_len, seq_len, causal) * cfg.aux_head_layers + head(positions))
  if family == "decoder":
    layers = cfg.num_layers if num_layers is None else num_layers
    return layer_passes * stack("layers", seq_len, layers, True) + 3.0 * (head(seq_len) + aux(True, seq_len))
  if family == "bert":
    layers = cfg.num_layers if num_layers is None else num_layers
    positions = cfg.max_predictions or seq_len
    return layer_passes * stack("layers", seq_len, layers, False) + 3.0 * (head(positions) + aux(False, positions))
  if family == "t5":
    t = target_len or max(1, seq_len // 4)
    enc = stack("encoder", seq_len, cfg.num_layers if num_layers is None else num_layers, False)
    dec = stack("decoder", t, cfg.decoder_layers if num_layers is None else num_layers, True, cross=seq_len)
    return layer_passes * (enc + dec) + 3.0 * head(t)
  raise ValueError(f"no FLOP count for family {family!r}")


def stack_lengths(family: str, seq_len: int, target_len: int = 0) -> dict[str, int]:
  """{stack: tokens per row} of a family's layer stacks (t5's decoder runs on the targets)."""
  if family == "t5":
    return {"encoder": seq_len, "decoder": target_len or max(1, seq_len // 4)}
  return {"layers": seq_len}


class StageFlops:
  """Model FLOPs of one step of a plan stage: its active layers, its architecture
  (``stage.view`` and ``stage.width`` override model fields such as ``num_layers`` or
  ``num_heads``), its dropped tokens (``stage.token_drop``), and for a dynamic layer count
  (``stage.layer_fraction``) the expected count at the step's budget fraction. Static stages
  are computed once. ``layer_tokens`` counts a step's layer-tokens (random-LTD's LayerToken:
  the sum over layers of the tokens each layer saw)."""

  def __init__(self, family: str, cfg, batch: int, seq_len: int, target_len: int = 0):
    self.cfg = cfg
    self.batch = batch
    self.lengths = stack_lengths(family, seq_len, target_len)
    self._of = lambda c, layers=None, drop=None, passes=3.0: family_train_flops(
        family, c, batch, seq_len, target_len, layers, drop, passes)
    self.full = self._of(cfg)
    # Share of a full step's FLOPs spent in the layers (the rest: embedding, head, loss).
    self.layer_share = 1.0 - self._of(cfg, 0) / self.full
    self.full_layer_tokens = self.layer_tokens(None, 0.0)
    self._static = {}

  def layers(self, stage, fraction: float) -> float:
    """(Expected) layers a step of ``stage`` at budget ``fraction`` runs."""
    if stage.layer_fraction is not None:
      return self.cfg.num_layers * stage.layer_fraction(fraction)
    return stage.active_layers or stage.model_fields().get("num_layers", self.cfg.num_layers)

  def layer_tokens(self, stage, fraction: float) -> float:
    """Layer-tokens of one step: per stack, the tokens each (expected) active layer saw."""
    fields = stage.model_fields() if stage is not None else {}
    share = 1.0
    if stage is not None and stage.layer_fraction is not None:
      share = stage.layer_fraction(fraction)
    drop = (stage.token_drop if stage is not None else None) or {}
    total = 0.0
    for name, length in self.lengths.items():
      if stage is not None and stage.active_layers is not None:
        layers = stage.active_layers
      elif name == "decoder":
        layers = fields.get("num_layers", self.cfg.decoder_layers)
      else:
        layers = fields.get("num_layers", self.cfg.num_layers)
      kept, wrapped = drop.get(name, (length, 0))
      total += self.batch * (length * (layers * share - wrapped) + kept * wrapped)
    return total

  def __call__(self, stage, fraction: float) -> float:
    if stage.shape not in self._static:
      cfg = dataclasses.replace(self.cfg, **stage.model_fields())
      layers = None if stage.layer_fraction is not None else stage.active_layers
      self._static[stage.shape] = self._of(cfg, layers, stage.token_drop, stage.layer_passes or 3.0)
    if stage.layer_fraction is not None:  # all layers' FLOPs, the layers' share scaled
      return self._static[stage.shape] * (1.0 - self.layer_share * (1.0 - stage.layer_fraction(fraction)))
    return self._static[stage.shape]


def device_peak_flops(device=None) -> float | None:
  """bf16 peak of a known accelerator, else None (CPU: MFU is not reported)."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  for name, peak in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return peak
  return None
