"""The FedDP learning process, composed from TFF's learning templates.

`build_learning_process` wires a broadcast distributor, the masked client work
(`client_work`, with the algorithm's hooks from `fednova` or `scaffold`), the
count-aware sparse aggregator (`aggregation`) and a finalizer that applies a
server optimizer (`finalizer`) with
`tff.learning.templates.compose_learning_process`, so TFF's tooling
(`get_model_weights`, program state) works on it unchanged.
"""

from typing import Optional, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_fedprune import aggregation as aggregation_lib
from tff_fedprune import algorithm as algorithm_lib
from tff_fedprune import client_work as client_work_lib
from tff_fedprune import encoding
from tff_fedprune import error_feedback as error_feedback_lib
from tff_fedprune import fednova
from tff_fedprune import finalizer as finalizer_lib
from tff_fedprune import local_training
from tff_fedprune import model_state
from tff_fedprune import scaffold
# Imported for its effect: no TFF default context (it would leak a worker).
from tff_fedprune.runtime import contexts as _contexts  # pylint: disable=unused-import

ALGORITHMS = ('fedavg', 'fedprox', 'fednova', 'scaffold')
SERVER_OPTIMIZERS = finalizer_lib.SERVER_OPTIMIZERS


def build_algorithm(
    name: str,
    *,
    prox_mu: float = 0.0,
    num_clients: int = 0,
    learning_rate: float = 0.0,
    momentum: float = 0.0,
    error_feedback: bool = False,
    upload_values: encoding.ValueFormat = encoding.ValueFormat(),
) -> algorithm_lib.Algorithm:
  """The client-work hooks of algorithm `name` (one of `ALGORITHMS`).

  With `error_feedback` they are wrapped in `error_feedback.ErrorFeedback`
  for uploads whose values are in `upload_values`' format.
  """
  if name == 'fedavg':
    hooks = algorithm_lib.Algorithm()
  elif name == 'fedprox':
    hooks = algorithm_lib.FedProx(prox_mu)
  elif name == 'fednova':
    hooks = fednova.FedNova(momentum)
  elif name == 'scaffold':
    hooks = scaffold.Scaffold(num_clients, learning_rate, momentum)
  else:
    raise ValueError(f'unknown algorithm {name!r}; choose from {ALGORITHMS}')
  if error_feedback:
    return error_feedback_lib.ErrorFeedback(hooks, upload_values)
  return hooks


def build_learning_process(
    model_fn: local_training.ModelFn,
    element_spec,
    *,
    client_learning_rate: float,
    client_momentum: float = 0.0,
    weight_decay: float = 0.0,
    algorithm: Union[str, algorithm_lib.Algorithm] = 'fedavg',
    prox_mu: float = 0.0,
    salience_threshold: float = 0.0,
    aggregation: str = 'count_aware',
    upload_values: encoding.ValueFormat = encoding.ValueFormat(),
    error_feedback: bool = False,
    measure_local_accuracy: bool = False,
    compact_training: str = 'off',
    self_distillation: float = 0.0,
    num_clients: int = 0,
    clients_per_round: int = 0,
    round_deadline_s: Optional[float] = None,
    server_optimizer: str = 'sgd',
    server_learning_rate: float = 1.0,
    initial_weights: Optional[tff.learning.models.ModelWeights] = None,
    model_aggregator: Optional[
        tff.aggregators.WeightedAggregationFactory] = None,
) -> tff.learning.templates.LearningProcess:
  """Builds the federated learning process.

  Args:
    model_fn: builds a fresh Keras model returning logits.
    element_spec: `(images, labels)` spec of the clients' batched datasets.
    client_learning_rate: client SGD learning rate.
    client_momentum: client SGD momentum.
    weight_decay: client L2 weight decay.
    algorithm: an `algorithm.Algorithm` (e.g. from `build_algorithm`), or
      the name of one of `ALGORITHMS`, built with `prox_mu`, `num_clients`
      and `error_feedback`.
    prox_mu: FedProx proximal coefficient (used by 'fedprox' only).
    salience_threshold: tau of the salience mask (docs/design.md section 2).
    aggregation: one of `aggregation.AGGREGATIONS`: the count-aware mean or
      the authors' plain weighted mean.
    upload_values: how uploaded values are coded (`encoding.ValueFormat`:
      bits, rounding, rotation; below 32 bits, rounding and rotation are
      seeded by each client's `rounding_seed`).
    error_feedback: clients keep what their uploads dropped and add it to
      their next update (`error_feedback`; FedAvg and FedProx only).
    measure_local_accuracy: measure each trained client model's accuracy on
      its own batches (`local_train_accuracy` in the client work's metrics).
    compact_training: `compact_training.MODES`: compute only the channels
      each batch ('step') or the client's round ('round') keeps.
    self_distillation: weight of a narrow client's divergence from the
      model's full-width output in local training (0: off).
    num_clients: federation size (SCAFFOLD's 1 / N in the update of c).
    clients_per_round: most clients per round: the rows of the per-slot
      tables (SCAFFOLD's returned control-variate changes, each client's
      costs and upload bytes; `slots`). With it, client data has a slot.
    round_deadline_s: simulated seconds a round waits; with it, client data
      has a `device` (`client_work.DEVICE_FIELDS`) and the aggregate leaves
      out late clients (`aggregation.MaskedMeanFactory`).
    server_optimizer: one of `SERVER_OPTIMIZERS`.
    server_learning_rate: the server optimizer's learning rate.
    initial_weights: the starting global model (numpy `ModelWeights`); by
      default the weights of one eager `model_fn()` call, so seeding TF before
      building makes the run reproducible.
    model_aggregator: aggregates `OrderedDict(update, mask, ...)` client
      results into the model update, in place of the count-aware sparse mean
      (e.g. `server_support.ServerSupportFactory`, with DP or secure sums).

  Returns:
    A `tff.learning.templates.LearningProcess`.
  """
  hooks = algorithm if isinstance(algorithm, algorithm_lib.Algorithm) else (
      build_algorithm(
          algorithm, prox_mu=prox_mu, num_clients=num_clients,
          learning_rate=client_learning_rate, momentum=client_momentum,
          error_feedback=error_feedback, upload_values=upload_values,
      )
  )
  if initial_weights is None:
    initial_weights = tf.nest.map_structure(
        lambda v: v.numpy(), model_state.global_weights(model_fn())
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
      algorithm=hooks,
      salience_threshold=salience_threshold,
      clients_per_round=clients_per_round,
      measure_local_accuracy=measure_local_accuracy,
      compact_training=compact_training,
      self_distillation=self_distillation,
      with_device=round_deadline_s is not None,
  )
  aggregator = hooks.aggregator(
      model_aggregator or aggregation_lib.MaskedMeanFactory(
          aggregation, upload_values, clients_per_round=clients_per_round,
          deadline_s=round_deadline_s)
  ).create(
      client_work.next.type_signature.result.result.member.update,
      tff.TensorType(np.float32),
  )
  finalizer = finalizer_lib.build_finalizer(
      finalizer_lib.build_server_optimizer(
          server_optimizer, server_learning_rate
      ),
      weights_type,
  )
  return tff.learning.templates.compose_learning_process(
      initial_model_weights_fn,
      tff.learning.templates.build_broadcast_process(weights_type),
      client_work,
      aggregator,
      finalizer,
  )
