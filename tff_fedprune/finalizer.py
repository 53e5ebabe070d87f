"""The server side of a round: a server optimizer applied to the mean update.

The aggregated update is the pseudo-gradient of an optimizer from
`tff.learning.optimizers`: the adaptive server optimizers of FedOpt (Reddi et
al., "Adaptive Federated Optimization").
"""

import tensorflow as tf
import tensorflow_federated as tff

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
