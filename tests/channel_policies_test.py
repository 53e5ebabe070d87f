"""Tests of the sub-model channel policies: HeteroFL and FjORD."""

import collections

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from keras_models import cnn
from tests import testing
from tff_fedprune import client_work
from tff_fedprune import gated_conv
from tff_fedprune import learning_process
from tff_fedprune import local_training
from tff_fedprune import model_state
from tff_fedprune.simulation import evaluation


def prefix_model_fn(policy='heterofl', keep_ratio=1.0):
  return lambda: cnn.build_cnn((8, 8, 1), 10, gate=gated_conv.GateSpec(
      keep_ratio=keep_ratio, policy=policy))


def train_sub_model(weights, filters, dataset, learning_rate):
  """Plain SGD on the dense CNN of `filters`, from `weights`' prefixes.

  Returns (delta, sub-model trainable shapes): the reference HeteroFL
  client, written without gates or masks.
  """
  sub = cnn.build_cnn((8, 8, 1), 10, filters=filters)
  prefix = lambda full, part: full[tuple(slice(0, d) for d in part.shape)]
  for v, full in zip(sub.trainable_variables, weights.trainable):
    v.assign(prefix(full, v))
  initial = [v.numpy() for v in sub.trainable_variables]
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  for images, labels in dataset:
    with tf.GradientTape() as tape:
      loss = loss_fn(labels, sub(images, training=True))
    grads = tape.gradient(loss, sub.trainable_variables)
    for v, g in zip(sub.trainable_variables, grads):
      v.assign_sub(learning_rate * g)
  return [i - v.numpy() for i, v in zip(initial, sub.trainable_variables)]


def padded(values, shapes):
  """`values` (prefix-shaped) and their 0/1 holders, zero-padded to `shapes`."""
  out, held = [], []
  for v, shape in zip(values, shapes):
    index = tuple(slice(0, d) for d in v.shape)
    full, mask = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    full[index], mask[index] = v, 1.0
    out.append(full)
    held.append(mask)
  return out, held


# Starts TFF worker processes (`uv run pytest -m "not slow"` skips).
@pytest.mark.slow
class HeteroFLRoundTest(testing.LocalRuntimeTestCase):

  @parameterized.parameters('off', 'step')
  def test_one_round_equals_hand_computed_sub_model_mean(self, compact):
    fn = prefix_model_fn()
    weights = testing.initial_weights(fn)
    datasets = testing.client_datasets(num_clients=2, n=[12, 20])
    capacities = (0.5, 1.0)
    process = learning_process.build_learning_process(
        fn, datasets[0].element_spec, client_learning_rate=0.1,
        compact_training=compact, initial_weights=weights)
    output = process.next(process.initialize(), [
        client_work.client_data(d, p) for d, p in zip(datasets, capacities)])
    got = process.get_model_weights(output.state).trainable

    shapes = [w.shape for w in weights.trainable]
    numerator = [np.zeros(s, np.float32) for s in shapes]
    denominator = [np.zeros(s, np.float32) for s in shapes]
    for d, p, n in zip(datasets, capacities, (12, 20)):
      filters = [int(gated_conv.num_kept(p, f)) for f in cnn.CNN_FILTERS]
      delta, held = padded(train_sub_model(weights, filters, d, 0.1), shapes)
      for i in range(len(shapes)):
        numerator[i] += n * delta[i]
        denominator[i] += n * held[i]
    largest = 0.0
    for old, new, num, den in zip(weights.trainable, got, numerator,
                                  denominator):
      mean = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
      np.testing.assert_allclose(new, old - mean, atol=2e-5)
      largest = max(largest, float(np.max(np.abs(mean))))
    self.assertGreater(largest, 1e-2)

  def test_prefix_policy_at_capacity_one_equals_dense_fedavg(self):
    dense_fn = lambda: cnn.build_cnn((8, 8, 1), 10)
    weights = testing.initial_weights(dense_fn)
    datasets = testing.client_datasets(num_clients=2, n=[12, 20])
    results = []
    for fn in (dense_fn, prefix_model_fn()):
      process = learning_process.build_learning_process(
          fn, datasets[0].element_spec, client_learning_rate=0.1,
          client_momentum=0.9, weight_decay=5e-4, initial_weights=weights)
      output = process.next(process.initialize(), [
          client_work.client_data(d, 1.0) for d in datasets])
      results.append(process.get_model_weights(output.state))
    for dense, prefix in zip(tf.nest.flatten(results[0]),
                             tf.nest.flatten(results[1])):
      np.testing.assert_allclose(prefix, dense, atol=2e-5)


