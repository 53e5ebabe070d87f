"""Mean of masked, sparsely encoded client updates.

docs/design.md, section 3.

Per coordinate i over the round's clients k with weights n_k and masks M_k,
the count-aware mean (the default) is

    mean_i = sum_k n_k M_ki delta_ki / sum_k n_k M_ki   (0 where no client sent i)

The plain weighted mean of the authors' code (`aggregation='fedavg'`),

    mean_i = sum_k n_k M_ki delta_ki / sum_k n_k,

counts a client that did not send coordinate i as a zero change, shrinking
the coordinate by the share of clients that did not send it; it is kept for
ablations. Clients encode their update with `uplink.Uplink`
(the mask travels with it; with quantised `values` the rounding and any
rotation are seeded by the value's `rounding_seed`, derived from (run seed,
round, client)); the server decodes inside `federated_aggregate`,
so the measured upload is what crossed the wire. A client whose weight is 0
(a non-finite update, zeroed by the client work) contributes nothing.
"""

import collections
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_fedprune import client_work as client_work_lib
from tff_fedprune import encoding
from tff_fedprune import slots
from tff_fedprune import uplink as uplink_lib


AGGREGATIONS = ('count_aware', 'fedavg')


class MaskedMeanFactory(tff.aggregators.WeightedAggregationFactory):
  """Aggregates `OrderedDict(update=W, mask=W)` into a `W`.

  By default each client's upload is sparse and encoded (`uplink.Uplink`)
  and the server sums the decoded values inside `federated_aggregate`. With
  `sum_factory` (a `tff.aggregators.UnweightedAggregationFactory`: TFF's
  `SumFactory`, `SecureSumFactory` or `DifferentiallyPrivateFactory`, ...)
  each client instead hands it the dense pair `OrderedDict(numerator=n_k M_k
  delta_k, denominator=n_k M_k)` (float32, counted as upload), and the mean
  is numerator / denominator of what it returns; a factory that scales both
  alike (a DP mean over the expected clients) leaves the mean unchanged.
  """

  def __init__(
      self,
      aggregation: str = 'count_aware',
      values: encoding.ValueFormat = encoding.ValueFormat(),
      sum_factory: Optional[
          tff.aggregators.UnweightedAggregationFactory] = None,
      clients_per_round: int = 0,
      deadline_s: Optional[float] = None,
  ):
    """`clients_per_round` >= 1 with a `slot` in the client value: also
    measures each slot's upload bytes (`CLIENT_UPLOAD_BYTES`).

    `deadline_s`: the simulated round deadline. A client whose value's
    `client_work.DEVICE_TIME` with its encoded upload exceeds it is late:
    its weight becomes 0 (the server stopped waiting; its bytes still
    count as sent) and it counts in `clients_late`.
    """
    if aggregation not in AGGREGATIONS:
      raise ValueError(
          f'unknown aggregation {aggregation!r}; choose from {AGGREGATIONS}'
      )
    if sum_factory is not None and values.quantized:
      raise ValueError('a sum_factory aggregates dense float32 values:'
                       ' upload_bits must be 32')
    self._count_aware = aggregation == 'count_aware'
    self._values = values
    self._bits = values.bits
    self._sum_factory = sum_factory
    self._rows = int(clients_per_round)
    if deadline_s is not None and sum_factory is not None:
      raise ValueError('a round deadline needs the sparse upload, not a'
                       ' sum_factory')
    self._deadline_s = deadline_s

  def create(
      self,
      value_type: tff.types.StructType,
      weight_type: tff.types.TensorType,
  ) -> tff.templates.AggregationProcess:
    if self._sum_factory is not None:
      return _mean_over_sums(self._sum_factory, self._count_aware,
                             value_type, weight_type, self._rows)
    specs = tff.types.type_to_tf_tensor_specs(value_type['update'])
    spec_list = tf.nest.flatten(specs)
    uplink = uplink_lib.Uplink(specs, uplink_lib.Uplink.update_formats(
        value_type['update'], self._values))
    if (self._bits < 32
        and 'rounding_seed' not in tff.structure.name_list(value_type)):
      raise ValueError(
          f'{self._bits}-bit uploads need a rounding_seed in the client value'
      )

    @tff.tensorflow.computation(value_type, weight_type)
    def encode(value, weight):
      seed = value['rounding_seed'] if self._bits < 32 else None
      message, sizes = uplink.message(value['update'], value['mask'], seed,
                                      weight)
      sizes = with_slot(sizes, value)
      if self._deadline_s is not None:
        before_upload, per_byte = tf.unstack(
            value[client_work_lib.DEVICE_TIME])
        late = before_upload + tf.cast(sizes['upload_bytes'],
                                       tf.float64) * per_byte > self._deadline_s
        message['weight'] = tf.where(late, tf.zeros_like(weight), weight)
        sizes['clients_late'] = tf.cast(late, tf.int32)
      return message, sizes

    def zeros():
      return [tf.zeros(s.shape, s.dtype) for s in spec_list]

    @tff.tensorflow.computation
    def zero():
      return collections.OrderedDict(
          numerator=zeros(), denominator=zeros()
      )

    message_type = encode.type_signature.result[0]
    accumulator_type = zero.type_signature.result

    @tff.tensorflow.computation(accumulator_type, message_type)
    def accumulate(accumulator, message):
      weight = tf.cast(message['weight'], tf.float32)
      numerator, denominator = [], []
      updates, masks = uplink.decode(message['encoded'])
      for update, mask, num, den in zip(
          updates, masks, accumulator['numerator'], accumulator['denominator']
      ):
        numerator.append(num + weight * update)
        sent = mask if self._count_aware else tf.ones_like(mask)
        denominator.append(den + weight * sent)
      return collections.OrderedDict(
          numerator=numerator, denominator=denominator
      )

    @tff.tensorflow.computation(accumulator_type, accumulator_type)
    def merge(a, b):
      return tf.nest.map_structure(tf.add, a, b)

    @tff.tensorflow.computation(accumulator_type)
    def report(accumulator):
      return tf.nest.pack_sequence_as(
          specs,
          [
              tf.math.divide_no_nan(n, d)
              for n, d in zip(
                  accumulator['numerator'], accumulator['denominator']
              )
          ],
      )

    @tff.federated_computation
    def init_fn():
      return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(
        init_fn.type_signature.result,
        tff.FederatedType(value_type, tff.CLIENTS),
        tff.FederatedType(weight_type, tff.CLIENTS),
    )
    def next_fn(state, value, weight):
      message, sizes = tff.federated_map(encode, (value, weight))
      mean = tff.federated_aggregate(message, zero(), accumulate, merge, report)
      measurements = tff.federated_zip(size_measurements(
          sizes, uplink.coordinates, self._rows))
      return tff.templates.MeasuredProcessOutput(state, mean, measurements)

    return tff.templates.AggregationProcess(init_fn, next_fn)


