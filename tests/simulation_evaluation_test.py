"""Tests of centralised and personalised evaluation."""

from absl.testing import absltest
import numpy as np
import tensorflow as tf

import keras_models
from tff_fedprune import gated_conv
from tff_fedprune.simulation import evaluation
from tff_fedprune import model_state
from tff_fedprune.simulation import flops


class PersonalisedAccuracyTest(absltest.TestCase):

  def test_mean_and_worst_tenth_over_clients(self):
    correct = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1, 1, 0, 1], bool)
    # Per-client accuracies 2/3, 1/3, 1, 3/4; the empty client is skipped.
    clients = [np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([6, 7]),
               np.array([8, 9, 10, 11]), np.array([], np.int64)]
    mean, worst = evaluation.personalised_accuracy(correct, clients)
    self.assertAlmostEqual(mean, np.mean([2 / 3, 1 / 3, 1.0, 0.75]))
    self.assertAlmostEqual(worst, 1 / 3)
    _, worst_half = evaluation.personalised_accuracy(
        correct, clients, worst_share=0.5)
    self.assertAlmostEqual(worst_half, np.mean([1 / 3, 2 / 3]))

  def test_no_client_test_split_is_an_error(self):
    with self.assertRaisesRegex(ValueError, 'no client'):
      evaluation.personalised_accuracy(np.ones(3, bool), [np.zeros(0, int)])


class EvaluatorTest(absltest.TestCase):

  def test_matches_keras_evaluate_in_example_order(self):
    tf.keras.utils.set_random_seed(1)
    model = keras_models.build_model(
        'cnn', (8, 8, 1), 10,
        gate=gated_conv.GateSpec.from_flags(keep_ratio=0.5))
    images = np.random.default_rng(0).normal(size=(70, 8, 8, 1))
    images = images.astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 10, 70).astype(np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(32)
    evaluator = evaluation.Evaluator(model)
    result = evaluator(model_state.global_weights(model), dataset)
    accuracy, loss, correct = result.accuracy, result.loss, result.correct
    logits = model(images, training=False).numpy()
    expected = logits.argmax(-1) == labels
    np.testing.assert_array_equal(correct, expected)
    self.assertAlmostEqual(accuracy, expected.mean())
    expected_loss = tf.keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True).numpy().mean()
    self.assertAlmostEqual(loss, expected_loss, places=5)
    # The same pass measured the gates as the separate FLOPs pass does.
    separate = flops.measure_gates(model, dataset)
    np.testing.assert_array_equal(result.gates.flops, separate.flops)
    self.assertEqual(result.gates.jaccard, separate.jaccard)
    self.assertEqual(result.gates.ever_kept, separate.ever_kept)
    self.assertEqual(evaluator.flops_ratio(result),
                     flops.dynamic_flops_ratio(model, dataset))

  def test_dense_model(self):
    model = keras_models.build_model('cnn', (8, 8, 1), 10)
    images = np.zeros((5, 8, 8, 1), np.float32)
    dataset = tf.data.Dataset.from_tensor_slices(
        (images, np.zeros(5, np.int32))).batch(2)
    evaluator = evaluation.Evaluator(model)
    result = evaluator(model_state.global_weights(model), dataset)
    self.assertLen(result.correct, 5)
    self.assertEqual(evaluator.flops_ratio(result), 1.0)
    self.assertEqual(result.gates.jaccard, [])


if __name__ == '__main__':
  absltest.main()
