"""A small CNN for 28x28x1 (Fashion-MNIST) and 8x8x1 (digits) inputs."""

from typing import Optional

import tensorflow as tf

from tff_fedprune.gated_conv import GatedConv2D
from tff_fedprune.gated_conv import GateSpec

CNN_FILTERS = (16, 32, 64)


def build_cnn(
    input_shape=(28, 28, 1),
    num_classes: int = 10,
    gate: Optional[GateSpec] = None,
    filters=CNN_FILTERS,
) -> tf.keras.Model:
  """conv-BN-ReLU blocks with 2x2 max-pooling between them, GAP, linear head.

  Returns logits. `gate` None is the dense model; without `gate.stem` the
  first block is not gated.
  """
  inputs = tf.keras.Input(input_shape, name='images')
  x = inputs
  for i, f in enumerate(filters):
    if i:
      x = tf.keras.layers.MaxPool2D(padding='same', name=f'pool{i}')(x)
    stem = i == 0 and gate is not None and not gate.stem
    x = GatedConv2D(f, gate=None if stem else gate, name=f'block{i + 1}')(x)
  x = tf.keras.layers.GlobalAveragePooling2D(name='gap')(x)
  outputs = tf.keras.layers.Dense(num_classes, name='logits')(x)
  return tf.keras.Model(inputs, outputs, name='cnn')
