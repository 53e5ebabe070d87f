"""Inference FLOPs of dense and dynamically pruned models (docs/design.md 5).

A convolution costs 2 * H_out * W_out * k_h * k_w * C_in * C_out FLOPs and a
dense layer 2 * in * out. For a gated model each sample's cost uses its active
channels: a gated layer computes only the output channels whose gate is
non-zero, and reads only the input channels that the gated layer feeding it
(through pooling or a ReLU) kept; an input behind a residual addition is
full-width. The gate itself costs its average pool and its matrix product.

The same pass measures how input-dependent the gates are (`measure_gates`):
per gated layer, the mean pairwise Jaccard index of the samples' kept channel
sets, and the share of channels that any sample keeps.
"""

import dataclasses
from typing import Mapping

import numpy as np
import tensorflow as tf

from tff_fedprune import compact_training
from tff_fedprune import gated_conv

def _conv_flops(layer: gated_conv.GatedConv2D, cin, cout):
  _, h, w, _ = layer.output_shape
  return 2.0 * h * w * layer.kernel_size**2 * cin * cout


def _gate_flops(layer: gated_conv.GatedConv2D):
  if not layer.learned_gate:
    return 0.0
  _, h, w, cin = layer.input_shape
  return float(h * w * cin + 2 * cin * layer.filters)


def layer_flops(layer: gated_conv.GatedConv2D) -> float:
  """FLOPs of the layer's convolution over every channel, one image."""
  return _conv_flops(layer, layer.input_shape[-1], layer.filters)


def dense_flops(model: tf.keras.Model) -> float:
  """FLOPs of one sample through every channel, without gate costs."""
  return compact_training.forward_flops(model, gates=False)


def top_k_flops(model: tf.keras.Model, keep_ratio: float) -> float:
  """FLOPs of one sample when every gated layer computes exactly its k channels.

  This is what the TFLite export computes (`export.tflite`): k output channels
  per gated layer whatever their saliency, k input channels where the input
  comes from a gated layer, plus the gates. `dynamic_flops` instead counts a
  kept channel of zero saliency as skipped.
  """
  return kept_flops(model, {
      l.name: int(gated_conv.num_kept(keep_ratio, l.filters))
      for l in gated_conv.gated_layers(model)
  })


def kept_flops(model: tf.keras.Model, kept: Mapping[str, int]) -> float:
  """FLOPs of one sample when gated layer `name` computes `kept[name]` channels.

  Every gated layer of `model` must be named; each reads the channels its
  feeding gated layer computes and pays its gate. An input behind a residual
  addition is full width unless `kept` names the addition too (a narrowed
  residual stream, `export.channels.static_channels`).
  """
  total = dense_flops(model)
  for layer in gated_conv.gated_layers(model):
    feeder = gated_conv.feeding_gate(layer) or _feeding_addition(layer)
    cin = layer.input_shape[-1]
    kept_in = kept.get(feeder.name, cin) if feeder else cin
    total += (_conv_flops(layer, kept_in, kept[layer.name])
              + _gate_flops(layer) - _conv_flops(layer, cin, layer.filters))
  return total


def _feeding_addition(layer):
  """The residual addition whose output reaches `layer` through a ReLU."""
  source = gated_conv.channel_source(layer)
  return source if isinstance(source, tf.keras.layers.Add) else None


@dataclasses.dataclass(frozen=True)
class GateMeasurements:
  """What the gates did on a dataset, per sample and per gated layer.

  Attributes:
    flops: per-sample dynamic FLOPs.
    jaccard: per gated layer, the mean over pairs of samples of the Jaccard
      index of their kept channel sets (1: every sample keeps the same
      channels, static pruning), over the first `JACCARD_SAMPLES` samples.
    ever_kept: per gated layer, the share of channels kept by at least one
      sample.
    frequency: per gated layer, for each channel the share of samples that
      keep it.
  """

  flops: np.ndarray
  jaccard: list
  ever_kept: list
  frequency: list


JACCARD_SAMPLES = 512


