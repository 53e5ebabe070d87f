"""Secure-aggregation-ready sums: float records as bounded integers.

docs/design.md, section 8. Secure aggregation sums integers modulo a
power of two, so every client maps each coordinate of its record (on the
server-chosen support, the same positions for all) into [0, 2^b - 1] with
the same bound B: clamp to [-B, B], then unbiased stochastic rounding to
one of 2^b levels (per-client min/max would not commute with the sum). The
levels go through TFF's `tff.aggregators.SecureSumFactory`; the server
undoes the offset with the number of clients. Under DP, B is the clip S, so
clamping changes nothing a clipped record holds.

TFF's simulation computes the secure sum in the clear
(`tff.backends.test.replace_secure_intrinsics_with_bodies`, installed by
`runtime.contexts`); a deployment needs a secure-aggregation protocol
(SecAgg/SecAgg+: pairwise masks, dropout recovery) at the width
`secure_bits` gives.
"""

import math

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

_ROUNDING_STREAM = 0x5353


def secure_bits(bits: int, max_clients: int) -> int:
  """Bits per coordinate of a modular sum of `max_clients` b-bit levels."""
  return math.ceil(math.log2(max(max_clients, 1) * (2**bits - 1) + 1))


def _rounding_seed(flat: list) -> tf.Tensor:
  """A seed that is a function of the record (reproducible, per client)."""
  words = tf.concat([tf.reshape(tf.bitcast(v, tf.int32), [-1]) for v in flat],
                    0)
  return tf.stack([tf.reduce_sum(tf.cast(words, tf.int64)),
                   tf.constant(_ROUNDING_STREAM, tf.int64)])


class QuantizedSecureSumFactory(tff.aggregators.UnweightedAggregationFactory):
  """Sums float32 records in [-bound, bound] through TFF's secure sum."""

  def __init__(self, bits: int, bound: float):
    if not 1 <= bits <= 16:
      raise ValueError(f'a secure sum takes 1 to 16 bits, got {bits}')
    if not bound > 0:
      raise ValueError(f'the secure sum bound must be positive, got {bound}')
    self._levels = 2**bits - 1
    self._bound = float(bound)

  def create(self, value_type) -> tff.templates.AggregationProcess:
    specs = tff.types.type_to_tf_tensor_specs(value_type)
    levels, bound = self._levels, self._bound
    step = 2 * bound / levels

    @tff.tensorflow.computation(value_type)
    def quantize(value):
      flat = tf.nest.flatten(value)
      seeds = tf.random.experimental.stateless_split(
          _rounding_seed(flat), len(flat))
      out = []
      for i, v in enumerate(flat):
        scaled = (tf.clip_by_value(v, -bound, bound) + bound) / step
        noise = tf.random.stateless_uniform(tf.shape(v), seeds[i])
        out.append(tf.cast(tf.clip_by_value(tf.floor(scaled + noise), 0,
                                            levels), tf.int32))
      return tf.nest.pack_sequence_as(value, out)

    inner = tff.aggregators.SecureSumFactory(
        upper_bound_threshold=levels, lower_bound_threshold=0
    ).create(quantize.type_signature.result)

    @tff.tensorflow.computation(inner.next.type_signature.result.result.member,
                                np.int32)
    def dequantize(total, clients):
      offset = tf.cast(clients, tf.float32) * bound
      return tf.nest.pack_sequence_as(specs, [
          tf.cast(t, tf.float32) * step - offset
          for t in tf.nest.flatten(total)])

    @tff.federated_computation(
        inner.initialize.type_signature.result,
        tff.FederatedType(value_type, tff.CLIENTS))
    def next_fn(state, value):
      output = inner.next(state, tff.federated_map(quantize, value))
      clients = tff.federated_sum(tff.federated_value(np.int32(1),
                                                      tff.CLIENTS))
      return tff.templates.MeasuredProcessOutput(
          output.state,
          tff.federated_map(dequantize, (output.result, clients)),
          output.measurements)

    return tff.templates.AggregationProcess(inner.initialize, next_fn)
