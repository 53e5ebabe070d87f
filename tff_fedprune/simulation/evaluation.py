"""Evaluation of the global model: centralised and personalised.

The centralised figures are accuracy and loss on the whole test set. The
personalised figures (the paper's point under non-IID data) are the global
model's accuracy on each client's own test split, which has that client's
label mix: their mean over clients and the mean of the worst 10% of clients.
Client test splits are disjoint subsets of the test set, so one pass over the
test set gives both, and the same pass records which channels each gate kept
(`flops.GateCounter`: the FLOPs ratio and gate dynamics).
"""

import dataclasses
import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from tff_fedprune import gated_conv
from tff_fedprune import model_state
from tff_fedprune.simulation import flops


@dataclasses.dataclass(frozen=True)
class Evaluation:
  accuracy: float
  loss: float
  correct: np.ndarray  # Per-example correctness, in dataset order.
  gates: flops.GateMeasurements


def calibrate_batch_norm(model: tf.keras.Model, images) -> None:
  """Static batch norm (HeteroFL): moving statistics from `images`.

  One training-mode pass over `images` at the model's keep ratio with
  momentum 0, so each computed channel's moving mean and variance become
  exactly those of its activations on `images` (channels the keep ratio
  leaves out are untouched). Client-local counters move too; they are not
  model weights.
  """
  layers = gated_conv.conv_layers(model)
  momenta = [l.momentum for l in layers]
  try:
    for layer in layers:
      layer.momentum = 0.0
    model(tf.convert_to_tensor(images), training=True)
  finally:
    for layer, momentum in zip(layers, momenta):
      layer.momentum = momentum


class Evaluator:
  """Evaluates weights assigned into a Keras model on a labelled dataset.

  At the model's own keep ratio unless told another; with
  `calibration_images` (static batch norm) the moving statistics are
  recomputed on them after the weights are assigned, at that keep ratio.
  """

  def __init__(self, model: tf.keras.Model, calibration_images=None):
    self._model = model
    self._calibration = calibration_images
    gated = gated_conv.gated_layers(model)
    self.keep_ratio = float(gated[0].keep_ratio.numpy()) if gated else None
    self._dense_flops = flops.dense_flops(model)
    loss = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.NONE
    )
    gated = gated_conv.gated_layers(model)
    probe = tf.keras.Model(
        model.inputs, [model.output] + [l.input for l in gated]
    )

    @tf.function
    def batch_stats(images, labels):
      outputs = probe(images, training=False)
      logits, inputs = (outputs[0], outputs[1:]) if gated else (outputs, [])
      correct = tf.equal(tf.argmax(logits, -1, tf.int32), labels)
      kept = flops.kept_channels(gated, inputs)
      return tf.reduce_sum(loss(labels, logits)), correct, kept

    self._batch_stats = batch_stats

  def prepare(self, weights, keep_ratio=None) -> tf.keras.Model:
    """The model holding `weights` at `keep_ratio` (BN calibrated if static)."""
    model_state.assign_weights(self._model, weights)
    if self.keep_ratio is not None:
      model_state.set_keep_ratio(self._model, keep_ratio or self.keep_ratio)
    if self._calibration is not None:
      calibrate_batch_norm(self._model, self._calibration)
    return self._model

  def __call__(self, weights, dataset, keep_ratio=None) -> Evaluation:
    """Accuracy, mean loss, correctness and gate measurements of `weights`."""
    self.prepare(weights, keep_ratio)
    counter = flops.GateCounter(self._model)
    total_loss = 0.0
    correct = []
    for images, labels in dataset:
      batch_loss, batch_correct, kept = self._batch_stats(images, labels)
      total_loss += float(batch_loss)
      correct.append(batch_correct.numpy())
      counter.add([k.numpy() for k in kept], len(correct[-1]))
    correct = np.concatenate(correct)
    return Evaluation(
        float(correct.mean()), total_loss / len(correct), correct,
        counter.result(),
    )

  def flops_ratio(self, evaluation: Evaluation) -> float:
    """Mean dynamic FLOPs over the model's dense FLOPs (1 if ungated)."""
    if not evaluation.gates.jaccard:
      return 1.0
    return float(np.mean(evaluation.gates.flops) / self._dense_flops)


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


@dataclasses.dataclass(frozen=True)
class GlobalModelMetrics:
  """A round's measurements of the global model (NaN when not evaluated)."""

  test_accuracy: float = math.nan
  test_loss: float = math.nan
  personal_accuracy_mean: float = math.nan
  personal_accuracy_worst10: float = math.nan
  train_accuracy: float = math.nan
  flops_ratio: float = math.nan
  gate_jaccard: float = math.nan
  channels_ever_kept: float = math.nan
  # Device tier label -> test accuracy at its keep ratio (`tier_column`).
  tier_test_accuracy: dict = dataclasses.field(default_factory=dict)


TIER_ACCURACY_PREFIX = 'test_accuracy_tier_'


def tier_column(label: str) -> str:
  """The metrics.csv column of a tier's accuracy: test_accuracy_tier_0.5."""
  return TIER_ACCURACY_PREFIX + label


def _mean_or_nan(values) -> float:
  return float(np.mean(values)) if values else math.nan


class RoundEvaluation:
  """Evaluates the global model every `eval_every` rounds and the last.

  Each evaluation is one pass over the test set (accuracy, loss, per-client
  accuracy, FLOPs and gate dynamics), plus one over the pooled training
  data when `measure_train_accuracy`.
  """

  def __init__(self, model: tf.keras.Model, fed_data, *, eval_every: int,
               total_rounds: int, measure_train_accuracy: bool = False,
               tiers=(), calibration_images=None):
    """`tiers`: (label, keep ratio) of each device tier, also evaluated."""
    self.model = model
    self.evaluate = Evaluator(model, calibration_images)
    self._tiers = tuple(tiers)
    self._fed_data = fed_data
    self._eval_every = eval_every
    self._total_rounds = total_rounds
    self._train_accuracy = measure_train_accuracy

  def due(self, round_num: int) -> bool:
    return (round_num % self._eval_every == 0
            or round_num == self._total_rounds)

  def test(self, weights) -> Evaluation:
    return self.evaluate(weights, self._fed_data.test_dataset())

  def __call__(self, weights, round_num: int):
    """(metrics, test-set `Evaluation` or None) of round `round_num`."""
    if not self.due(round_num):
      return GlobalModelMetrics(tier_test_accuracy={
          label: math.nan for label, _ in self._tiers}), None
    own = self.evaluate.keep_ratio
    tiers = {label: self.evaluate(weights, self._fed_data.test_dataset(),
                                  keep).accuracy
             for label, keep in self._tiers if keep != own}
    result = self.test(weights)
    tiers = {label: tiers.get(label, result.accuracy)
             for label, _ in self._tiers}
    personal_mean, personal_worst = personalised_accuracy(
        result.correct, self._fed_data.client_test
    )
    train_accuracy = (
        self.evaluate(weights, self._fed_data.train_eval_dataset()).accuracy
        if self._train_accuracy else math.nan
    )
    return GlobalModelMetrics(
        test_accuracy=result.accuracy,
        test_loss=result.loss,
        personal_accuracy_mean=personal_mean,
        personal_accuracy_worst10=personal_worst,
        train_accuracy=train_accuracy,
        flops_ratio=self.evaluate.flops_ratio(result),
        gate_jaccard=_mean_or_nan(result.gates.jaccard),
        channels_ever_kept=_mean_or_nan(result.gates.ever_kept),
        tier_test_accuracy=tiers,
    ), result
