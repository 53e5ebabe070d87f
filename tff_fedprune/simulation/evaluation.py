"""Evaluation of the global model: centralised and personalised.

The centralised figures are accuracy and loss on the whole test set. The
personalised figures (the paper's point under non-IID data) are the global
model's accuracy on each client's own test split, which has that client's
label mix: their mean over clients and the mean of the worst 10% of clients.
Client test splits are disjoint subsets of the test set, so one pass over the
test set gives both.
"""

import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from tff_fedprune import model_state


class Evaluator:
  """Evaluates weights assigned into a Keras model on a labelled dataset."""

  def __init__(self, model: tf.keras.Model):
    self._model = model
    loss = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.NONE
    )

    @tf.function
    def batch_stats(images, labels):
      logits = self._model(images, training=False)
      correct = tf.equal(tf.argmax(logits, -1, tf.int32), labels)
      return tf.reduce_sum(loss(labels, logits)), correct

    self._batch_stats = batch_stats

  def __call__(self, weights, dataset) -> tuple[float, float, np.ndarray]:
    """Returns (accuracy, mean loss, per-example correctness in order)."""
    model_state.assign_weights(self._model, weights)
    total_loss = 0.0
    correct = []
    for images, labels in dataset:
      batch_loss, batch_correct = self._batch_stats(images, labels)
      total_loss += float(batch_loss)
      correct.append(batch_correct.numpy())
    correct = np.concatenate(correct)
    return float(correct.mean()), total_loss / len(correct), correct


def personalised_accuracy(
    correct: np.ndarray,
    client_test: Sequence[np.ndarray],
    worst_share: float = 0.1,
) -> tuple[float, float]:
  """(mean, worst `worst_share` mean) of per-client test accuracies.

  Args:
    correct: per-example correctness over the whole test set.
    client_test: each client's test-set indices. Clients without test
      examples are left out.
    worst_share: share of clients (rounded up, at least one) averaged for the
      second figure.
  """
  per_client = np.array(
      [correct[idx].mean() for idx in client_test if len(idx)]
  )
  if not len(per_client):
    raise ValueError('no client has a test split')
  worst = np.sort(per_client)[: max(1, math.ceil(worst_share * len(per_client)))]
  return float(per_client.mean()), float(worst.mean())
