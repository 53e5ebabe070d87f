"""Tests of the masked sparse means (count-aware and plain)."""


from absl.testing import absltest
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tests import testing
from tff_fedprune import aggregation
from tff_fedprune import encoding
from tff_fedprune import uplink

# Starts TFF worker processes (`uv run pytest -m "not slow"` skips).
pytestmark = pytest.mark.slow


class CountAwareMeanTest(testing.LocalRuntimeTestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.process = aggregation.MaskedMeanFactory().create(
        testing.update_value_type(), tff.TensorType(np.float32))

  def test_matches_numpy_count_aware_mean(self):
    clients, weights = testing.masked_updates(), [3.0, 1.0, 2.0]
    output = self.process.next(self.process.initialize(), clients, weights)
    num = tf.nest.map_structure(
        lambda *a: sum(w * x for w, x in zip(weights, a)),
        *[c['update'] for c in clients])
    den = tf.nest.map_structure(
        lambda *a: sum(w * x for w, x in zip(weights, a)),
        *[c['mask'] for c in clients])
    expected = tf.nest.map_structure(
        lambda n, d: np.where(d > 0, n / np.maximum(d, 1e-12), 0.0), num, den)
    tf.nest.map_structure(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        output.result, expected)
    # The second non-trainable coordinate was sent by nobody: it stays 0.
    self.assertEqual(output.result.non_trainable[0][1], 0.0)
    # Sent by clients 1 and 2 only: their mean, not diluted by client 0.
    u1 = clients[1]['update'].non_trainable[0][0]
    u2 = clients[2]['update'].non_trainable[0][0]
    self.assertAlmostEqual(output.result.non_trainable[0][0],
                           (1.0 * u1 + 2.0 * u2) / 3.0, places=6)

  def test_fedavg_aggregation_divides_by_all_clients_weight(self):
    process = aggregation.MaskedMeanFactory('fedavg').create(
        testing.update_value_type(), tff.TensorType(np.float32))
    clients, weights = testing.masked_updates(), [3.0, 1.0, 2.0]
    output = process.next(process.initialize(), clients, weights)
    expected = tf.nest.map_structure(
        lambda *a: sum(w * x for w, x in zip(weights, a)) / sum(weights),
        *[c['update'] for c in clients])
    tf.nest.map_structure(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        output.result, expected)
    # Sent by clients 1 and 2 only: diluted by client 0's weight.
    u1 = clients[1]['update'].non_trainable[0][0]
    u2 = clients[2]['update'].non_trainable[0][0]
    self.assertAlmostEqual(output.result.non_trainable[0][0],
                           (1.0 * u1 + 2.0 * u2) / 6.0, places=6)
    with self.assertRaisesRegex(ValueError, 'unknown aggregation'):
      aggregation.MaskedMeanFactory('median')

  def test_reports_exact_upload_bytes_and_kept_coordinates(self):
    seed_type = [('rounding_seed', tff.TensorType(np.int64, [2]))]
    for bits in encoding.UPLOAD_BITS:
      clients = testing.masked_updates(seed=1)
      for k, c in enumerate(clients):
        c['rounding_seed'] = np.array([5, k], np.int64)
      process = aggregation.MaskedMeanFactory(
          values=encoding.ValueFormat(bits)).create(
          testing.update_value_type(seed_type), tff.TensorType(np.float32))
      output = process.next(process.initialize(), clients, [1.0, 1.0, 1.0])
      expected_bytes = 0
      # The statistic (non-trainable) travels at 8 bits under 1 and 2.
      formats = [encoding.ValueFormat(bits)] * 2 + [
          encoding.ValueFormat(max(bits, 8) if bits <= 2 else bits)]
      self.assertEqual(formats, uplink.Uplink.update_formats(
          tff.types.tensorflow_to_type(testing.UPDATE_SPECS),
          encoding.ValueFormat(bits)))
      for c in clients:
        specs = tf.nest.flatten(testing.UPDATE_SPECS)
        for spec, form, u, m, seed in zip(
            specs, formats, tf.nest.flatten(c['update']),
            tf.nest.flatten(c['mask']),
            encoding.tensor_seeds(c['rounding_seed'], len(specs))):
          encoded = encoding.TensorCodec(spec.shape, form).encode(u, m, seed)
          expected_bytes += sum(t.numpy().nbytes for t in encoded.values())
      kept = sum(float(np.sum(m)) for c in clients
                 for m in tf.nest.flatten(c['mask']))
      self.assertEqual(output.measurements['upload_bytes'], expected_bytes)
      self.assertEqual(output.measurements['kept_coordinates'], kept)
      self.assertEqual(output.measurements['coordinates_per_client'], 19)

  def test_quantised_mean_is_close_and_needs_a_seed(self):
    clients = testing.masked_updates(seed=3)
    for k, c in enumerate(clients):
      c['rounding_seed'] = np.array([9, k], np.int64)
    value_type = testing.update_value_type(
        [('rounding_seed', tff.TensorType(np.int64, [2]))])
    process = aggregation.MaskedMeanFactory(values=encoding.ValueFormat(16)).create(
        value_type, tff.TensorType(np.float32))
    exact = self.process.next(
        self.process.initialize(),
        [{'update': c['update'], 'mask': c['mask']} for c in clients],
        [1.0, 2.0, 3.0])
    quantised = process.next(process.initialize(), clients, [1.0, 2.0, 3.0])
    tf.nest.map_structure(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-3),
        quantised.result, exact.result)
    with self.assertRaisesRegex(ValueError, 'rounding_seed'):
      aggregation.MaskedMeanFactory(values=encoding.ValueFormat(8)).create(
          testing.update_value_type(), tff.TensorType(np.float32))
    with self.assertRaisesRegex(ValueError, 'upload_bits'):
      encoding.ValueFormat(7)

  def test_zero_weight_client_contributes_nothing(self):
    clients = testing.masked_updates(seed=2)
    with_zero = self.process.next(self.process.initialize(), clients,
                                  [1.0, 0.0, 2.0])
    without = self.process.next(self.process.initialize(),
                                [clients[0], clients[2]], [1.0, 2.0])
    tf.nest.map_structure(np.testing.assert_allclose, with_zero.result,
                          without.result)


