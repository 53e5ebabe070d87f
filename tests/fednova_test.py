"""Tests of FedNova: the effective step count and the server's rescaling."""

import collections

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tests import testing
from tff_fedprune import aggregation
from tff_fedprune import fednova

# Starts TFF worker processes (`uv run pytest -m "not slow"` skips).
pytestmark = pytest.mark.slow


class NormalizerTest(parameterized.TestCase):

  @parameterized.parameters((5, 0.0), (5, 0.9), (1, 0.9), (40, 0.5))
  def test_fednova_normalizer_matches_numpy(self, steps, momentum):
    # Accumulated coefficients of t momentum steps: sum_j (1 - m^(t-j)) / (1-m).
    expected = sum((1 - momentum**(steps - j)) / (1 - momentum)
                   for j in range(steps))
    self.assertAlmostEqual(
        float(fednova.normalizer(steps, momentum)), expected,
        places=4)


class StepRescaledMeanTest(testing.LocalRuntimeTestCase):


  def test_fednova_scale_multiplies_trainable_mean_by_mean_steps(self):
    process = fednova.StepRescaledMeanFactory(
        aggregation.MaskedMeanFactory()).create(
            testing.update_value_type([('scale', tff.TensorType(np.float32))]),
            tff.TensorType(np.float32))
    plain_process = aggregation.MaskedMeanFactory().create(
        testing.update_value_type(), tff.TensorType(np.float32))
    clients, weights, steps = testing.masked_updates(seed=3), [3.0, 1.0, 2.0], [
        4.0, 10.0, 7.0]
    for c, a in zip(clients, steps):
      c['scale'] = np.float32(a)
    scaled = process.next(process.initialize(), clients, weights)
    plain = plain_process.next(
        plain_process.initialize(),
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


if __name__ == '__main__':
  absltest.main()
