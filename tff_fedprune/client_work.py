"""Client work: local training of a Keras model, reporting a full weights delta.

Unlike `tff.learning.templates.build_model_delta_client_work`, the update
covers the non-trainable weights too (BatchNormalization's moving statistics),
so the server's model carries statistics its clients measured instead of the
initial ones. The update follows TFF's sign convention, `initial - trained`,
so it is the pseudo-gradient a server optimizer applies.
"""

import collections
from collections.abc import Callable

import tensorflow as tf
import tensorflow_federated as tff

from tff_fedprune import layers

ModelFn = Callable[[], tf.keras.Model]


def weights_type_from_keras(model: tf.keras.Model) -> tff.types.StructType:
  """The `tff.learning.models.ModelWeights` type of a model's global weights."""
  return tff.types.tensorflow_to_type(
      tf.nest.map_structure(
          lambda v: tf.TensorSpec(v.shape, v.dtype),
          layers.global_weights(model),
      )
  )


def build_client_work(
    model_fn: ModelFn,
    element_spec,
    *,
    learning_rate: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> tff.learning.templates.ClientWorkProcess:
  """Local SGD (momentum, L2 weight decay) over each client's dataset.

  Args:
    model_fn: builds a fresh Keras model returning logits.
    element_spec: `(images, labels)` spec of the clients' batched datasets.
    learning_rate: client SGD learning rate.
    momentum: client SGD momentum (0 for plain SGD).
    weight_decay: L2 coefficient added to the gradient of each trainable
      weight, as PyTorch's SGD `weight_decay`.

  Returns:
    A `ClientWorkProcess` whose result is a `ClientResult` with a
    `ModelWeights`-shaped update and the number of examples as its weight (0
    when the update is not finite, which then counts in `non_finite_updates`).
  """
  with tf.Graph().as_default():
    weights_type = weights_type_from_keras(model_fn())
  data_type = tff.SequenceType(tff.types.tensorflow_to_type(element_spec))
  optimizer = tff.learning.optimizers.build_sgdm(
      learning_rate=learning_rate, momentum=momentum or None
  )
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

  @tff.tensorflow.computation(weights_type, data_type)
  def client_update(initial_weights, dataset):
    model = model_fn()
    weights = layers.global_weights(model)
    trainable = weights.trainable

    @tf.function
    def train(initial_weights, dataset):
      tf.nest.map_structure(lambda v, t: v.assign(t), weights, initial_weights)
      opt_state = optimizer.initialize(
          tuple(tf.TensorSpec(v.shape, v.dtype) for v in trainable)
      )
      num_examples = tf.constant(0, tf.int64)
      loss_sum = tf.constant(0.0, tf.float32)
      for images, labels in dataset:
        with tf.GradientTape() as tape:
          logits = model(images, training=True)
          loss = loss_fn(labels, logits)
        grads = tape.gradient(loss, trainable)
        if weight_decay:
          grads = tuple(g + weight_decay * v for g, v in zip(grads, trainable))
        opt_state, new_values = optimizer.next(
            opt_state, tuple(v.read_value() for v in trainable), grads
        )
        for v, t in zip(trainable, new_values):
          v.assign(t)
        n = tf.shape(labels, out_type=tf.int64)[0]
        num_examples += n
        loss_sum += loss * tf.cast(n, tf.float32)
      update = tf.nest.map_structure(
          lambda t, v: t - v.read_value(), initial_weights, weights
      )
      return update, num_examples, loss_sum

    update, num_examples, loss_sum = train(initial_weights, dataset)
    finite = tf.reduce_all(
        [tf.reduce_all(tf.math.is_finite(u)) for u in tf.nest.flatten(update)]
    )
    update = tf.nest.map_structure(
        lambda u: tf.where(finite, u, tf.zeros_like(u)), update
    )
    weight = tf.where(finite, tf.cast(num_examples, tf.float32), 0.0)
    mean_loss = tf.math.divide_no_nan(loss_sum, tf.cast(num_examples, tf.float32))
    metrics = collections.OrderedDict(
        loss=tf.where(finite, mean_loss, 0.0),
        num_examples=tf.where(finite, num_examples, 0),
        non_finite_updates=tf.cast(tf.logical_not(finite), tf.int32),
    )
    return tff.learning.templates.ClientResult(update, weight), metrics

  @tff.federated_computation
  def init_fn():
    return tff.federated_value((), tff.SERVER)

  @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(weights_type, tff.CLIENTS),
      tff.FederatedType(data_type, tff.CLIENTS),
  )
  def next_fn(state, weights, client_data):
    client_result, metrics = tff.federated_map(
        client_update, (weights, client_data)
    )
    measurements = collections.OrderedDict(
        train_loss=tff.federated_mean(
            metrics['loss'], weight=client_result.update_weight
        ),
        num_examples=tff.federated_sum(metrics['num_examples']),
        non_finite_updates=tff.federated_sum(metrics['non_finite_updates']),
    )
    return tff.templates.MeasuredProcessOutput(
        state, client_result, tff.federated_zip(measurements)
    )

  return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)