def mean_pairwise_jaccard(kept: np.ndarray) -> float:
  """Mean Jaccard index over all pairs of rows of a 0/1 (samples, C) array."""
  kept = kept.astype(np.float64)
  n = len(kept)
  if n < 2:
    return float('nan')
  inter = kept @ kept.T
  sizes = kept.sum(axis=1)
  union = sizes[:, None] + sizes[None, :] - inter
  jaccard = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
  upper = np.triu_indices(n, k=1)
  return float(jaccard[upper].mean())


def kept_channels(layers, inputs) -> list:
  """Per-sample kept-channel masks of gated `layers` given their inputs."""
  return [tf.not_equal(l.channel_gates(x), 0.0) for l, x in zip(layers, inputs)]


class GateCounter:
  """Accumulates the kept channels of a model's gated layers, batch by batch.

  `add` takes the masks of `kept_channels` for the layers of
  `gated_conv.gated_layers` (none for an ungated model) and the batch size.
  """

  def __init__(self, model: tf.keras.Model):
    self.gated = gated_conv.gated_layers(model)
    self._static = dense_flops(model) - sum(
        _conv_flops(l, l.input_shape[-1], l.filters) for l in self.gated
    )
    self._feeders = [gated_conv.feeding_gate(l) for l in self.gated]
    self._index = {id(l): i for i, l in enumerate(self.gated)}
    self._flops, self._kept = [], [[] for _ in self.gated]

  def add(self, kept, batch_size: int) -> None:
    counts = [k.sum(axis=1) for k in kept]
    flops = np.full(batch_size, self._static)
    for layer, feeder, cout in zip(self.gated, self._feeders, counts):
      cin = (counts[self._index[id(feeder)]] if feeder is not None
             else layer.input_shape[-1])
      flops += _conv_flops(layer, cin, cout) + _gate_flops(layer)
    self._flops.append(flops)
    for sets, k in zip(self._kept, kept):
      sets.append(k)

  def result(self) -> GateMeasurements:
    kept = [np.concatenate(sets) if sets else np.zeros((0, l.filters), bool)
            for l, sets in zip(self.gated, self._kept)]
    return GateMeasurements(
        flops=np.concatenate(self._flops) if self._flops else np.zeros(0),
        jaccard=[mean_pairwise_jaccard(k[:JACCARD_SAMPLES]) for k in kept],
        ever_kept=[float(k.any(axis=0).mean()) for k in kept],
        frequency=[k.mean(axis=0) if len(k) else np.zeros(k.shape[1])
                   for k in kept],
    )


def measure_gates(model: tf.keras.Model, dataset) -> GateMeasurements:
  """Per-sample FLOPs and gate dynamics of a Keras functional model.

  One pass over `dataset` (image batches or `(images, labels)` batches,
  preprocessed as the model expects), gates in inference mode.
  (`evaluation.Evaluator` measures the same in its accuracy pass.)
  """
  counter = GateCounter(model)
  if not counter.gated:
    for batch in dataset:
      counter.add([], int(tf.shape(_images(batch))[0]))
    return counter.result()
  probe = tf.keras.Model(model.inputs, [l.input for l in counter.gated])

  @tf.function
  def kept_masks(images):
    inputs = probe(images, training=False)
    return kept_channels(
        counter.gated, inputs if isinstance(inputs, list) else [inputs])

  for batch in dataset:
    images = _images(batch)
    kept = [k.numpy() for k in kept_masks(images)]
    counter.add(kept, int(tf.shape(images)[0]))
  return counter.result()


def dynamic_flops(model: tf.keras.Model, dataset) -> np.ndarray:
  """Per-sample FLOPs of a (gated) Keras functional model over `dataset`."""
  return measure_gates(model, dataset).flops


def dynamic_flops_ratio(model: tf.keras.Model, dataset) -> float:
  """Mean dynamic FLOPs over the dense FLOPs of the same model (1 if ungated)."""
  if not gated_conv.gated_layers(model):
    return 1.0
  return float(np.mean(dynamic_flops(model, dataset)) / dense_flops(model))


def _images(batch):
  return batch[0] if isinstance(batch, (tuple, list)) else batch
