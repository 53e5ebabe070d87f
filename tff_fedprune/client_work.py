"""FedDP client work: masked local training, with per-algorithm hooks.

Each client trains the global model at its own keep ratio (heterogeneous
devices) and reports `OrderedDict(update=delta * M, mask=M)`, where delta is
`initial - trained` (TFF's sign: the pseudo-gradient a server optimizer
applies) over all global weights, BN moving statistics included, and M the
channel-structured salience mask (`local_training`, `salience`).

What differs between FedAvg, FedProx, FedNova and SCAFFOLD is an
`algorithm.Algorithm`: the server state it broadcasts, the per-client state
the driver keeps and hands each client as client data, a gradient
correction, the client's output and the aggregator around the mean.

Per-client state goes back by the client's slot in the round: each client
returns the change of its state, `federated_aggregate` scatters it into row
`slot` of a `clients_per_round`-row table held in the server state
(`CLIENT_STATE_UPDATES`), and the driver adds row `slot` to the state of the
client it put in that slot (`simulation.client_states`).
"""

import collections
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_fedprune import algorithm as algorithm_lib
from tff_fedprune import local_training
from tff_fedprune import model_state
from tff_fedprune import slots

CLIENT_STATE_UPDATES = 'client_state_updates'
# Summed over the round's clients (`compact_training.TrainingCost`).
COST_METRICS = ('train_flops', 'dense_train_flops', 'trained_examples',
                'computed_channels', 'round_set_outside_pairs',
                'round_set_gated_pairs')
# Per slot: the columns of each row of the `CLIENT_COSTS` measurement.
CLIENT_COSTS = 'client_costs'
CLIENT_COST_COLUMNS = ('train_flops', 'dense_train_flops',
                       'other_upload_bytes')


def rounding_seed(seed: int, round_num: int, client_id: int) -> np.ndarray:
  """The stateless seed of a client's upload rounding in a round."""
  return np.array([seed, (round_num << 32) + client_id], np.int64)


def client_data(
    dataset: tf.data.Dataset,
    keep_ratio: float,
    slot: Optional[int] = None,
    client_state=None,
    upload_seed=(0, 0),
    device=None,
) -> collections.OrderedDict:
  """One client's input: its batches, keep ratio and (if any) its state.

  TFF's learning processes take client data as a structure of sequences, so
  per-client values travel as 1-element datasets. `slot` is the client's
  position in the round (0 .. clients_per_round - 1), by which the change of
  its state and its costs come back (`slots`; a client with state has one,
  0 by default). `upload_seed` (`rounding_seed(...)`) seeds the
  stochastic rounding of a quantised upload. `device` (`DEVICE_FIELDS`)
  describes the client's device for a round deadline.
  """
  data = collections.OrderedDict(
      batches=dataset,
      keep_ratio=tf.data.Dataset.from_tensors(np.float32(keep_ratio)),
      rounding_seed=tf.data.Dataset.from_tensors(
          np.asarray(upload_seed, np.int64)
      ),
  )
  if slot is not None or client_state is not None:
    data['slot'] = tf.data.Dataset.from_tensors(np.int32(slot or 0))
  if client_state is not None:
    data['client_state'] = tf.data.Dataset.from_tensors(client_state)
  if device is not None:
    data['device'] = tf.data.Dataset.from_tensors(
        np.asarray(device, np.float64))
  return data


# A client's `device` value under a round deadline (`simulation.devices`).
DEVICE_FIELDS = ('train_flops_per_s', 'link_bytes_per_s', 'download_bytes')
# In its result: (seconds before its upload starts, seconds per upload byte).
DEVICE_TIME = 'device_time'


def _device_time(device, train_flops):
  flops_per_s, bytes_per_s, download = tf.unstack(device)
  before_upload = download / bytes_per_s + train_flops / flops_per_s
  return tf.stack([before_upload, 1.0 / bytes_per_s])


def client_data_type(element_spec, client_state_spec, with_slot: bool,
                     with_device: bool = False) -> tff.types.StructType:
  fields = [
      ('batches', tff.SequenceType(tff.types.tensorflow_to_type(element_spec))),
      ('keep_ratio', tff.SequenceType(tff.TensorType(np.float32))),
      ('rounding_seed', tff.SequenceType(tff.TensorType(np.int64, [2]))),
  ]
  if with_slot:
    fields.append(('slot', tff.SequenceType(tff.TensorType(np.int32))))
  if client_state_spec:
    fields += [
        ('client_state', tff.SequenceType(
            tff.types.tensorflow_to_type(client_state_spec))),
    ]
  if with_device:
    fields.append(('device', tff.SequenceType(
        tff.TensorType(np.float64, [len(DEVICE_FIELDS)]))))
  return tff.types.StructWithPythonType(fields, collections.OrderedDict)


def _first(dataset: tf.data.Dataset, spec):
  initial = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), spec)
  return dataset.reduce(initial, lambda _, x: x)


