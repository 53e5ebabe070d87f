"""The FedDP learning process, composed from TFF's learning templates.

`build_learning_process` wires a broadcast distributor, the masked client work
(`client_work`), the count-aware sparse aggregator (`aggregation`) and a
finalizer that applies a server optimizer from
`tff.learning.optimizers` (the adaptive server optimizers of FedOpt) with
`tff.learning.templates.compose_learning_process`, so TFF's tooling
(`get_model_weights`, program state) works on it unchanged.
"""

from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_fedprune import aggregation
from tff_fedprune import client_work as client_work_lib
from tff_fedprune import layers

SERVER_OPTIMIZERS = ('sgd', 'sgdm', 'adam', 'yogi', 'adagrad')


def build_server_optimizer(
    name: str, learning_rate: float
) -> tff.learning.optimizers.Optimizer:
  """Server optimizer `name` (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad).

  Adaptive optimizers use the hyperparameters of Reddi et al., "Adaptive
  Federated Optimization" (beta_2 = 0.99, epsilon = 1e-3).
  """
  if name == 'sgd':
    return tff.learning.optimizers.build_sgdm(learning_rate)
  if name == 'sgdm':
    return tff.learning.optimizers.build_sgdm(learning_rate, momentum=0.9)
  if name == 'adam':
    return tff.learning.optimizers.build_adam(
        learning_rate, beta_2=0.99, epsilon=1e-3
    )
  if name == 'yogi':
    return tff.learning.optimizers.build_yogi(
        learning_rate, beta_2=0.99, epsilon=1e-3
    )
  if name == 'adagrad':
    return tff.learning.optimizers.build_adagrad(learning_rate, epsilon=1e-3)
  raise ValueError(
      f'unknown server optimizer {name!r}; choose from {SERVER_OPTIMIZERS}'
  )


def build_finalizer(
    optimizer: tff.learning.optimizers.Optimizer,
    weights_type: tff.types.StructType,
) -> tff.learning.templates.FinalizerProcess:
  """Applies `optimizer` to the trainable part, the mean to the rest.

  The update is `ModelWeights`-shaped: its trainable part is the
  pseudo-gradient of TFF's apply-optimizer finalizer (which also rejects
  non-finite updates); its non-trainable part (moving statistics) is
  subtracted as is, so the server holds the clients' mean statistics.
  """
  apply_optimizer = tff.learning.templates.build_apply_optimizer_finalizer(
      optimizer, weights_type
  )
  subtract = tff.tensorflow.computation(
      lambda a, b: tf.nest.map_structure(tf.subtract, a, b),
      weights_type.non_trainable,
      weights_type.non_trainable,
  )

  @tff.federated_computation(
      apply_optimizer.next.type_signature.parameter[0],
      tff.FederatedType(weights_type, tff.SERVER),
      tff.FederatedType(weights_type, tff.SERVER),
  )
  def next_fn(state, weights, update):
    output = apply_optimizer.next(state, weights, update.trainable)
    non_trainable = tff.federated_map(
        subtract, (weights.non_trainable, update.non_trainable)
    )
    new_weights = tff.federated_zip(
        tff.learning.models.ModelWeights(output.result.trainable, non_trainable)
    )
    return tff.templates.MeasuredProcessOutput(
        output.state, new_weights, output.measurements
    )

  return tff.learning.templates.FinalizerProcess(
      apply_optimizer.initialize, next_fn
  )


def build_learning_process(
    model_fn: client_work_lib.ModelFn,
    element_spec,
    *,
    client_learning_rate: float,
    client_momentum: float = 0.0,
    weight_decay: float = 0.0,
    algorithm: str = 'fedavg',
    prox_mu: float = 0.0,
    salience_threshold: float = 0.0,
    num_clients: int = 0,
    server_optimizer: str = 'sgd',
    server_learning_rate: float = 1.0,
    initial_weights: Optional[tff.learning.models.ModelWeights] = None,
) -> tff.learning.templates.LearningProcess:
  """Builds the federated learning process.

  Args:
    model_fn: builds a fresh Keras model returning logits.
    element_spec: `(images, labels)` spec of the clients' batched datasets.
    client_learning_rate: client SGD learning rate.
    client_momentum: client SGD momentum.
    weight_decay: client L2 weight decay.
    algorithm: one of `client_work.ALGORITHMS`.
    prox_mu: FedProx proximal coefficient.
    salience_threshold: tau of the salience mask (DESIGN.md 1.2).
    num_clients: federation size (SCAFFOLD's control-variate table).
    server_optimizer: one of `SERVER_OPTIMIZERS`.
    server_learning_rate: the server optimizer's learning rate.
    initial_weights: the starting global model (numpy `ModelWeights`); by
      default the weights of one eager `model_fn()` call, so seeding TF before
      building makes the run reproducible.

  Returns:
    A `tff.learning.templates.LearningProcess`.
  """
  if initial_weights is None:
    initial_weights = tf.nest.map_structure(
        lambda v: v.numpy(), layers.global_weights(model_fn())
    )
  weights_type = tff.types.tensorflow_to_type(
      tf.nest.map_structure(
          lambda a: tf.TensorSpec(a.shape, tf.as_dtype(a.dtype)),
          initial_weights,
      )
  )

  @tff.tensorflow.computation
  def initial_model_weights_fn():
    return tf.nest.map_structure(tf.constant, initial_weights)

  client_work = client_work_lib.build_client_work(
      model_fn,
      element_spec,
      learning_rate=client_learning_rate,
      momentum=client_momentum,
      weight_decay=weight_decay,
      algorithm=algorithm,
      prox_mu=prox_mu,
      salience_threshold=salience_threshold,
      num_clients=num_clients,
  )
  aggregator = aggregation.CountAwareMeanFactory().create(
      client_work.next.type_signature.result.result.member.update,
      tff.TensorType(np.float32),
  )
  finalizer = build_finalizer(
      build_server_optimizer(server_optimizer, server_learning_rate),
      weights_type,
  )
  return tff.learning.templates.compose_learning_process(
      initial_model_weights_fn,
      tff.learning.templates.build_broadcast_process(weights_type),
      client_work,
      aggregator,
      finalizer,
  )
