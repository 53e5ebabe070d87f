"""FedNova (Wang et al., 2020): normalised local updates.

A client with momentum m and t local steps moves its weights by
a = (t - m (1 - m^t) / (1 - m)) / (1 - m) mean gradients (a = t for plain
SGD). It divides its trainable update by this effective step count a_k and
sends a_k with it; the server multiplies the count-aware mean of the
normalised updates by sum_k p_k a_k (p_k the example weights). Only the
gradient steps are normalised: the change of the BN moving statistics keeps
its plain mean (rescaling it extrapolated variances negative).
"""

import collections

import tensorflow as tf
import tensorflow_federated as tff

from tff_fedprune import aggregation
from tff_fedprune import algorithm
from tff_fedprune import uplink


def normalizer(steps, momentum: float):
  """FedNova's a = (t - m (1 - m^t) / (1 - m)) / (1 - m); t for plain SGD."""
  steps = tf.cast(steps, tf.float32)
  if not momentum:
    return steps
  m = momentum
  return (steps - m * (1.0 - m**steps) / (1.0 - m)) / (1.0 - m)


class FedNova(algorithm.Algorithm):
  """Clients send update / a_k and a_k; the server rescales the mean."""

  name = 'fednova'

  def __init__(self, momentum: float):
    self.momentum = momentum

  def client_output(self, client):
    a_k = normalizer(client.local.steps, self.momentum)
    update = tff.learning.models.ModelWeights(
        tf.nest.map_structure(
            lambda u: u / tf.maximum(a_k, 1e-12), client.update.trainable
        ),
        client.update.non_trainable,
    )
    return algorithm.ClientOutput(update, extras={'scale': a_k})

  def aggregator(self, factory):
    return StepRescaledMeanFactory(factory)


class StepRescaledMeanFactory(tff.aggregators.WeightedAggregationFactory):
  """Wraps a mean of `OrderedDict(update, mask)`: times sum_k p_k a_k.

  The value is `OrderedDict(update=ModelWeights, mask=..., scale=a_k, ...)`;
  all but the scale go to the inner mean, whose trainable part is multiplied
  by the weighted mean of the scales (the non-trainable part is left as it
  is). The upload counts the 4 bytes of each scale.
  """

  def __init__(self, inner: tff.aggregators.WeightedAggregationFactory):
    self._inner = inner

  def create(self, value_type, weight_type):
    inner_names = [
        n for n in tff.structure.name_list(value_type) if n != 'scale'
    ]
    inner_type = tff.types.StructWithPythonType(
        [(n, value_type[n]) for n in inner_names], collections.OrderedDict
    )
    inner = self._inner.create(inner_type, weight_type)
    mean_type = inner.next.type_signature.result.result.member

    @tff.tensorflow.computation(value_type, weight_type)
    def split(value, weight):
      inner_value = collections.OrderedDict(
          (n, value[n]) for n in inner_names
      )
      return (
          inner_value,
          weight * value['scale'],
          tf.constant(uplink.SCALAR_BYTES, tf.int64),
      )

    @tff.tensorflow.computation(mean_type, tf.float32, weight_type)
    def rescale(mean, scale_sum, weight_sum):
      scale = tf.math.divide_no_nan(scale_sum, weight_sum)
      return tff.learning.models.ModelWeights(
          tf.nest.map_structure(lambda m: scale * m, mean.trainable),
          mean.non_trainable,
      )

    @tff.tensorflow.computation(
        inner.next.type_signature.result.measurements.member, tf.int64
    )
    def add_scale_bytes(measurements, scale_bytes):
      measurements = collections.OrderedDict(measurements)
      measurements['upload_bytes'] += scale_bytes
      if aggregation.CLIENT_UPLOAD_BYTES in measurements:
        measurements[aggregation.CLIENT_UPLOAD_BYTES] += uplink.SCALAR_BYTES
      return measurements

    @tff.federated_computation(
        inner.initialize.type_signature.result,
        tff.FederatedType(value_type, tff.CLIENTS),
        tff.FederatedType(weight_type, tff.CLIENTS),
    )
    def next_fn(state, value, weight):
      inner_value, weighted_scale, scale_bytes = tff.federated_map(
          split, (value, weight)
      )
      output = inner.next(state, inner_value, weight)
      result = tff.federated_map(rescale, (
          output.result,
          tff.federated_sum(weighted_scale),
          tff.federated_sum(weight),
      ))
      measurements = tff.federated_map(
          add_scale_bytes,
          (output.measurements, tff.federated_sum(scale_bytes)),
      )
      return tff.templates.MeasuredProcessOutput(
          output.state, result, measurements
      )

    return tff.templates.AggregationProcess(inner.initialize, next_fn)
