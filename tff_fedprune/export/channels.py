"""Which channels each gated layer keeps in a static, device-specialised export.

docs/design.md, section 7. A channel map names gated layers (and, for a
narrowed residual stream, residual additions) with the fixed channel set
each keeps for every input (`ALL_CHANNELS`: every channel, still scaled by
its saliency). `static_channels` picks the channels a device's own data
selects most often, `gate_policy` exports small layers at full width, and
`reference_model` is the Keras model that computes what such an export
computes (`GatedConv2D.fix_channels`, `MaskedAdd`), for parity checks and
accuracy.
"""

import numpy as np
import tensorflow as tf

from tff_fedprune import gated_conv
from tff_fedprune.simulation import flops

# A channel map value: the layer computes every channel (still scaled by s).
ALL_CHANNELS = None


def check_channels(model, channels):
  """`channels` with sorted index arrays; ValueError if it names bad layers."""
  widths = {l.name: l.filters for l in gated_conv.gated_layers(model)}
  additions = {l.name: l.output_shape[-1] for l in model.layers
               if isinstance(l, tf.keras.layers.Add)}
  checked = {}
  for name, kept in channels.items():
    if name not in widths and name not in additions:
      raise ValueError(f'{name!r} is neither a gated layer nor a residual'
                       f' addition of {model.name}')
    width = widths.get(name) or additions[name]
    if kept is ALL_CHANNELS and name in additions:
      raise ValueError(f'a residual addition ({name!r}) needs a channel set')
    if kept is not ALL_CHANNELS:
      kept = gated_conv.channel_set(kept, width, name)
    checked[name] = kept
  return checked


RESIDUALS = ('full', 'inner', 'shared')


def _residual_writers(model):
  """{residual addition: the gated layers whose output it adds}."""
  writers = {}
  for layer in model.layers:
    if isinstance(layer, tf.keras.layers.Add):
      writers[layer] = [l for l in gated_conv.inbound_layers(layer)
                        if isinstance(l, gated_conv.GatedConv2D) and l.gated]
  return writers


def static_channels(
    model: tf.keras.Model,
    dataset,
    keep_ratio: float | None = None,
    channel_multiple: int = 1,
    residual: str = 'full',
) -> dict[str, np.ndarray]:
  """Each gated layer's k channels that its gates keep most often on `dataset`.

  `dataset` yields batches of preprocessed images (or (images, labels)),
  a device's own data, never the images the export is scored on. The gates
  run in inference mode (BN statistics untouched); k = max(1, round(rho *
  C_out)) with rho `keep_ratio` or each layer's own, then rounded to the
  nearest multiple of `channel_multiple` (at least one multiple, at most
  C_out): XNNPACK computes output channels in tiles of 8 or 16, so 11
  channels cost as much as 16. Ties go to the lower channel index.

  `residual` (models with residual additions): 'full' prunes every gated
  layer and scatters what joins the full-width residual stream back to full
  width; 'inner' prunes only the layers inside a block (those writing to the
  stream keep every channel); 'shared' narrows the stream itself: all
  additions of one width and the layers writing to them share one set (the
  k channels those layers keep most often, summed), so every convolution of
  a stage reads and writes only kept channels.
  """
  if channel_multiple < 1:
    raise ValueError(f'channel_multiple must be >= 1, got {channel_multiple}')
  if residual not in RESIDUALS:
    raise ValueError(f'residual must be one of {RESIDUALS}, got {residual!r}')
  layers = gated_conv.gated_layers(model)
  if not layers:
    raise ValueError(f'{model.name} has no gated layers to specialise')
  if keep_ratio is not None and not 0 < keep_ratio <= 1:
    raise ValueError(f'keep_ratio must be in (0, 1], got {keep_ratio}')
  measured = flops.measure_gates(model, dataset)
  if not len(measured.flops):
    raise ValueError('no calibration images')
  frequency = {l.name: f for l, f in zip(layers, measured.frequency)}

  def most_often(share, rho, width):
    k = rounded_k(rho, width, channel_multiple)
    return np.sort(np.argsort(-share, kind='stable')[:k])

  def rho_of(layer):
    return keep_ratio if keep_ratio is not None else layer.keep_ratio

  channels = {l.name: most_often(frequency[l.name], rho_of(l), l.filters)
              for l in layers}
  writers = _residual_writers(model)
  if residual == 'inner':
    channels.update({l.name: ALL_CHANNELS
                     for group in writers.values() for l in group})
  elif residual == 'shared':
    by_width = {}
    for addition, group in writers.items():
      by_width.setdefault(addition.output_shape[-1], []).append(
          (addition, group))
    for width, members in by_width.items():
      group = [l for _, g in members for l in g]
      if not group:
        continue
      share = sum(frequency[l.name] for l in group)
      kept = most_often(share, rho_of(group[0]), width)
      channels.update({l.name: kept for l in group})
      channels.update({a.name: kept for a, _ in members})
  return channels


def rounded_k(keep_ratio, filters: int, multiple: int = 1) -> int:
  """k = max(1, round(rho * C)) moved to the nearest multiple or to C.

  Candidates: the multiples of `multiple` in [multiple, C] and C itself;
  ties go to the larger.
  """
  k = int(gated_conv.num_kept(keep_ratio, filters))
  below = max(multiple, multiple * (k // multiple))
  above = min(filters, multiple * -(-k // multiple))
  return min(filters, below if k - below < above - k else above)


def gate_policy(model: tf.keras.Model, min_flops: float) -> dict:
  """`channels` that export every gated layer below `min_flops` at full width.

  A layer's size is its dense convolution's FLOPs per image. Such a layer
  still scales its channels by their input-dependent saliency (a gate is not
  a constant), but has no top-k: on XNNPACK a small layer's gathered filters
  cost more than the channels they skip (docs/export.md).
  """
  return {l.name: ALL_CHANNELS for l in gated_conv.gated_layers(model)
          if flops.layer_flops(l) < min_flops}


@tf.keras.utils.register_keras_serializable(package='tff_fedprune')
class MaskedAdd(tf.keras.layers.Add):
  """A residual addition that keeps only the channels `kept` of its sum."""

  def __init__(self, kept, **kwargs):
    super().__init__(**kwargs)
    self.kept = [int(c) for c in kept]

  def call(self, inputs):
    width = inputs[0].shape[-1]
    mask = np.zeros(width, np.float32)
    mask[self.kept] = 1.0
    return super().call(inputs) * mask

  def get_config(self):
    return dict(super().get_config(), kept=self.kept)


def reference_model(model: tf.keras.Model, channels) -> tf.keras.Model:
  """A copy of `model` whose named layers keep their fixed channel sets.

  The Keras counterpart of `tflite.inference_function(..., channels=...)`:
  each named gated layer keeps its set (`GatedConv2D.fix_channels`; all
  channels for `ALL_CHANNELS`) for every sample, saliency still scaling the
  kept channels, and each named residual addition becomes a `MaskedAdd`
  that zeroes the channels outside its set. Same weights, same keep ratios.
  """
  channels = check_channels(model, channels)

  def clone(layer):
    config = layer.get_config()
    if layer.name not in channels:
      return layer.__class__.from_config(config)
    kept = channels[layer.name]
    if isinstance(layer, tf.keras.layers.Add):
      return MaskedAdd(kept, **config)
    config['fixed_channels'] = gated_conv.ALL if kept is ALL_CHANNELS else [
        int(c) for c in kept]
    return layer.__class__.from_config(config)

  reference = tf.keras.models.clone_model(model, clone_function=clone)
  reference.set_weights(model.get_weights())
  return reference
