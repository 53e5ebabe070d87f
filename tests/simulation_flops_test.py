"""Tests of the FLOPs accounting and the gate-dynamics measurements."""

from absl.testing import absltest
import numpy as np
import tensorflow as tf

import keras_models
from tff_fedprune.simulation import flops
from tff_fedprune import gated_conv


def two_block_model(gated, keep_ratio=0.5):
  inputs = tf.keras.Input((8, 8, 2))
  gate = gated_conv.GateSpec(keep_ratio=keep_ratio) if gated else None
  x = gated_conv.GatedConv2D(4, name='a', gate=gate)(inputs)
  x = tf.keras.layers.MaxPool2D(name='pool')(x)
  x = gated_conv.GatedConv2D(6, name='b', gate=gate)(x)
  x = tf.keras.layers.GlobalAveragePooling2D()(x)
  outputs = tf.keras.layers.Dense(3)(x)
  model = tf.keras.Model(inputs, outputs)
  for layer in gated_conv.gated_layers(model):
    layer.gate_kernel.assign(tf.abs(layer.gate_kernel))  # All gates > 0.
  return model


class FlopsTest(absltest.TestCase):

  def test_dense_flops_by_hand(self):
    model = two_block_model(gated=False)
    expected = (2 * 8 * 8 * 9 * 2 * 4) + (2 * 4 * 4 * 9 * 4 * 6) + 2 * 6 * 3
    self.assertEqual(flops.dense_flops(model), expected)
    data = tf.data.Dataset.from_tensor_slices(tf.zeros([5, 8, 8, 2])).batch(2)
    np.testing.assert_array_equal(flops.dynamic_flops(model, data),
                                  np.full(5, expected))

  def test_dynamic_flops_use_kept_input_and_output_channels(self):
    model = two_block_model(gated=True, keep_ratio=0.5)
    data = tf.data.Dataset.from_tensor_slices(
        tf.random.normal([5, 8, 8, 2])).batch(3)
    per_sample = flops.dynamic_flops(model, data)
    # Layer a keeps 2 of 4 channels, layer b reads those 2 and keeps 3 of 6.
    conv = (2 * 8 * 8 * 9 * 2 * 2) + (2 * 4 * 4 * 9 * 2 * 3)
    gates = (8 * 8 * 2 + 2 * 2 * 4) + (4 * 4 * 4 + 2 * 4 * 6)
    np.testing.assert_array_equal(per_sample, np.full(5, conv + gates + 36))
    self.assertAlmostEqual(
        flops.dynamic_flops_ratio(model, data),
        (conv + gates + 36) / flops.dense_flops(model))

  def test_top_k_flops_count_k_channels_whatever_their_saliency(self):
    model = two_block_model(gated=True, keep_ratio=0.5)
    conv = (2 * 8 * 8 * 9 * 2 * 2) + (2 * 4 * 4 * 9 * 2 * 3)
    gates = (8 * 8 * 2 + 2 * 2 * 4) + (4 * 4 * 4 + 2 * 4 * 6)
    self.assertEqual(flops.top_k_flops(model, 0.5), conv + gates + 36)
    full = flops.dense_flops(model) + gates
    self.assertEqual(flops.top_k_flops(model, 1.0), full)

  def test_residual_inputs_are_full_width(self):
    model = keras_models.build_resnet(
        20, gate=gated_conv.GateSpec.from_flags(keep_ratio=0.5))
    feeders = {l.name: gated_conv.feeding_gate(l)
               for l in gated_conv.gated_layers(model)}
    self.assertIsNone(feeders['stem'])
    self.assertIsNone(feeders['stage2_block1_conv1'])
    self.assertEqual(feeders['stage2_block1_conv2'].name,
                     'stage2_block1_conv1')

  def test_lower_keep_ratio_fewer_flops(self):
    data = tf.data.Dataset.from_tensor_slices(
        tf.random.normal([8, 32, 32, 3])).batch(8)
    ratios = [flops.dynamic_flops_ratio(
        keras_models.build_resnet(
            20, gate=gated_conv.GateSpec.from_flags(keep_ratio=r)), data)
              for r in (0.5, 0.7, 1.0)]
    self.assertLess(ratios[0], ratios[1])
    self.assertLess(ratios[1], ratios[2])
    self.assertLessEqual(ratios[2], 1.0 + 0.02)



class GateDynamicsTest(absltest.TestCase):

  def test_mean_pairwise_jaccard_matches_a_loop(self):
    kept = np.random.default_rng(0).random((7, 9)) < 0.4
    kept[3] = False  # An empty set against an empty set counts as 1.
    kept[5] = False
    values = []
    for i in range(7):
      for j in range(i + 1, 7):
        union = np.sum(kept[i] | kept[j])
        values.append(np.sum(kept[i] & kept[j]) / union if union else 1.0)
    self.assertAlmostEqual(flops.mean_pairwise_jaccard(kept),
                           np.mean(values), places=12)

  def test_input_independent_gates_measure_as_static(self):
    model = two_block_model(gated=True, keep_ratio=0.5)
    for layer in gated_conv.gated_layers(model):
      # Saliency = bias for every input: the same top-k for every sample.
      layer.gate_kernel.assign(tf.zeros_like(layer.gate_kernel))
    images = np.random.default_rng(1).normal(size=(10, 8, 8, 2))
    gates = flops.measure_gates(
        model, tf.data.Dataset.from_tensor_slices(
            images.astype(np.float32)).batch(4))
    self.assertEqual(gates.jaccard, [1.0, 1.0])
    self.assertEqual(gates.ever_kept, [0.5, 0.5])

  def test_input_dependent_gates_measure_below_one(self):
    # Seeded: with some initial gates every input keeps the same channels.
    tf.keras.utils.set_random_seed(0)
    model = two_block_model(gated=True, keep_ratio=0.5)
    images = np.random.default_rng(1).normal(size=(40, 8, 8, 2)) * 3
    gates = flops.measure_gates(
        model, tf.data.Dataset.from_tensor_slices(
            images.astype(np.float32)).batch(8))
    self.assertLess(min(gates.jaccard), 1.0)
    self.assertGreater(max(gates.ever_kept), 0.5)
    self.assertLen(gates.flops, 40)


if __name__ == '__main__':
  absltest.main()
