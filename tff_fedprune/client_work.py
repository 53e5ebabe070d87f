"""FedDP client work: local training with salience-masked updates.

Each client trains the global model with its own keep ratio (device
heterogeneity, DESIGN.md 1.4), counting which channels its data kept. It
reports `OrderedDict(update=delta * M, mask=M)`, where delta is `initial -
trained` (TFF's sign: the pseudo-gradient a server optimizer applies) over all
global weights, BN moving statistics included, and M the channel-structured
salience mask of `salience.ChannelStructure` (1.2).

Weight decay, the FedProx term and SCAFFOLD's control-variate correction act
only on weights whose channels have been kept at least once this round, so with momentum they never move a
coordinate outside the mask: with `salience_threshold=0` the masked update
equals the true update. A dense model (no gated layers) has all-ones masks
and trains as plain FedAvg/FedProx.
"""

import collections
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_fedprune import encoding
from tff_fedprune import layers
from tff_fedprune import salience

ModelFn = Callable[[], tf.keras.Model]
ALGORITHMS = ('fedavg', 'fedprox', 'fednova', 'scaffold')


def weights_type_from_keras(model: tf.keras.Model) -> tff.types.StructType:
  """The `tff.learning.models.ModelWeights` type of a model's global weights."""
  return tff.types.tensorflow_to_type(
      tf.nest.map_structure(
          lambda v: tf.TensorSpec(v.shape, v.dtype),
          layers.global_weights(model),
      )
  )


def fednova_normalizer(steps, momentum: float):
  """FedNova's a = (t - m (1 - m^t) / (1 - m)) / (1 - m); t for plain SGD."""
  steps = tf.cast(steps, tf.float32)
  if not momentum:
    return steps
  m = momentum
  return (steps - m * (1.0 - m**steps) / (1.0 - m)) / (1.0 - m)


def client_data(
    dataset: tf.data.Dataset, keep_ratio: float, client_id: int = 0
):
  """One client's input: its batches, keep ratio and id (1-element datasets).

  TFF's learning processes take client data as a structure of sequences, so
  per-client settings travel as sequences too. The id selects the client's
  SCAFFOLD control variate.
  """
  return collections.OrderedDict(
      batches=dataset,
      keep_ratio=tf.data.Dataset.from_tensors(np.float32(keep_ratio)),
      client_id=tf.data.Dataset.from_tensors(np.int32(client_id)),
  )


def client_data_type(element_spec) -> tff.types.StructType:
  return tff.types.StructWithPythonType(
      [
          ('batches', tff.SequenceType(tff.types.tensorflow_to_type(
              element_spec))),
          ('keep_ratio', tff.SequenceType(tff.TensorType(np.float32))),
          ('client_id', tff.SequenceType(tff.TensorType(np.int32))),
      ],
      collections.OrderedDict,
  )


def build_local_training(
    model: tf.keras.Model,
    optimizer: tff.learning.optimizers.Optimizer,
    *,
    weight_decay: float = 0.0,
    prox_mu: float = 0.0,
    salience_threshold: float = 0.0,
):
  """A `tf.function` training `model` on one client's data.

  Its arguments are the initial global weights, the client's batches, its
  keep ratio (a 1-element dataset) and optionally a gradient correction.
  It returns `(delta, mask, num_examples, loss_sum, steps)`: the unmasked
  update `initial - trained` of the global weights, the round's salience
  mask, and the number of local steps taken.
  """
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  weights = layers.global_weights(model)
  trainable = weights.trainable
  structure = salience.ChannelStructure(model)

  def local_terms(initial_trainable, correction):
    """Decay, proximal and correction gradients on kept channels only."""
    touched = structure.touched_masks().trainable
    return tuple(
        t * (weight_decay * v + prox_mu * (v - v0) + c)
        for t, v, v0, c in zip(touched, trainable, initial_trainable,
                               correction)
    )

  @tf.function
  def train(initial_weights, batches, keep_ratio, correction=None):
    """`correction` (trainable-shaped) is added to every kept gradient."""
    tf.nest.map_structure(lambda v, t: v.assign(t), weights, initial_weights)
    layers.set_keep_ratio(model, keep_ratio.reduce(1.0, lambda _, r: r))
    layers.reset_channel_counts(model)
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
      grads = tape.gradient(loss, trainable)
      if weight_decay or prox_mu or correction is not None:
        extra = local_terms(
            initial_weights.trainable,
            correction or tuple(tf.zeros_like(v) for v in trainable),
        )
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
    return (
        delta,
        structure.salience_masks(salience_threshold),
        num_examples,
        loss_sum,
        steps,
    )

  return train


