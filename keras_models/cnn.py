"""A small CNN for 28x28x1 (Fashion-MNIST) and 8x8x1 (digits) inputs."""

import tensorflow as tf

from tff_fedprune.gated_conv import GatedConv2D

CNN_FILTERS = (16, 32, 64)


def build_cnn(
    input_shape=(28, 28, 1),
    num_classes: int = 10,
    gated: bool = False,
    keep_ratio: float = 1.0,
    filters=CNN_FILTERS,
    gate_input: str = 'sigmoid',
    gated_bn: str = 'masked',
    gate_selection: str = 'saliency',
    gate_balance: float = 0.0,
    gate_stem: bool = True,
) -> tf.keras.Model:
  """conv-BN-ReLU blocks with 2x2 max-pooling between them, GAP, linear head.

  Returns logits. With `gate_stem=False` the first block is not gated.
  """
  inputs = tf.keras.Input(input_shape, name='images')
  x = inputs
  for i, f in enumerate(filters):
    if i:
      x = tf.keras.layers.MaxPool2D(padding='same', name=f'pool{i}')(x)
    x = GatedConv2D(f, gated=gated and (gate_stem or i > 0),
                    keep_ratio=keep_ratio, gate_input=gate_input,
                    gated_bn=gated_bn, gate_selection=gate_selection,
                    gate_balance=gate_balance,
                    name=f'block{i + 1}')(x)
  x = tf.keras.layers.GlobalAveragePooling2D(name='gap')(x)
  outputs = tf.keras.layers.Dense(num_classes, name='logits')(x)
  return tf.keras.Model(inputs, outputs, name='cnn')
