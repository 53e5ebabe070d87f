"""Tests of `server_support`: the support, its projection and its mean."""

import collections

from absl.testing import absltest
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tests import testing
from tff_fedprune import model_state
from tff_fedprune import salience
from tff_fedprune import server_support

# Starts TFF worker processes (`uv run pytest -m "not slow"` skips).
pytestmark = pytest.mark.slow


def gated_model():
  tf.keras.utils.set_random_seed(0)
  return testing.model_fn(gated=True)()


def client_values(specs, count, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    update = tf.nest.map_structure(
        lambda s: rng.normal(size=s.shape).astype(np.float32), specs)
    mask = tf.nest.map_structure(
        lambda s: (rng.random(s.shape) < 0.5).astype(np.float32), specs)
    out.append(collections.OrderedDict(update=update, mask=mask))
  return out


class ProjectionTest(absltest.TestCase):

  def test_scatter_of_gather_is_the_update_on_the_support_channels(self):
    model = gated_model()
    layout = server_support.SupportLayout.of_model(model, 0.5)
    self.assertEqual(layout.kept, tuple(c // 2 for c in layout.channels))
    rng = np.random.default_rng(1)
    support = [tf.constant(np.sort(rng.choice(c, k, replace=False)), tf.int32)
               for c, k in zip(layout.channels, layout.kept)]
    indicators = [tf.scatter_nd(s[:, None], tf.ones_like(s, tf.float32), [c])
                  for s, c in zip(support, layout.channels)]
    masks = tf.nest.flatten(salience.ChannelStructure(model).masks(indicators))
    weights = tf.nest.flatten(model_state.global_weights(model))
    for w, owner, m in zip(weights, layout.owners, masks):
      sent = server_support.gather(w, owner, support)
      self.assertEqual(sent.shape.as_list(),
                       layout.support_shape(w.shape, owner))
      back = server_support.scatter(sent, owner, support, w.shape)
      np.testing.assert_array_equal(back, w * m)

  def test_support_is_the_top_k_ascending_ties_to_lower_index(self):
    rates = [tf.constant([0.1, 0.9, 0.0, 0.9, 0.5]), tf.zeros([4])]
    chosen = server_support.choose_support(rates, (3, 2))
    self.assertEqual(chosen[0].numpy().tolist(), [1, 3, 4])
    self.assertEqual(chosen[1].numpy().tolist(), [0, 1])


class ServerSupportMeanTest(testing.LocalRuntimeTestCase):

  def test_unweighted_mean_on_the_support_and_rates_choose_the_next(self):
    model = gated_model()
    layout = server_support.SupportLayout.of_model(model, 0.5)
    specs = tf.nest.map_structure(
        lambda v: tf.TensorSpec(v.shape, tf.float32),
        model_state.global_weights(model))
    update_type = tff.types.tensorflow_to_type(specs)
    value_type = tff.types.StructWithPythonType(
        [('update', update_type), ('mask', update_type)],
        collections.OrderedDict)
    factory = server_support.ServerSupportFactory(
        layout, tff.aggregators.UnweightedMeanFactory())
    process = factory.create(value_type, tff.TensorType(np.float32))
    values = client_values(specs, 3)
    # The third client's update was not finite: it sends zeros.
    output = process.next(process.initialize(), values, [5.0, 1.0, 0.0])
    first = [tf.range(k) for k in layout.kept]  # Round 1: no rates yet.
    for i, owner in enumerate(layout.owners):
      sent = [server_support.gather(tf.nest.flatten(v['update'])[i], owner,
                                    first) for v in values[:2]]
      expected = server_support.scatter(
          (sent[0] + sent[1]) / 3, owner, first, tf.nest.flatten(specs)[i].shape)
      np.testing.assert_allclose(tf.nest.flatten(output.result)[i], expected,
                                 rtol=1e-5, atol=1e-6)
    flat_masks = [tf.nest.flatten(v['mask']) for v in values[:2]]
    for l, rates in enumerate(output.state['rates']):
      index = next(i for i, (o, s) in enumerate(zip(layout.owners,
                                                    tf.nest.flatten(specs)))
                   if o == (None, l) and s.shape.rank == 1)
      mean_mask = (flat_masks[0][index] + flat_masks[1][index]) / 3
      np.testing.assert_allclose(
          rates, (1 - server_support.RATE_DECAY) * mean_mask, rtol=1e-6)
    coordinates = factory.record_coordinates(specs)
    self.assertEqual(output.measurements['upload_bytes'], 3 * 4 * coordinates)
    self.assertLess(coordinates, output.measurements['coordinates_per_client'])
    second = process.next(output.state, values, [1.0, 1.0, 1.0])
    chosen = server_support.choose_support(output.state['rates'], layout.kept)
    changed = tf.nest.flatten(second.result)[layout.owners.index((None, 0))]
    sent_channels = np.flatnonzero(np.any(
        np.reshape(np.asarray(changed), [-1, layout.channels[0]]) != 0, axis=0))
    self.assertEqual(sent_channels.tolist(), chosen[0].numpy().tolist())


if __name__ == '__main__':
  absltest.main()