def build_client_work(
    model_fn: ModelFn,
    element_spec,
    *,
    learning_rate: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    algorithm: str = 'fedavg',
    prox_mu: float = 0.0,
    salience_threshold: float = 0.0,
    num_clients: int = 0,
) -> tff.learning.templates.ClientWorkProcess:
  """Builds the client work.

  Args:
    model_fn: builds a fresh Keras model returning logits.
    element_spec: `(images, labels)` spec of the clients' batched datasets.
    learning_rate: client SGD learning rate.
    momentum: client SGD momentum (0 for plain SGD).
    weight_decay: L2 coefficient added to the gradient of each trainable
      weight, as PyTorch's SGD `weight_decay`.
    algorithm: 'fedavg', 'fedprox', 'fednova' (the trainable update is
      divided by the client's effective number of steps a_k, which travels as
      `scale` for the server to multiply the mean by sum_k p_k a_k) or
      'scaffold'.
    prox_mu: FedProx proximal coefficient (local loss + mu/2 ||w - w_0||^2).
    salience_threshold: a channel is salient iff kept_count / samples > this.
    num_clients: size of the federation, for SCAFFOLD's per-client control
      variates (held by the server as one table, selected by client id; its
      memory grows as num_clients x model size).

  Returns:
    A `ClientWorkProcess`. Its client data is `client_data(...)`; its result
    a `ClientResult` of `OrderedDict(update=..., mask=...[, scale=...])`
    weighted by the
    number of examples (0 when the update is not finite, which then counts in
    `non_finite_updates`).
  """
  if algorithm not in ALGORITHMS:
    raise ValueError(f'unknown algorithm {algorithm!r}; choose from {ALGORITHMS}')
  if algorithm != 'fedprox':
    prox_mu = 0.0
  with tf.Graph().as_default():
    weights_type = weights_type_from_keras(model_fn())
  data_type = client_data_type(element_spec)
  optimizer = tff.learning.optimizers.build_sgdm(
      learning_rate=learning_rate, momentum=momentum or None
  )

  trainable_specs = tff.types.type_to_tf_tensor_specs(weights_type.trainable)
  if algorithm == 'scaffold':
    if num_clients < 1:
      raise ValueError('scaffold needs num_clients >= 1 for its variates')
    state_spec = collections.OrderedDict(
        c=trainable_specs,
        c_clients=tuple(
            tf.TensorSpec([num_clients] + s.shape.as_list(), s.dtype)
            for s in trainable_specs
        ),
    )
  else:
    state_spec = collections.OrderedDict()
  state_type = tff.types.tensorflow_to_type(state_spec)

  @tff.tensorflow.computation(weights_type, data_type, state_type)
  def client_update(initial_weights, data, state):
    train = build_local_training(
        model_fn(),
        optimizer,
        weight_decay=weight_decay,
        prox_mu=prox_mu,
        salience_threshold=salience_threshold,
    )
    outputs = collections.OrderedDict()
    if algorithm == 'scaffold':
      client_id = data['client_id'].reduce(0, lambda _, i: i)
      c = tuple(state['c'])
      c_k = tuple(table[client_id] for table in state['c_clients'])
      correction = tuple(a - b for a, b in zip(c, c_k))
      delta, mask, num_examples, loss_sum, steps = train(
          initial_weights, data['batches'], data['keep_ratio'], correction
      )
      # Option II of Karimireddy et al.: c_k+ = c_k - c + delta / (K lr),
      # applied only where the salience mask kept the weight. With momentum
      # m the K steps move the weights by lr * a_k mean gradients (a_k as in
      # FedNova, K when m = 0); dividing by K would overstate the gradient
      # up to 1 / (1 - m) times, and SCAFFOLD diverged that way at m = 0.9.
      k_lr = fednova_normalizer(tf.maximum(steps, 1), momentum) * learning_rate
      control_delta = tuple(
          m * (d / k_lr - ci)
          for m, d, ci in zip(mask.trainable, delta.trainable, c)
      )
      one_hot = tf.one_hot(client_id, num_clients)
      outputs['c_clients_delta'] = tuple(
          tf.reshape(one_hot, [-1] + [1] * cd.shape.rank) * cd[tf.newaxis]
          for cd in control_delta
      )
      outputs['control_upload_bytes'] = tf.add_n([
          encoding.encoded_bytes(encoding.TensorCodec(cd.shape).encode(cd, m))
          for cd, m in zip(control_delta, mask.trainable)
      ])
    else:
      delta, mask, num_examples, loss_sum, steps = train(
          initial_weights, data['batches'], data['keep_ratio']
      )
    update = tf.nest.map_structure(tf.multiply, delta, mask)
    if algorithm == 'fednova':
      # Only the gradient steps are normalised: scaling the change of the
      # moving statistics by tau_eff / a_k extrapolates them (variances went
      # negative and evaluation NaN in the Fashion-MNIST grid).
      a_k = fednova_normalizer(steps, momentum)
      update = tff.learning.models.ModelWeights(
          tf.nest.map_structure(
              lambda u: u / tf.maximum(a_k, 1e-12), update.trainable
          ),
          update.non_trainable,
      )
    finite = tf.reduce_all(
        [tf.reduce_all(tf.math.is_finite(u)) for u in tf.nest.flatten(update)]
    )
    zero_unless_finite = lambda u: tf.where(finite, u, tf.zeros_like(u))
    update = tf.nest.map_structure(zero_unless_finite, update)
    weight = tf.where(finite, tf.cast(num_examples, tf.float32), 0.0)
    mean_loss = tf.math.divide_no_nan(loss_sum, tf.cast(num_examples, tf.float32))
    metrics = collections.OrderedDict(
        loss=tf.where(finite, mean_loss, 0.0),
        num_examples=tf.where(finite, num_examples, 0),
        non_finite_updates=tf.cast(tf.logical_not(finite), tf.int32),
    )
    if algorithm == 'scaffold':
      outputs['c_clients_delta'] = tf.nest.map_structure(
          zero_unless_finite, outputs['c_clients_delta']
      )
      metrics.update(outputs)
    result = collections.OrderedDict(update=update, mask=mask)
    if algorithm == 'fednova':
      result['scale'] = a_k
    return tff.learning.templates.ClientResult(result, weight), metrics

  @tff.tensorflow.computation
  def initial_state():
    return tf.nest.map_structure(
        lambda s: tf.zeros(s.shape, s.dtype), state_spec
    )

  def update_state(state, c_clients_delta):
    """c <- c + (1 / N) sum_k dc_k (the rows of the summed table)."""
    c = tuple(
        c + tf.reduce_sum(d, axis=0) / num_clients
        for c, d in zip(state['c'], c_clients_delta)
    )
    tables = tuple(
        t + d for t, d in zip(state['c_clients'], c_clients_delta)
    )
    return collections.OrderedDict(c=c, c_clients=tables)

  @tff.federated_computation
  def init_fn():
    return tff.federated_eval(initial_state, tff.SERVER)

  @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(weights_type, tff.CLIENTS),
      tff.FederatedType(data_type, tff.CLIENTS),
  )
  def next_fn(state, weights, data):
    client_result, metrics = tff.federated_map(
        client_update, (weights, data, tff.federated_broadcast(state))
    )
    measurements = collections.OrderedDict(
        train_loss=tff.federated_mean(
            metrics['loss'], weight=client_result.update_weight
        ),
        num_examples=tff.federated_sum(metrics['num_examples']),
        non_finite_updates=tff.federated_sum(metrics['non_finite_updates']),
    )
    if algorithm == 'scaffold':
      state = tff.federated_map(
          tff.tensorflow.computation(
              update_state, state_type, state_type.c_clients
          ),
          (state, tff.federated_sum(metrics['c_clients_delta'])),
      )
      measurements['control_upload_bytes'] = tff.federated_sum(
          metrics['control_upload_bytes']
      )
    return tff.templates.MeasuredProcessOutput(
        state, client_result, tff.federated_zip(measurements)
    )

  return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)
