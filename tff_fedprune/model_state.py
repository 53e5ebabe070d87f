"""A model's global weights versus its client-local state.

The federation exchanges `global_weights`: every trainable weight and the BN
moving statistics. Each gated layer's keep ratio and channel counters are
client-local (`GatedConv2D.local_variables`): a client sets its own ratio and
counts its own channels, and neither is broadcast nor averaged.
"""

import tensorflow as tf
import tensorflow_federated as tff

from tff_fedprune import gated_conv


def local_variables(model: tf.keras.Model) -> list[tf.Variable]:
  return [
      v for layer in gated_conv.gated_layers(model)
      for v in layer.local_variables
  ]


def global_weights(model: tf.keras.Model) -> tff.learning.models.ModelWeights:
  """The weights a federation exchanges: all but client-local state."""
  local = {v.ref() for v in local_variables(model)}
  return tff.learning.models.ModelWeights(
      tuple(model.trainable_weights),
      tuple(v for v in model.non_trainable_weights if v.ref() not in local),
  )


def set_keep_ratio(model: tf.keras.Model, keep_ratio) -> None:
  """Sets rho of every gated layer (a float or a scalar tensor)."""
  for layer in gated_conv.gated_layers(model):
    layer.keep_ratio.assign(keep_ratio)


def reset_channel_counts(model: tf.keras.Model) -> None:
  for layer in gated_conv.gated_layers(model):
    layer.kept_count.assign(tf.zeros_like(layer.kept_count))
    layer.samples_seen.assign(0.0)


def assign_weights(
    model: tf.keras.Model, weights: tff.learning.models.ModelWeights
) -> None:
  """Assigns `global_weights`-shaped values to the model."""
  tf.nest.map_structure(
      lambda v, t: v.assign(t), global_weights(model), weights
  )


def weights_type_from_keras(model: tf.keras.Model) -> tff.types.StructType:
  """The `tff.learning.models.ModelWeights` type of a model's global weights."""
  return tff.types.tensorflow_to_type(
      tf.nest.map_structure(
          lambda v: tf.TensorSpec(v.shape, v.dtype), global_weights(model)
      )
  )
