"""VGG-11 with batch normalisation for 32x32 (and 28x28) images."""

from typing import Optional

import tensorflow as tf

from tff_fedprune.gated_conv import GatedConv2D
from tff_fedprune.gated_conv import GateSpec

VGG11 = (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M')


def build_vgg11(
    input_shape=(32, 32, 3),
    num_classes: int = 10,
    gate: Optional[GateSpec] = None,
) -> tf.keras.Model:
  """VGG-11 features (every conv a `GatedConv2D`), then a 512-512 MLP head.

  `gate` None is the dense model; without `gate.stem` the first
  convolution is not gated.
  """
  inputs = tf.keras.Input(input_shape, name='images')
  x = inputs
  conv = pool = 0
  for item in VGG11:
    if item == 'M':
      pool += 1
      x = tf.keras.layers.MaxPool2D(padding='same', name=f'pool{pool}')(x)
    else:
      conv += 1
      stem = conv == 1 and gate is not None and not gate.stem
      x = GatedConv2D(item, gate=None if stem else gate,
                      name=f'conv{conv}')(x)
  x = tf.keras.layers.Flatten(name='flatten')(x)
  x = tf.keras.layers.Dense(512, activation='relu', name='fc1')(x)
  x = tf.keras.layers.Dense(512, activation='relu', name='fc2')(x)
  outputs = tf.keras.layers.Dense(num_classes, name='logits')(x)
  return tf.keras.Model(inputs, outputs, name='vgg11')
