"""Per-client values at the server, by the client's slot in the round.

TFF aggregates client values; to see one client's value at the server, each
client sends `OrderedDict(slot=i, change=v)` and `sum_into_slots` scatters v
into row i of a `rows`-row table (`federated_aggregate`). The driver knows
which client it put in each slot (`simulation.stateful_process`). Per-client
state (SCAFFOLD's c_k) comes back this way, and so do the per-client costs
of `clients.csv`.
"""

import tensorflow as tf
import tensorflow_federated as tff


def table_spec(spec, rows: int):
  """The spec of a `rows`-row table of values of `spec` (a structure)."""
  return tf.nest.map_structure(
      lambda s: tf.TensorSpec([rows] + s.shape.as_list(), s.dtype), spec)


def zeros(spec):
  return tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), spec)


def sum_into_slots(values, spec):
  """Sums the clients' `OrderedDict(slot, change)` into a table of `spec`."""

  @tff.tensorflow.computation
  def zero():
    return zeros(spec)

  @tff.tensorflow.computation(
      zero.type_signature.result, values.type_signature.member
  )
  def accumulate(table, value):
    index = tf.reshape(value['slot'], [1, 1])
    return tf.nest.map_structure(
        lambda t, c: tf.tensor_scatter_nd_add(t, index, c[tf.newaxis]),
        table, value['change'], check_types=False,
    )

  @tff.tensorflow.computation(
      zero.type_signature.result, zero.type_signature.result
  )
  def merge(a, b):
    return tf.nest.map_structure(tf.add, a, b)

  @tff.tensorflow.computation(zero.type_signature.result)
  def report(table):
    return table

  return tff.federated_aggregate(values, zero(), accumulate, merge, report)
