"""Inference FLOPs of dense and dynamically pruned models (docs/design.md 5).

A convolution costs 2 * H_out * W_out * k_h * k_w * C_in * C_out FLOPs and a
dense layer 2 * in * out. For a gated model each sample's cost uses its active
channels: a gated layer computes only the output channels whose gate is
non-zero, and reads only the input channels that the gated layer feeding it
(through pooling or a ReLU) kept; an input behind a residual addition is
full-width. The gate itself costs its average pool and its matrix product.
"""

import numpy as np
import tensorflow as tf

from tff_fedprune import gated_conv

def _conv_flops(layer: gated_conv.GatedConv2D, cin, cout):
  _, h, w, _ = layer.output_shape
  return 2.0 * h * w * layer.kernel_size**2 * cin * cout


def _gate_flops(layer: gated_conv.GatedConv2D):
  _, h, w, cin = layer.input_shape
  return float(h * w * cin + 2 * cin * layer.filters)


def dense_flops(model: tf.keras.Model) -> float:
  """FLOPs of one sample through every channel, without gate costs."""
  total = 0.0
  for layer in model.layers:
    if isinstance(layer, gated_conv.GatedConv2D):
      total += _conv_flops(layer, layer.input_shape[-1], layer.filters)
    elif isinstance(layer, tf.keras.layers.Dense):
      total += 2.0 * layer.input_shape[-1] * layer.units
  return total


def top_k_flops(model: tf.keras.Model, keep_ratio: float) -> float:
  """FLOPs of one sample when every gated layer computes exactly its k channels.

  This is what the TFLite export computes (`export.tflite`): k output channels
  per gated layer whatever their saliency, k input channels where the input
  comes from a gated layer, plus the gates. `dynamic_flops` instead counts a
  kept channel of zero saliency as skipped.
  """
  total = dense_flops(model)
  for layer in gated_conv.gated_layers(model):
    feeder = gated_conv.feeding_gate(layer)
    cin = layer.input_shape[-1]
    kept_in = int(gated_conv.num_kept(keep_ratio, cin)) if feeder else cin
    kept_out = int(gated_conv.num_kept(keep_ratio, layer.filters))
    total += (_conv_flops(layer, kept_in, kept_out) + _gate_flops(layer)
              - _conv_flops(layer, cin, layer.filters))
  return total


def dynamic_flops(model: tf.keras.Model, dataset) -> np.ndarray:
  """Per-sample FLOPs of a (gated) Keras functional model over `dataset`.

  `dataset` yields image batches or `(images, labels)` batches, already
  preprocessed as the model expects.
  """
  gated = gated_conv.gated_layers(model)
  static = dense_flops(model) - sum(
      _conv_flops(l, l.input_shape[-1], l.filters) for l in gated
  )
  if not gated:
    total = sum(int(tf.shape(_images(b))[0]) for b in dataset)
    return np.full(total, static)
  probe = tf.keras.Model(model.inputs, [l.input for l in gated])
  feeders = [gated_conv.feeding_gate(l) for l in gated]
  index = {id(l): i for i, l in enumerate(gated)}

  @tf.function
  def active_counts(images):
    inputs = probe(images, training=False)
    inputs = inputs if isinstance(inputs, list) else [inputs]
    return [
        tf.reduce_sum(
            tf.cast(tf.not_equal(l.channel_gates(x), 0.0), tf.float32), axis=1
        )
        for l, x in zip(gated, inputs)
    ]

  per_sample = []
  for batch in dataset:
    outs = [c.numpy() for c in active_counts(_images(batch))]
    flops = np.full(len(outs[0]), static)
    for layer, feeder, cout in zip(gated, feeders, outs):
      cin = (outs[index[id(feeder)]] if feeder is not None
             else layer.input_shape[-1])
      flops += _conv_flops(layer, cin, cout) + _gate_flops(layer)
    per_sample.append(flops)
  return np.concatenate(per_sample)


def dynamic_flops_ratio(model: tf.keras.Model, dataset) -> float:
  """Mean dynamic FLOPs over the dense FLOPs of the same model (1 if ungated)."""
  if not gated_conv.gated_layers(model):
    return 1.0
  return float(np.mean(dynamic_flops(model, dataset)) / dense_flops(model))


def _images(batch):
  return batch[0] if isinstance(batch, (tuple, list)) else batch