CLIENT_UPLOAD_BYTES = 'client_upload_bytes'


def with_slot(sizes, value) -> collections.OrderedDict:
  sizes = collections.OrderedDict(sizes)
  if 'slot' in value:
    sizes['slot'] = value['slot']
  return sizes


def size_measurements(sizes, coordinates: int, rows: int):
  """Upload bytes and kept coordinates: summed, and per slot if `rows`."""
  measurements = collections.OrderedDict(
      upload_bytes=tff.federated_sum(sizes['upload_bytes']),
      kept_coordinates=tff.federated_sum(sizes['kept_coordinates']),
      coordinates_per_client=tff.federated_value(np.int64(coordinates),
                                                 tff.SERVER),
  )
  if 'clients_late' in tff.structure.name_list(sizes.type_signature.member):
    measurements['clients_late'] = tff.federated_sum(sizes['clients_late'])
  if rows and 'slot' in tff.structure.name_list(sizes.type_signature.member):
    measurements[CLIENT_UPLOAD_BYTES] = slots.sum_into_slots(
        tff.federated_zip(collections.OrderedDict(
            slot=sizes['slot'], change=sizes['upload_bytes'])),
        slots.table_spec(tf.TensorSpec([], tf.int64), rows))
  return measurements


def _mean_over_sums(sum_factory, count_aware, value_type, weight_type, rows):
  """The masked mean of dense client pairs summed by `sum_factory`."""
  specs = tff.types.type_to_tf_tensor_specs(value_type['update'])

  @tff.tensorflow.computation(value_type, weight_type)
  def contribution(value, weight):
    weight = tf.cast(weight, tf.float32)
    sent = value['mask'] if count_aware else tf.nest.map_structure(
        tf.ones_like, value['mask'])
    pair = collections.OrderedDict(
        numerator=tf.nest.map_structure(
            lambda u, m: weight * u * m, value['update'], value['mask']),
        denominator=tf.nest.map_structure(lambda m: weight * m, sent),
    )
    kept = tf.add_n([tf.cast(tf.reduce_sum(m), tf.int64)
                     for m in tf.nest.flatten(value['mask'])])
    nbytes = tf.constant(
        sum(4 * t.shape.num_elements() for t in tf.nest.flatten(pair)),
        tf.int64)
    return pair, with_slot(collections.OrderedDict(
        upload_bytes=nbytes, kept_coordinates=kept), value)

  inner = sum_factory.create(contribution.type_signature.result[0])

  @tff.tensorflow.computation(inner.next.type_signature.result.result.member)
  def mean(total):
    return tf.nest.pack_sequence_as(specs, [
        tf.math.divide_no_nan(n, d) for n, d in zip(
            tf.nest.flatten(total['numerator']),
            tf.nest.flatten(total['denominator']))
    ])

  total = sum(s.shape.num_elements() for s in tf.nest.flatten(specs))

  @tff.federated_computation(
      inner.initialize.type_signature.result,
      tff.FederatedType(value_type, tff.CLIENTS),
      tff.FederatedType(weight_type, tff.CLIENTS),
  )
  def next_fn(state, value, weight):
    pair, sizes = tff.federated_map(contribution, (value, weight))
    output = inner.next(state, pair)
    measurements = size_measurements(sizes, total, rows)
    measurements['sum'] = output.measurements
    measurements = tff.federated_zip(measurements)
    return tff.templates.MeasuredProcessOutput(
        output.state, tff.federated_map(mean, output.result), measurements)

  return tff.templates.AggregationProcess(inner.initialize, next_fn)
