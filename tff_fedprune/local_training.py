"""Local training on one client: gated SGD, channel counts, salience mask.

`build_local_training` returns a `tf.function` that trains a Keras model from
the global weights on one client's batches at the client's keep ratio,
counting which channels its data kept (`gated_conv`), and returns the update
together with the round's salience mask (`salience`, docs/design.md
section 2).

Weight decay, the FedProx term and an optional gradient correction (SCAFFOLD)
act only on weights whose channels have been kept at least once this round,
so with momentum they never move a coordinate outside the mask: with
`salience_threshold=0` the masked update equals the true update. The
objective adds the model's own losses (the gated layers' load-balancing
loss, `gate_ops.usage_balance`) to the cross-entropy; the reported loss is
the cross-entropy.
"""

from collections.abc import Callable

import tensorflow as tf
import tensorflow_federated as tff

from tff_fedprune import algorithm
from tff_fedprune import model_state
from tff_fedprune import salience

ModelFn = Callable[[], tf.keras.Model]


def build_local_training(
    model: tf.keras.Model,
    optimizer: tff.learning.optimizers.Optimizer,
    *,
    weight_decay: float = 0.0,
    prox_mu: float = 0.0,
    salience_threshold: float = 0.0,
    measure_accuracy: bool = False,
):
  """A function training `model` on one client's data.

  Its arguments are the initial global weights, the client's batches, its
  keep ratio (a 1-element dataset) and optionally a gradient correction.
  It returns an `algorithm.LocalResult`: the unmasked update
  `initial - trained` of the global weights, the round's salience mask, the
  examples, loss sum and local steps; with `measure_accuracy`, also the
  trained model's accuracy on the same batches (inference mode, a second
  pass), which measures how far a client fits its own data.
  """
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  weights = model_state.global_weights(model)
  trainable = weights.trainable
  structure = salience.ChannelStructure(model)

  def local_terms(initial_trainable, correction):
    """Decay, proximal and correction gradients on kept channels only."""
    terms = []
    for i, v in enumerate(trainable):
      parts = []
      if weight_decay:
        parts.append(weight_decay * v)
      if prox_mu:
        parts.append(prox_mu * (v - initial_trainable[i]))
      if correction is not None:
        parts.append(correction[i])
      terms.append(tf.add_n(parts))
    return structure.touched(tuple(terms))

  @tf.function
  def train(initial_weights, batches, keep_ratio, correction=None):
    """`correction` (trainable-shaped) is added to every kept gradient."""
    tf.nest.map_structure(lambda v, t: v.assign(t), weights, initial_weights)
    model_state.set_keep_ratio(model, keep_ratio.reduce(1.0, lambda _, r: r))
    model_state.reset_channel_counts(model)
    opt_state = optimizer.initialize(
        tuple(tf.TensorSpec(v.shape, v.dtype) for v in trainable)
    )
    num_examples = tf.constant(0, tf.int64)
    loss_sum = tf.constant(0.0, tf.float32)
    steps = tf.constant(0, tf.int64)
    for images, labels in batches:
      with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = loss_fn(labels, logits)
        objective = tf.add_n([loss] + model.losses) if model.losses else loss
      grads = tape.gradient(objective, trainable)
      if weight_decay or prox_mu or correction is not None:
        extra = local_terms(initial_weights.trainable, correction)
        grads = tuple(g + e for g, e in zip(grads, extra))
      opt_state, new_values = optimizer.next(
          opt_state, tuple(v.read_value() for v in trainable), grads
      )
      for v, t in zip(trainable, new_values):
        v.assign(t)
      n = tf.shape(labels, out_type=tf.int64)[0]
      num_examples += n
      loss_sum += loss * tf.cast(n, tf.float32)
      steps += 1
    delta = tf.nest.map_structure(
        lambda t, v: t - v.read_value(), initial_weights, weights
    )
    outputs = (
        delta,
        structure.salience_masks(salience_threshold),
        num_examples,
        loss_sum,
        steps,
    )
    if not measure_accuracy:
      return outputs
    return outputs + (_accuracy(model, batches, num_examples),)

  def train_client(*args) -> algorithm.LocalResult:
    return algorithm.LocalResult(*train(*args))

  return train_client


def _accuracy(model, batches, num_examples):
  """The model's accuracy on `batches` in inference mode (a second pass)."""
  correct = tf.constant(0, tf.int64)
  for images, labels in batches:
    predicted = tf.argmax(model(images, training=False), -1, tf.int32)
    correct += tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.int64))
  return tf.math.divide_no_nan(
      tf.cast(correct, tf.float32), tf.cast(num_examples, tf.float32)
  )
