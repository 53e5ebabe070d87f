"""Tests of the count-aware sparse mean."""

import collections

from absl.testing import absltest
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_fedprune import aggregation
from tff_fedprune import encoding
from tff_fedprune import runtime

W = tff.learning.models.ModelWeights
SPECS = W((tf.TensorSpec([4, 3], tf.float32), tf.TensorSpec([5], tf.float32)),
          (tf.TensorSpec([2], tf.float32),))


class CountAwareMeanTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._runtime = runtime.local_runtime()
    cls._runtime.__enter__()
    update_type = tff.types.tensorflow_to_type(SPECS)
    value_type = tff.types.StructWithPythonType(
        [('update', update_type), ('mask', update_type)],
        collections.OrderedDict)
    cls.process = aggregation.CountAwareMeanFactory().create(
        value_type, tff.TensorType(np.float32))

  @classmethod
  def tearDownClass(cls):
    cls._runtime.__exit__(None, None, None)
    super().tearDownClass()

  def clients(self, seed=0):
    rng = np.random.default_rng(seed)
    values = []
    for k in range(3):
      mask = W((rng.random((4, 3)) < 0.5, np.full(5, float(k != 1))),
               (np.array([1.0, 0.0]) if k else np.zeros(2),))
      mask = tf.nest.map_structure(lambda a: np.asarray(a, np.float32), mask)
      update = tf.nest.map_structure(
          lambda m: rng.normal(size=m.shape).astype(np.float32) * m, mask)
      values.append(collections.OrderedDict(update=update, mask=mask))
    return values

  def test_matches_numpy_count_aware_mean(self):
    clients, weights = self.clients(), [3.0, 1.0, 2.0]
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

  def test_reports_exact_upload_bytes_and_kept_coordinates(self):
    clients = self.clients(seed=1)
    output = self.process.next(self.process.initialize(), clients,
                               [1.0, 1.0, 1.0])
    expected_bytes = 0
    for c in clients:
      for spec, u, m in zip(tf.nest.flatten(SPECS), tf.nest.flatten(
          c['update']), tf.nest.flatten(c['mask'])):
        encoded = encoding.TensorCodec(spec.shape).encode(u, m)
        expected_bytes += sum(t.numpy().nbytes for t in encoded.values())
    kept = sum(float(np.sum(m)) for c in clients
               for m in tf.nest.flatten(c['mask']))
    self.assertEqual(output.measurements['upload_bytes'], expected_bytes)
    self.assertEqual(output.measurements['kept_coordinates'], kept)
    self.assertEqual(output.measurements['coordinates_per_client'], 19)

  def test_fednova_scale_multiplies_trainable_mean_by_mean_steps(self):
    update_type = tff.types.tensorflow_to_type(SPECS)
    value_type = tff.types.StructWithPythonType(
        [('update', update_type), ('mask', update_type),
         ('scale', tff.TensorType(np.float32))], collections.OrderedDict)
    process = aggregation.CountAwareMeanFactory().create(
        value_type, tff.TensorType(np.float32))
    clients, weights, steps = self.clients(seed=3), [3.0, 1.0, 2.0], [
        4.0, 10.0, 7.0]
    for c, a in zip(clients, steps):
      c['scale'] = np.float32(a)
    scaled = process.next(process.initialize(), clients, weights)
    plain = self.process.next(
        self.process.initialize(),
        [collections.OrderedDict(update=c['update'], mask=c['mask'])
         for c in clients], weights)
    tau_eff = np.dot(weights, steps) / np.sum(weights)
    tf.nest.map_structure(
        lambda a, b: np.testing.assert_allclose(a, tau_eff * b, rtol=1e-6),
        scaled.result.trainable, plain.result.trainable)
    # Moving statistics are not step-normalised: their plain mean.
    tf.nest.map_structure(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        scaled.result.non_trainable, plain.result.non_trainable)
    self.assertEqual(scaled.measurements['upload_bytes'],
                     plain.measurements['upload_bytes'] + 3 * 4)

  def test_zero_weight_client_contributes_nothing(self):
    clients = self.clients(seed=2)
    with_zero = self.process.next(self.process.initialize(), clients,
                                  [1.0, 0.0, 2.0])
    without = self.process.next(self.process.initialize(),
                                [clients[0], clients[2]], [1.0, 2.0])
    tf.nest.map_structure(np.testing.assert_allclose, with_zero.result,
                          without.result)


if __name__ == '__main__':
  absltest.main()
