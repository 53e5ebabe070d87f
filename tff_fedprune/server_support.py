"""Uploads on a server-chosen support: the same channels from every client.

docs/design.md, section 8. With a client-chosen mask the positions a
client sends tell the server which channels its data made salient. Here the
server fixes each round, per gated layer, k = round(rho * C) channels (a
static size, as TFF's DP and secure-sum factories need) and broadcasts them;
every client sends the values of its masked update on them, in that order,
and no positions. What a client trained outside the support is dropped.
Tensors no gated channel owns (biases, gates, an ungated classifier) travel
whole; a dense model's support is every coordinate (dense DP-FedAvg).

The support is chosen from what the server already released: each client
also uploads its channel mask (scaled by `rate_weight`, inside the same
record, so under DP it is clipped and noised with the update), the server's
mean of them is each channel's kept rate, and the support is the top k of an
exponential average of past rates (post-processing of a private release).
Round 1, with no rates yet, takes the first k channels (a data-free choice:
channels are interchangeable at initialisation).

The records go to an unweighted mean factory (`tff.aggregators`'
`UnweightedMeanFactory`, or `DifferentiallyPrivateFactory`'s fixed
denominator): every client counts once, as DP and secure sums need. A
client whose weight is 0 (a non-finite update, zeroed by the client work)
sends zeros.
"""

import collections
import dataclasses
import math

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_fedprune import aggregation
from tff_fedprune import gated_conv
from tff_fedprune import salience

SUPPORTS = ('client', 'server')
# Algorithms whose whole upload is the model update (SCAFFOLD's control
# variates and FedNova's rescaling are uploads of their own).
ALGORITHMS = ('fedavg', 'fedprox')
# Weight of the previous average in the kept-rate average.
RATE_DECAY = 0.8


@dataclasses.dataclass(frozen=True)
class SupportLayout:
  """Which gated channels own each tensor of a model update, and k of each."""

  owners: tuple  # Per flat update tensor: (in_index, out_index) or None.
  channels: tuple[int, ...]  # C of each gated layer.
  kept: tuple[int, ...]  # k of each gated layer.

  @classmethod
  def of_model(cls, model: tf.keras.Model, keep_ratio: float):
    structure = salience.ChannelStructure(model)
    channels = tuple(structure.channels)
    kept = tuple(int(gated_conv.num_kept(keep_ratio, c)) for c in channels)
    return cls(tuple(structure.owners), channels, kept)

  def rate_tensor(self, layer: int, specs: list) -> int:
    """Index in `specs` of a vector whose mask is `layer`'s channel mask."""
    return next(i for i, (o, s) in enumerate(zip(self.owners, specs))
                if o == (None, layer) and s.shape.rank == 1)

  def support_shape(self, shape: tf.TensorShape, owner) -> list[int]:
    shape = shape.as_list()
    if owner is None:
      return shape
    in_index, out_index = owner
    if out_index is not None:
      shape[-1] = self.kept[out_index]
    if in_index is not None:
      shape[0 if out_index is None else -2] = self.kept[in_index]
    return shape


def _in_axis(owner) -> int:
  return 0 if owner[1] is None else -2


def gather(value: tf.Tensor, owner, support: list) -> tf.Tensor:
  """`value`'s entries on the support's channels, in support order."""
  if owner is None:
    return value
  in_index, out_index = owner
  if out_index is not None:
    value = tf.gather(value, support[out_index], axis=-1)
  if in_index is not None:
    value = tf.gather(value, support[in_index], axis=_in_axis(owner))
  return value


def _scatter_axis(value, indices, axis: int, size: int):
  axis = axis % value.shape.rank
  perm = [axis] + [i for i in range(value.shape.rank) if i != axis]
  moved = tf.transpose(value, perm)
  full = tf.scatter_nd(indices[:, tf.newaxis], moved,
                       [size] + moved.shape.as_list()[1:])
  return tf.transpose(full, np.argsort(perm))


def scatter(value: tf.Tensor, owner, support: list,
            shape: tf.TensorShape) -> tf.Tensor:
  """The inverse of `gather`: `value` placed in zeros of `shape`."""
  if owner is None:
    return value
  in_index, out_index = owner
  if in_index is not None:
    axis = _in_axis(owner)
    value = _scatter_axis(value, support[in_index], axis, shape[axis])
  if out_index is not None:
    value = _scatter_axis(value, support[out_index], -1, shape[-1])
  return value


def choose_support(rates: list, kept: tuple) -> list:
  """Per gated layer, the k channels of highest rate, ascending (ties: lower
  index first)."""
  return [tf.sort(tf.math.top_k(r, k).indices) for r, k in zip(rates, kept)]