def build_client_work(
    model_fn: local_training.ModelFn,
    element_spec,
    *,
    learning_rate: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    algorithm: Optional[algorithm_lib.Algorithm] = None,
    salience_threshold: float = 0.0,
    clients_per_round: int = 0,
    measure_local_accuracy: bool = False,
    compact_training: str = 'off',
    self_distillation: float = 0.0,
    with_device: bool = False,
) -> tff.learning.templates.ClientWorkProcess:
  """Builds the client work.

  Args:
    model_fn: builds a fresh Keras model returning logits.
    element_spec: `(images, labels)` spec of the clients' batched datasets.
    learning_rate: client SGD learning rate.
    momentum: client SGD momentum (0 for plain SGD).
    weight_decay: L2 coefficient added to the gradient of each trainable
      weight, as PyTorch's SGD `weight_decay`.
    algorithm: the `Algorithm` (default FedAvg).
    salience_threshold: a channel is salient iff kept_count / samples > this.
    clients_per_round: rows of the per-slot tables by which per-client state
      and costs come back (`slots`; 0: no per-client costs, and no
      algorithm with per-client state). With it, clients' data has a slot.
    measure_local_accuracy: also measure each trained client model's
      accuracy on its own batches; their unweighted mean over the clients
      with a finite update is the `local_train_accuracy` measurement.
    compact_training: `compact_training.MODES` (`local_training`).
    self_distillation: weight of a narrow client's divergence from the
      model's full-width output (`local_training`; 0: off).
    with_device: client data has a `device` (`DEVICE_FIELDS`), and the
      result its `DEVICE_TIME`, for an aggregator with a round deadline.

  Returns:
    A `ClientWorkProcess`. Its client data is `client_data(...)`; its result
    a `ClientResult` of `OrderedDict(update=..., mask=..., rounding_seed=...,
    **extras)` (the seed is for the client's encoder and is not uploaded)
    weighted by the number of examples (0 when the update is not finite,
    which then counts in `non_finite_updates`).
  """
  algorithm = algorithm or algorithm_lib.Algorithm()
  with tf.Graph().as_default():
    weights_type = model_state.weights_type_from_keras(model_fn())
  trainable_specs = tff.types.type_to_tf_tensor_specs(weights_type.trainable)
  server_spec = algorithm.server_state_spec(trainable_specs)
  client_spec = algorithm.client_state_spec(trainable_specs)
  if client_spec and clients_per_round < 1:
    raise ValueError(
        f'{algorithm.name} keeps per-client state: clients_per_round >= 1'
    )
  with_slot = clients_per_round >= 1
  data_type = client_data_type(element_spec, client_spec, with_slot,
                               with_device)
  server_type = tff.types.tensorflow_to_type(server_spec)
  table_spec = slots.table_spec(client_spec, clients_per_round)
  optimizer = tff.learning.optimizers.build_sgdm(
      learning_rate=learning_rate, momentum=momentum or None
  )

  @tff.tensorflow.computation(weights_type, data_type, server_type)
  def client_update(initial_weights, data, server_state):
    train = local_training.build_local_training(
        model_fn(),
        optimizer,
        weight_decay=weight_decay,
        prox_mu=algorithm.prox_mu,
        salience_threshold=salience_threshold,
        measure_accuracy=measure_local_accuracy,
        compact_training=compact_training,
        self_distillation=self_distillation,
    )
    client_state = _first(data['client_state'], client_spec) if (
        client_spec) else None
    correction = algorithm.gradient_correction(server_state, client_state)
    seed = _first(data['rounding_seed'], tf.TensorSpec([2], tf.int64))
    args = [initial_weights, data['batches'], data['keep_ratio'], correction]
    local = train(*args, width_seed=seed)
    output = algorithm.client_output(algorithm_lib.ClientRound(
        local=local,
        update=tf.nest.map_structure(tf.multiply, local.delta, local.mask),
        server_state=server_state, client_state=client_state,
        rounding_seed=seed,
    ))
    slot = _first(data['slot'], tf.TensorSpec([], tf.int32)) if (
        with_slot) else None
    result, metrics = _client_result(local, output, seed, slot, client_spec,
                                     measure_local_accuracy)
    if with_device:
      device = _first(data['device'], tf.TensorSpec(
          [len(DEVICE_FIELDS)], tf.float64))
      result.update[DEVICE_TIME] = _device_time(device, local.cost.train_flops)
    return result, metrics

  initial_state = _initial_state(server_spec, client_spec, table_spec)
  summed_metrics = ('num_examples', 'non_finite_updates') + COST_METRICS + (
      tuple(algorithm.metric_names))

  @tff.federated_computation
  def init_fn():
    return tff.federated_eval(initial_state, tff.SERVER)

  @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(weights_type, tff.CLIENTS),
      tff.FederatedType(data_type, tff.CLIENTS),
  )
  def next_fn(state, weights, data):
    broadcast = _broadcast(state, server_spec) if client_spec else state
    client_result, metrics = tff.federated_map(
        client_update, (weights, data, tff.federated_broadcast(broadcast))
    )
    measurements = _measurements(client_result, metrics, summed_metrics,
                                 measure_local_accuracy)
    if with_slot:
      measurements[CLIENT_COSTS] = slots.sum_into_slots(
          tff.federated_zip(collections.OrderedDict(
              slot=metrics['slot'], change=metrics['client_cost'])),
          slots.table_spec(tf.TensorSpec([len(CLIENT_COST_COLUMNS)],
                                         tf.float64), clients_per_round))
    if client_spec:
      state = _next_state(state, metrics, algorithm, server_spec, table_spec)
    return tff.templates.MeasuredProcessOutput(
        state, client_result, tff.federated_zip(measurements)
    )

  return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)