class SumFactoryTest(testing.LocalRuntimeTestCase):
  """TFF's own sum aggregators can take the encoded sum's place."""

  def test_tff_sum_and_dp_factories_give_the_same_masked_means(self):
    clients, weights = testing.masked_updates(), [3.0, 1.0, 2.0]
    value_type = testing.update_value_type()
    for aggregation_name in aggregation.AGGREGATIONS:
      encoded = aggregation.MaskedMeanFactory(aggregation_name).create(
          value_type, tff.TensorType(np.float32))
      expected = encoded.next(encoded.initialize(), clients, weights)
      for sum_factory in (
          tff.aggregators.SumFactory(),
          # A DP mean without noise and with a clip nothing reaches: it
          # divides numerator and denominator alike.
          tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
              noise_multiplier=0.0, clients_per_round=3, clip=1e6)):
        process = aggregation.MaskedMeanFactory(
            aggregation_name, sum_factory=sum_factory).create(
                value_type, tff.TensorType(np.float32))
        output = process.next(process.initialize(), clients, weights)
        with self.subTest(f'{aggregation_name} {type(sum_factory).__name__}'):
          tf.nest.map_structure(
              lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                      atol=1e-6),
              output.result, expected.result)
          self.assertEqual(output.measurements['kept_coordinates'],
                           expected.measurements['kept_coordinates'])
    with self.assertRaisesRegex(ValueError, 'upload_bits must be 32'):
      aggregation.MaskedMeanFactory(
          values=encoding.ValueFormat(8), sum_factory=tff.aggregators.SumFactory())


if __name__ == '__main__':
  absltest.main()