class ServerSupportFactory(tff.aggregators.WeightedAggregationFactory):
  """Aggregates `OrderedDict(update=W, mask=W, ...)` into a `W` on a support.

  `mean_factory`: the unweighted mean of the records `OrderedDict(values=
  [support values], rates=[channel masks * rate_weight])` (no `rates` for a
  dense model). `value_bits`: what one record coordinate costs on the wire
  (32, or a secure sum's width).
  """

  def __init__(self, layout: SupportLayout,
               mean_factory: tff.aggregators.UnweightedAggregationFactory,
               rate_weight: float = 1.0, value_bits: int = 32,
               clients_per_round: int = 0):
    self._layout = layout
    self._mean_factory = mean_factory
    self._rate_weight = float(rate_weight)
    self._value_bits = int(value_bits)
    self._rows = int(clients_per_round)

  def record_coordinates(self, specs) -> int:
    layout = self._layout
    values = sum(math.prod(layout.support_shape(s.shape, o))
                 for s, o in zip(tf.nest.flatten(specs), layout.owners))
    return values + sum(layout.channels)

  def create(self, value_type, weight_type) -> tff.templates.AggregationProcess:
    layout = self._layout
    specs = tff.types.type_to_tf_tensor_specs(value_type['update'])
    flat_specs = tf.nest.flatten(specs)
    if len(flat_specs) != len(layout.owners):
      raise ValueError(f'the support layout has {len(layout.owners)} tensors,'
                       f' the update {len(flat_specs)}')
    coordinates = self.record_coordinates(specs)
    upload_bytes = np.int64(math.ceil(coordinates * self._value_bits / 8))
    rate_spec = [tf.TensorSpec([c], tf.float32) for c in layout.channels]
    support_spec = [tf.TensorSpec([k], tf.int32) for k in layout.kept]
    rate_weight = self._rate_weight
    rate_tensors = [layout.rate_tensor(l, flat_specs)
                    for l in range(len(layout.channels))]

    @tff.tensorflow.computation(value_type, weight_type, support_spec)
    def project(value, weight, support):
      keep = tf.cast(weight > 0, tf.float32)
      record = collections.OrderedDict(values=[
          keep * gather(t, o, support) for t, o in zip(
              tf.nest.flatten(value['update']), layout.owners)])
      if layout.channels:
        masks = tf.nest.flatten(value['mask'])
        record['rates'] = [keep * rate_weight * masks[i] for i in rate_tensors]
      sizes = aggregation.with_slot(collections.OrderedDict(
          upload_bytes=tf.constant(upload_bytes),
          kept_coordinates=tf.constant(coordinates, tf.int64)), value)
      return record, sizes

    inner = self._mean_factory.create(project.type_signature.result[0])
    record_type = inner.next.type_signature.result.result.member

    @tff.tensorflow.computation(record_type, support_spec)
    def unproject(mean, support):
      return tf.nest.pack_sequence_as(specs, [
          scatter(v, o, support, s.shape) for v, o, s in zip(
              mean['values'], layout.owners, flat_specs)])

    @tff.tensorflow.computation(rate_spec)
    def choose(rates):
      return choose_support(rates, layout.kept)

    @tff.tensorflow.computation(rate_spec, record_type)
    def blend(rates, mean):
      return [RATE_DECAY * r + (1 - RATE_DECAY) * m / rate_weight
              for r, m in zip(rates, mean.get('rates', []))]

    @tff.tensorflow.computation
    def no_rates():
      return [tf.zeros([c], tf.float32) for c in layout.channels]

    @tff.federated_computation
    def init_fn():
      return tff.federated_zip(collections.OrderedDict(
          mean=inner.initialize(),
          rates=tff.federated_eval(no_rates, tff.SERVER)))

    @tff.federated_computation(
        init_fn.type_signature.result,
        tff.FederatedType(value_type, tff.CLIENTS),
        tff.FederatedType(weight_type, tff.CLIENTS),
    )
    def next_fn(state, value, weight):
      support = tff.federated_map(choose, state['rates'])
      record, sizes = tff.federated_map(
          project, (value, weight, tff.federated_broadcast(support)))
      output = inner.next(state['mean'], record)
      measurements = aggregation.size_measurements(
          sizes, sum(s.shape.num_elements() for s in flat_specs), self._rows)
      measurements['mean'] = output.measurements
      new_state = collections.OrderedDict(
          mean=output.state,
          rates=tff.federated_map(blend, (state['rates'], output.result)))
      return tff.templates.MeasuredProcessOutput(
          tff.federated_zip(new_state),
          tff.federated_map(unproject, (output.result, support)),
          tff.federated_zip(measurements))

    return tff.templates.AggregationProcess(init_fn, next_fn)