def _initial_state(server_spec, client_spec, table_spec):
  """The computation of the client work's initial (server) state."""

  @tff.tensorflow.computation
  def initial_state():
    state = slots.zeros(server_spec)
    if client_spec:
      state[CLIENT_STATE_UPDATES] = slots.zeros(table_spec)
    return state

  return initial_state


def _broadcast(state, server_spec):
  """The part of the state every client receives (not the slot table)."""
  return tff.federated_map(
      tff.tensorflow.computation(
          lambda s: collections.OrderedDict((k, s[k]) for k in server_spec),
          state.type_signature.member),
      state,
  )


def _cost_metrics(local, output) -> collections.OrderedDict:
  """A client's `COST_METRICS` and its `client_cost` row."""
  cost = local.cost
  other_upload = tf.add_n([tf.constant(0, tf.float64)] + [
      tf.cast(v, tf.float64) for k, v in output.metrics.items()
      if k.endswith('_upload_bytes')])
  return collections.OrderedDict(
      train_flops=cost.train_flops,
      dense_train_flops=cost.dense_train_flops,
      trained_examples=local.num_examples,
      computed_channels=cost.computed_channels,
      round_set_outside_pairs=cost.outside_pairs,
      round_set_gated_pairs=cost.gated_pairs,
      client_cost=tf.stack([cost.train_flops, cost.dense_train_flops,
                            other_upload]),
  )


def _client_result(local, output, seed, slot, client_spec, measure_accuracy):
  """(ClientResult, metrics) of a client's output; non-finite ones zeroed."""
  update = output.update
  finite = tf.reduce_all(
      [tf.reduce_all(tf.math.is_finite(u)) for u in tf.nest.flatten(update)]
  )
  zero_unless_finite = lambda u: tf.where(finite, u, tf.zeros_like(u))
  update = tf.nest.map_structure(zero_unless_finite, update)
  num_examples = local.num_examples
  weight = tf.where(finite, tf.cast(num_examples, tf.float32), 0.0)
  mean_loss = tf.math.divide_no_nan(
      local.loss_sum, tf.cast(num_examples, tf.float32)
  )
  metrics = collections.OrderedDict(
      loss=tf.where(finite, mean_loss, 0.0),
      num_examples=tf.where(finite, num_examples, 0),
      non_finite_updates=tf.cast(tf.logical_not(finite), tf.int32),
      **output.metrics,
      **_cost_metrics(local, output),
  )
  if measure_accuracy:
    metrics['local_accuracy'] = local.accuracy
    metrics['finite'] = tf.cast(finite, tf.float32)
  if slot is not None:
    metrics['slot'] = slot
  if client_spec:
    metrics['state_change'] = tf.nest.map_structure(
        zero_unless_finite, output.state_change
    )
  result = collections.OrderedDict(
      update=update, mask=local.mask, rounding_seed=seed, **output.extras
  )
  if slot is not None:
    result['slot'] = slot  # For the aggregator's per-client upload bytes.
  return tff.learning.templates.ClientResult(result, weight), metrics


def _measurements(client_result, metrics, summed_metrics, measure_accuracy):
  """The client work's round measurements (federated, at the server)."""
  measurements = collections.OrderedDict(
      train_loss=tff.federated_mean(
          metrics['loss'], weight=client_result.update_weight
      ),
  )
  for name in summed_metrics:
    measurements[name] = tff.federated_sum(metrics[name])
  if measure_accuracy:
    measurements['local_train_accuracy'] = tff.federated_mean(
        metrics['local_accuracy'], weight=metrics['finite']
    )
  return measurements


def _next_state(state, metrics, algorithm, server_spec, table_spec):
  """The server state moved by the round's per-slot client state changes."""
  state_type = state.type_signature.member
  table = slots.sum_into_slots(
      tff.federated_zip(collections.OrderedDict(
          slot=metrics['slot'], change=metrics['state_change'])),
      table_spec,
  )
  return tff.federated_map(
      tff.tensorflow.computation(
          lambda s, t: _with_table(algorithm.update_server_state(
              collections.OrderedDict((k, s[k]) for k in server_spec), t
          ), t),
          state_type, state_type[CLIENT_STATE_UPDATES],
      ),
      (state, table),
  )


def _with_table(server_state, table) -> collections.OrderedDict:
  state = collections.OrderedDict(server_state)
  state[CLIENT_STATE_UPDATES] = table
  return state
