"""A small CNN for 28x28x1 (Fashion-MNIST) and 8x8x1 (digits) inputs."""

import tensorflow as tf

CNN_FILTERS = (16, 32, 64)


def conv_bn_relu(x, filters: int, name: str):
  """The dense (ungated) conv-BN-ReLU block."""
  x = tf.keras.layers.Conv2D(
      filters, 3, padding='same', use_bias=False, name=f'{name}_conv',
      kernel_initializer='he_normal',
  )(x)
  x = tf.keras.layers.BatchNormalization(name=f'{name}_bn')(x)
  return tf.keras.layers.ReLU(name=f'{name}_relu')(x)


def build_cnn(
    input_shape=(28, 28, 1),
    num_classes: int = 10,
    filters=CNN_FILTERS,
) -> tf.keras.Model:
  """conv-BN-ReLU blocks with 2x2 max-pooling between them, GAP, linear head.

  Returns logits.
  """
  inputs = tf.keras.Input(input_shape, name='images')
  x = inputs
  for i, f in enumerate(filters):
    if i:
      x = tf.keras.layers.MaxPool2D(name=f'pool{i}')(x)
    x = conv_bn_relu(x, f, name=f'block{i + 1}')
  x = tf.keras.layers.GlobalAveragePooling2D(name='gap')(x)
  outputs = tf.keras.layers.Dense(num_classes, name='logits')(x)
  return tf.keras.Model(inputs, outputs, name='cnn')
