"""What each device tier runs: its static export, scored and timed.

docs/design.md, section 1.4. The federation trains one global model; a
device of keep ratio p gets a static TFLite sub-model of it (constant,
smaller convolutions, no top-k: the deployment path of docs/export.md):

* FedDP: each gated layer keeps the k channels its gates select most often
  on calibration images (`channels.static_channels`), still scaled by
  their saliency, with batch norm recomputed for that sub-model on the
  same images (the global statistics average clients of every width);
* HeteroFL and FjORD: the first k channels of every layer (their
  sub-model), with static batch norm: moving statistics recomputed on the
  calibration images at width p (`evaluation.calibrate_batch_norm`);
* a dense model: every channel, for every tier.

Calibration images are a sample of the pooled training data, never the
test images the export is scored on.
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

from tff_fedprune import gated_conv
from tff_fedprune import model_state
from tff_fedprune.export import channels as channel_maps
from tff_fedprune.export import tflite
from tff_fedprune.simulation import evaluation


@dataclasses.dataclass(frozen=True)
class TierExport:
  """One tier's static export and how it does on the test set."""

  label: str
  keep_ratio: float
  keras_accuracy: float  # The model at the tier's keep ratio (dynamic).
  static_bn_accuracy: float  # With BN statistics recomputed (nan: dense).
  export_accuracy: float  # The static TFLite export, one image per invoke.
  latency_ms: float  # Median LiteRT invoke, XNNPACK, one thread.
  dense_latency_ms: float  # The same weights, every channel.
  size_bytes: int


def _channels(model, keep_ratio, calibration):
  """The export's fixed channel sets (None: prefixes or dense)."""
  gated = gated_conv.gated_layers(model)
  if not gated or gated[0].gate.prefix:
    return None
  batches = tf.data.Dataset.from_tensor_slices(calibration).batch(256)
  return channel_maps.static_channels(model, batches, keep_ratio)


def _moving_statistics(model) -> list:
  return [(l.moving_mean.numpy(), l.moving_variance.numpy())
          for l in gated_conv.conv_layers(model)]


def _restore(model, statistics) -> None:
  for layer, (mean, variance) in zip(gated_conv.conv_layers(model),
                                     statistics):
    layer.moving_mean.assign(mean)
    layer.moving_variance.assign(variance)


def _calibrate_static(model, channels, calibration) -> None:
  """Static BN of the sub-model keeping `channels`, into `model`."""
  reference = channel_maps.reference_model(model, channels)
  evaluation.calibrate_batch_norm(reference, calibration)
  for layer in gated_conv.conv_layers(reference):
    target = model.get_layer(layer.name)
    target.moving_mean.assign(layer.moving_mean)
    target.moving_variance.assign(layer.moving_variance)


def export_tier(model, label, keep_ratio, calibration, images, labels, mean,
                std, invokes=200) -> TierExport:
  """`model`'s export for a tier of `keep_ratio`, scored on raw `images`.

  `calibration`: preprocessed pooled training images. The model is left at
  the tier's keep ratio, its batch-norm statistics as they were.
  """
  trained = _moving_statistics(model)
  gated = gated_conv.gated_layers(model)
  prefix = bool(gated) and gated[0].gate.prefix
  accuracy = lambda: float(np.mean(
      tflite.keras_logits(model, images, mean, std).argmax(-1) == labels))
  if gated:
    model_state.set_keep_ratio(model, keep_ratio)
  if prefix:
    evaluation.calibrate_batch_norm(model, calibration)
  keras = accuracy()
  static_bn = math.nan
  if gated and not prefix:
    evaluation.calibrate_batch_norm(model, calibration)
    static_bn = accuracy()
    _restore(model, trained)
  channels = _channels(model, keep_ratio, calibration)
  if channels is not None:
    _calibrate_static(model, channels, calibration)
  content = tflite.convert(tflite.inference_function(
      model, mean, std, channels=channels))
  dense = tflite.convert(tflite.inference_function(model, mean, std,
                                                   dense=True))
  exported = tflite.run(content, images, runtime='litert').argmax(-1)
  _restore(model, trained)
  image = images[:1]
  return TierExport(
      label=label, keep_ratio=float(keep_ratio), keras_accuracy=keras,
      static_bn_accuracy=keras if prefix else static_bn,
      export_accuracy=float(np.mean(exported == labels)),
      latency_ms=tflite.median_latency_ms(content, image, invokes=invokes),
      dense_latency_ms=tflite.median_latency_ms(dense, image, invokes=invokes),
      size_bytes=len(content),
  )