class PrefixLayerTest(parameterized.TestCase):

  def test_keeps_the_first_k_channels_unscaled_without_gate_weights(self):
    layer = gated_conv.GatedConv2D(
        10, gate=gated_conv.GateSpec(keep_ratio=0.3, policy='heterofl'))
    x = tf.random.normal([4, 5, 5, 3], seed=1)
    layer(x)
    pi = layer.channel_gates(x)
    np.testing.assert_array_equal(pi, np.tile([1.0] * 3 + [0.0] * 7, (4, 1)))
    self.assertNotIn('gate_kernel', [w.name.split('/')[-1][:-2]
                                     for w in layer.weights])

  def test_spec_refuses_learned_gate_options(self):
    with self.assertRaisesRegex(ValueError, 'gate_balance must be 0'):
      gated_conv.GateSpec(policy='fjord', balance=0.1)
    with self.assertRaisesRegex(ValueError, "gate_selection must be 'saliency'"):
      gated_conv.GateSpec(policy='heterofl', selection='centered')

  def test_config_round_trip_keeps_the_policy(self):
    layer = gated_conv.GatedConv2D(
        8, gate=gated_conv.GateSpec(keep_ratio=0.5, policy='fjord'))
    again = gated_conv.GatedConv2D.from_config(layer.get_config())
    self.assertEqual(again.gate.policy, 'fjord')


class FjordWidthTest(parameterized.TestCase):

  @parameterized.parameters(
      (1.0, (0.25, 0.5, 0.75, 1.0)), (0.7, (0.25, 0.5)), (0.5, (0.25, 0.5)),
      (0.2, (0.2,)))
  def test_widths_are_uniform_over_those_up_to_the_capacity(self, capacity,
                                                            allowed):
    model = prefix_model_fn('fjord', capacity)()
    forward = local_training._Forward(model, 'off')  # pylint: disable=protected-access
    layer = gated_conv.gated_layers(model)[0]
    seed = tf.constant([3, 11], tf.int64)
    draws = []
    for step in range(800):
      forward.draw_width(tf.constant(capacity), seed, tf.constant(step,
                                                                  tf.int64))
      draws.append(round(float(layer.keep_ratio.numpy()), 4))
    counts = collections.Counter(draws)
    self.assertEqual(set(counts), set(allowed))
    for width in allowed:  # Binomial(800, 1/m): 5 standard deviations.
      share = 1 / len(allowed)
      self.assertAlmostEqual(counts[width] / 800, share,
                             delta=5 * np.sqrt(share * (1 - share) / 800))

  def test_feddp_and_heterofl_keep_the_capacity(self):
    model = prefix_model_fn('heterofl', 0.7)()
    forward = local_training._Forward(model, 'off')  # pylint: disable=protected-access
    forward.draw_width(tf.constant(0.7), None, tf.constant(0, tf.int64))
    self.assertAlmostEqual(
        float(gated_conv.gated_layers(model)[0].keep_ratio.numpy()), 0.7,
        places=6)


class StaticBatchNormTest(absltest.TestCase):

  def test_moving_statistics_become_those_of_the_sample_at_the_keep_ratio(self):
    model = prefix_model_fn('heterofl', 0.5)()
    images = np.random.default_rng(0).normal(size=(64, 8, 8, 1)).astype(
        np.float32)
    before = [l.moving_mean.numpy().copy() for l in
              gated_conv.gated_layers(model)]
    evaluation.calibrate_batch_norm(model, images)
    first = gated_conv.gated_layers(model)[0]
    conv = tf.nn.conv2d(images, first.kernel, 1, 'SAME').numpy()
    k = int(gated_conv.num_kept(0.5, first.filters))
    np.testing.assert_allclose(first.moving_mean.numpy()[:k],
                               conv.mean(axis=(0, 1, 2))[:k], atol=1e-5)
    np.testing.assert_array_equal(first.moving_mean.numpy()[k:], before[0][k:])
    self.assertEqual(first.momentum, 0.9)  # Restored.


if __name__ == '__main__':
  absltest.main()
