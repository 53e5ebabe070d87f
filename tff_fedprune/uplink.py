"""A client's upload: its masked tensors as they cross the wire, and their size.

docs/design.md, section 3. `Uplink` is the one place where a client's
values are encoded (`encoding.TensorCodec` per tensor: sparse positions,
values in an `encoding.ValueFormat`) and where their bytes are counted.
The aggregator encodes each client's update with it and decodes inside
`federated_aggregate`; error feedback asks it what the server will decode
(`round_trip`); SCAFFOLD counts its control-variate upload with it. Tensor i
of a structure is rounded with the i-th seed derived from the client's
rounding seed, so a client's own round trip equals the server's decode.
"""

import collections
from typing import Optional

import tensorflow as tf
import tensorflow_federated as tff

from tff_fedprune import encoding

# A scalar sent beside an upload (FedNova's a_k) travels as one float32.
SCALAR_BYTES = 4


class Uplink:
  """Encodes structures of tensors shaped like `specs`.

  `values`: the `encoding.ValueFormat` of every tensor, or a list of one per
  tensor of `tf.nest.flatten(specs)` (`update_formats`).
  """

  def __init__(self, specs, values=encoding.ValueFormat()):
    flat_specs = tf.nest.flatten(specs)
    formats = (values if isinstance(values, (list, tuple))
               else [values] * len(flat_specs))
    if len(formats) != len(flat_specs):
      raise ValueError(f'{len(formats)} value formats for'
                       f' {len(flat_specs)} tensors')
    self.quantized = any(f.quantized for f in formats)
    self._specs = specs
    self._codecs = [
        encoding.TensorCodec(s.shape, f) for s, f in zip(flat_specs, formats)
    ]

  @property
  def coordinates(self) -> int:
    """Coordinates of one dense upload (the sum of the tensors' sizes)."""
    return sum(c.size for c in self._codecs)

  def _seeds(self, rounding_seed: Optional[tf.Tensor]) -> list:
    if self.quantized and rounding_seed is None:
      raise ValueError('quantised uploads need a rounding seed')
    return encoding.tensor_seeds(
        rounding_seed if self.quantized else None, len(self._codecs)
    )

  def encode(self, values, masks, rounding_seed=None) -> list:
    """The encoded form of `values` on `masks` (the message sent)."""
    return [
        codec.encode(v, m, seed)
        for codec, v, m, seed in zip(
            self._codecs, tf.nest.flatten(values), tf.nest.flatten(masks),
            self._seeds(rounding_seed),
        )
    ]

  def decode(self, encoded: list) -> tuple[list, list]:
    """(values, masks), flat, as the server recovers them."""
    decoded = [codec.decode(e) for codec, e in zip(self._codecs, encoded)]
    return [v for v, _ in decoded], [m for _, m in decoded]

  def round_trip(self, values, masks, rounding_seed=None):
    """What the server decodes of `values * masks`, shaped like `values`."""
    sent, _ = self.decode(self.encode(values, masks, rounding_seed))
    return tf.nest.pack_sequence_as(values, sent)

  @staticmethod
  def encoded_bytes(encoded: list) -> tf.Tensor:
    """The exact size in bytes of an `encode` result (int64)."""
    return tf.add_n([encoding.encoded_bytes(e) for e in encoded])

  def upload_bytes(self, values, masks, rounding_seed=None) -> tf.Tensor:
    """Bytes that sending `values` on `masks` costs."""
    return self.encoded_bytes(self.encode(values, masks, rounding_seed))

  @staticmethod
  def update_formats(update_type: tff.types.StructType,
                     values: encoding.ValueFormat) -> list:
    """One format per tensor of a model update (`ModelWeights`-typed).

    The trainable weights travel in `values`; the moving statistics (the
    non-trainable part) in `values.for_statistics()`.
    """
    names = tff.structure.name_list(update_type)
    if names != ['trainable', 'non_trainable']:
      raise ValueError(f'a model update has trainable and non_trainable'
                       f' parts, got {names}')
    count = lambda part: len(tf.nest.flatten(
        tff.types.type_to_tf_tensor_specs(update_type[part])))
    return ([values] * count('trainable')
            + [values.for_statistics()] * count('non_trainable'))

  def message(self, values, masks, rounding_seed, weight):
    """(message, sizes) of a weighted upload, for `federated_aggregate`."""
    encoded = self.encode(values, masks, rounding_seed)
    kept = tf.add_n([
        tf.cast(tf.reduce_sum(m), tf.int64) for m in tf.nest.flatten(masks)
    ])
    sizes = collections.OrderedDict(
        upload_bytes=self.encoded_bytes(encoded), kept_coordinates=kept
    )
    return collections.OrderedDict(encoded=encoded, weight=weight), sizes
