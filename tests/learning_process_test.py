"""Tests of the composed FedDP learning process."""

import collections

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tests import testing
from tff_fedprune import client_work
from tff_fedprune import finalizer
from tff_fedprune import learning_process
from tff_fedprune import local_training
from tff_fedprune import model_state

# Starts TFF worker processes (`uv run pytest -m "not slow"` skips).
pytestmark = pytest.mark.slow


class LearningProcessTest(testing.LocalRuntimeTestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.spec = testing.client_datasets()[0].element_spec

  def test_pruning_off_sgd_one_round_equals_tff_fed_avg(self):
    weights = testing.initial_weights(testing.model_fn())
    ours = learning_process.build_learning_process(
        testing.model_fn(), self.spec, client_learning_rate=0.1,
        server_optimizer='sgd', server_learning_rate=1.0,
        initial_weights=weights)
    stock = tff.learning.algorithms.build_weighted_fed_avg(
        lambda: tff.learning.models.from_keras_model(
            testing.model_fn()(), input_spec=self.spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(
                from_logits=True)),
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.1),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0))
    datasets = testing.client_datasets()
    stock_state = stock.set_model_weights(stock.initialize(), weights)
    stock_out = stock.next(stock_state, datasets)
    our_out = ours.next(ours.initialize(),
                        [client_work.client_data(d, 1.0) for d in datasets])
    ours_w = ours.get_model_weights(our_out.state)
    stock_w = stock.get_model_weights(stock_out.state)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
        ours_w.trainable, stock_w.trainable))
    self.assertLessEqual(diff, 1e-5)
    self.assertGreater(max(float(np.max(np.abs(a - b))) for a, b in zip(
        ours_w.trainable, weights.trainable)), 1e-3)
    # Unlike TFF's FedAvg, the server takes the clients' BN statistics.
    for ours_stat, stock_stat, init in zip(
        ours_w.non_trainable, stock_w.non_trainable, weights.non_trainable):
      np.testing.assert_array_equal(stock_stat, init)
      self.assertFalse(np.array_equal(ours_stat, init))
    self.assertEqual(our_out.metrics['aggregator']['upload_bytes'],
                     3 * 4 * our_out.metrics['aggregator'][
                         'coordinates_per_client'])

  def test_local_accuracy_is_the_trained_clients_mean_accuracy(self):
    fn = testing.model_fn(gated=True)
    weights = testing.initial_weights(fn)
    process = learning_process.build_learning_process(
        fn, self.spec, client_learning_rate=0.1, measure_local_accuracy=True,
        initial_weights=weights)
    datasets = testing.client_datasets(num_clients=2, n=[12, 20])
    output = process.next(process.initialize(),
                          [client_work.client_data(d, 0.5) for d in datasets])
    expected = []
    for d in datasets:
      train = local_training.build_local_training(
          fn(), tff.learning.optimizers.build_sgdm(0.1))
      delta = train(weights, d,
                    tf.data.Dataset.from_tensors(np.float32(0.5))).delta
      trained = fn()
      model_state.assign_weights(trained, tf.nest.map_structure(
          lambda w, x: w - x.numpy(), weights, delta))
      model_state.set_keep_ratio(trained, 0.5)
      correct = sum(int(np.sum(np.argmax(trained(x, training=False), -1) == y))
                    for x, y in d)
      expected.append(correct / sum(len(y) for _, y in d))
    # Unweighted over clients: 12 and 20 examples count alike.
    self.assertAlmostEqual(
        float(output.metrics['client_work']['local_train_accuracy']),
        np.mean(expected), places=5)

  @parameterized.parameters('fedavg', 'fednova', 'scaffold')
  def test_per_slot_costs_and_uploads_add_up_to_the_totals(self, algorithm):
    process = learning_process.build_learning_process(
        testing.model_fn(gated=True), self.spec, client_learning_rate=0.05,
        algorithm=algorithm, num_clients=3, clients_per_round=4,
        compact_training='step')
    client_state = None
    if algorithm == 'scaffold':
      client_state = collections.OrderedDict(c_k=tuple(
          np.zeros(w.shape, np.float32) for w in testing.initial_weights(
              testing.model_fn(gated=True)).trainable))
    data = [client_work.client_data(d, r, slot=slot, client_state=client_state)
            for slot, (d, r) in enumerate(zip(testing.client_datasets(),
                                              (0.3, 0.5, 1.0)))]
    output = process.next(process.initialize(), data)
    work, agg = output.metrics['client_work'], output.metrics['aggregator']
    costs = np.asarray(work[client_work.CLIENT_COSTS])
    self.assertEqual(costs.shape, (4, 3))
    np.testing.assert_array_equal(costs[3], 0.0)  # No client in slot 3.
    self.assertAlmostEqual(costs[:, 0].sum(), float(work['train_flops']))
    self.assertAlmostEqual(costs[:, 1].sum(), float(work['dense_train_flops']))
    ratios = costs[:3, 0] / costs[:3, 1]
    self.assertLess(ratios[0], ratios[1])  # Keep 0.3 computes less than 0.5.
    sent = np.asarray(agg['client_upload_bytes'])[:3] + costs[:3, 2]
    other = sum(int(v) for k, v in work.items() if k.endswith('_upload_bytes'))
    self.assertEqual(int(sent.sum()), int(agg['upload_bytes']) + other)

  def test_gated_round_uploads_less_and_stays_finite(self):
    process = learning_process.build_learning_process(
        testing.model_fn(gated=True), self.spec, client_learning_rate=0.05,
        client_momentum=0.9, weight_decay=1e-3, server_optimizer='adam',
        server_learning_rate=0.01)
    output = process.next(process.initialize(), [
        client_work.client_data(d, r)
        for d, r in zip(testing.client_datasets(), (0.3, 0.5, 1.0))])
    agg = output.metrics['aggregator']
    self.assertLess(agg['upload_bytes'],
                    3 * 4 * agg['coordinates_per_client'])
    self.assertLess(agg['kept_coordinates'],
                    3 * agg['coordinates_per_client'])
    weights = process.get_model_weights(output.state)
    self.assertTrue(all(np.all(np.isfinite(w))
                        for w in tf.nest.flatten(weights)))

  def test_non_finite_client_is_rejected_and_counted(self):
    weights = testing.initial_weights(testing.model_fn(gated=True))
    process = learning_process.build_learning_process(
        testing.model_fn(gated=True), self.spec, client_learning_rate=0.1,
        initial_weights=weights)
    datasets = testing.client_datasets(poison=1)
    with_bad = process.next(process.initialize(), [
        client_work.client_data(d, 0.5) for d in datasets])
    without = process.next(process.initialize(), [
        client_work.client_data(d, 0.5) for d in (datasets[0], datasets[2])])
    self.assertEqual(with_bad.metrics['client_work']['non_finite_updates'], 1)
    for a, b in zip(tf.nest.flatten(process.get_model_weights(with_bad.state)),
                    tf.nest.flatten(process.get_model_weights(without.state))):
      self.assertTrue(np.all(np.isfinite(a)))
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  @parameterized.parameters('fedprox', 'fednova')
  def test_algorithms_run_a_gated_round(self, algorithm):
    process = learning_process.build_learning_process(
        testing.model_fn(gated=True), self.spec, client_learning_rate=0.05,
        client_momentum=0.9, algorithm=algorithm, prox_mu=0.1)
    output = process.next(process.initialize(), [
        client_work.client_data(d, 0.5) for d in testing.client_datasets()])
    weights = process.get_model_weights(output.state)
    self.assertTrue(all(np.all(np.isfinite(w))
                        for w in tf.nest.flatten(weights)))
    self.assertGreater(output.metrics['client_work']['train_loss'], 0)

  def test_fednova_averages_moving_statistics_as_fedavg_does(self):
    # Clients train alike under both (no proximal term); FedNova rescales
    # the trainable update only, so the statistics are the same mean.
    fn = testing.model_fn(gated=True)
    weights = testing.initial_weights(fn)
    datasets = testing.client_datasets(n=[4, 12, 20])
    results = {}
    for algorithm in ('fedavg', 'fednova'):
      process = learning_process.build_learning_process(
          fn, self.spec, client_learning_rate=0.05, client_momentum=0.9,
          algorithm=algorithm, initial_weights=weights)
      output = process.next(process.initialize(), [
          client_work.client_data(d, 0.5) for d in datasets])
      results[algorithm] = process.get_model_weights(output.state)
    for a, b in zip(results['fedavg'].non_trainable,
                    results['fednova'].non_trainable):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    self.assertFalse(all(
        np.allclose(a, b) for a, b in zip(results['fedavg'].trainable,
                                          results['fednova'].trainable)))

  @parameterized.parameters(*learning_process.SERVER_OPTIMIZERS)
  def test_server_optimizer_builds(self, name):
    optimizer = finalizer.build_server_optimizer(name, 0.1)
    self.assertIsInstance(optimizer, tff.learning.optimizers.Optimizer)

  def test_unknown_algorithm(self):
    with self.assertRaisesRegex(ValueError, 'unknown algorithm'):
      learning_process.build_algorithm('fedsgd')

  def test_unknown_server_optimizer(self):
    with self.assertRaisesRegex(ValueError, 'unknown server optimizer'):
      finalizer.build_server_optimizer('lamb', 0.1)


if __name__ == '__main__':
  absltest.main()
