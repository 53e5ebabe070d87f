"""Channel-structured masks over a model's global weights.

docs/design.md, section 2.

Each global weight is owned by the channels that gate it: a gated layer's
kernel entry (.., i, j) by input channel i (when a gated layer feeds it) and
output channel j; its BN scale, shift and moving statistics by output channel
j; a dense layer's kernel row i by input channel i when a gated layer feeds
it channel for channel (a classifier after global pooling: the columns a
client's data never reached are not its to send, as in HeteroFL's
sub-models); gate parameters, biases and anything ungated by nobody (always
kept). `ChannelStructure.masks` turns one 0/1 vector per gated layer into a
`ModelWeights` of masks shaped like the global weights.
"""

import tensorflow as tf
import tensorflow_federated as tff

from tff_fedprune import gated_conv
from tff_fedprune import model_state

# Plain graph code, called from tf.functions: AutoGraph need not convert it
# (converting these bound methods failed now and then in long test runs,
# calling them without `self`).
_NOT_CONVERTED = tf.autograph.experimental.do_not_convert
_PER_OUTPUT_CHANNEL = ('gamma', 'beta', 'moving_mean', 'moving_variance')


class ChannelStructure:
  """Which gated channels own each global weight of a Keras model."""

  def __init__(self, model: tf.keras.Model):
    self._gated = gated_conv.gated_layers(model)
    position = {id(l): i for i, l in enumerate(self._gated)}
    owners = {}
    for layer in self._gated:
      feeder = gated_conv.feeding_gate(layer)
      in_index = position[id(feeder)] if feeder is not None else None
      owners[layer.kernel.ref()] = (in_index, position[id(layer)])
      for name in _PER_OUTPUT_CHANNEL:
        owners[getattr(layer, name).ref()] = (None, position[id(layer)])
    for layer in model.layers:
      if isinstance(layer, tf.keras.layers.Dense):
        feeder = gated_conv.feeding_gate(layer)
        if feeder is not None:
          owners[layer.kernel.ref()] = (position[id(feeder)], None)
    weights = model_state.global_weights(model)
    self._owners = tf.nest.map_structure(
        lambda v: owners.get(v.ref()), weights
    )
    self._shapes = tf.nest.map_structure(lambda v: v.shape, weights)

  @property
  def channels(self) -> list[int]:
    """Output channels C of each gated layer, in order."""
    return [l.filters for l in self._gated]

  @property
  def owners(self) -> list:
    """(in_index, out_index) or None of each tensor of the flat weights."""
    return list(self._owners.trainable) + list(self._owners.non_trainable)

  @_NOT_CONVERTED
  def masks(self, channel_masks) -> tff.learning.models.ModelWeights:
    """Weight masks from one (C_out,) 0/1 float vector per gated layer."""

    def mask(owner, shape):
      if owner is None:
        return tf.ones(shape, tf.float32)
      in_index, out_index = owner
      if out_index is None:
        return tf.broadcast_to(channel_masks[in_index][:, tf.newaxis], shape)
      out = channel_masks[out_index]
      if len(shape) == 1:
        return out
      m = tf.broadcast_to(out, shape)
      if in_index is not None:
        m = m * channel_masks[in_index][:, tf.newaxis]
      return m

    return tff.learning.models.ModelWeights(
        tuple(mask(o, s) for o, s in zip(self._owners.trainable,
                                         self._shapes.trainable)),
        tuple(mask(o, s) for o, s in zip(self._owners.non_trainable,
                                         self._shapes.non_trainable)),
    )

  @_NOT_CONVERTED
  def restrict(self, channel_masks, values):
    """`values` (trainable-shaped) times their masks, without building them.

    Each value is multiplied by its owners' channel vectors by broadcasting,
    so no full-shape mask is materialised: `restrict(c, v)` equals
    `masks(c).trainable * v`.
    """

    def apply(owner, value):
      if owner is None:
        return value
      in_index, out_index = owner
      if out_index is not None:
        value = value * channel_masks[out_index]
      if in_index is not None and len(value.shape) > 1:
        value = value * channel_masks[in_index][:, tf.newaxis]
      return value

    return tuple(apply(o, v) for o, v in zip(self._owners.trainable, values))

  @_NOT_CONVERTED
  def touched(self, values):
    """`values` restricted to the channels kept at least once this round."""
    return self.restrict(self.salient_channels(0.0), values)

  @_NOT_CONVERTED
  def salient_channels(self, threshold: float):
    """Per gated layer, 1.0 where count / samples > threshold, from counters."""
    return [
        tf.cast(
            l.kept_count / tf.maximum(l.samples_seen, 1.0) > threshold,
            tf.float32,
        )
        for l in self._gated
    ]

  @_NOT_CONVERTED
  def salience_masks(self, threshold: float) -> tff.learning.models.ModelWeights:
    """Masks of the weights whose channels were salient this round."""
    return self.masks(self.salient_channels(threshold))
