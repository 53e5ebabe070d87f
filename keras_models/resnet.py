"""CIFAR ResNets (He et al. 2016, section 4.2): 6n+2 layers, 16/32/64 channels.

Shortcuts are option A (identity; stride-2 subsampling with zero-padded
channels), so ResNet-32 has about 0.46M parameters as in the paper. Every
convolution is a `GatedConv2D`; the second of each basic block has no ReLU of
its own: the ReLU follows the residual addition.
"""

from typing import Optional

import tensorflow as tf

from tff_fedprune.gated_conv import GatedConv2D
from tff_fedprune.gated_conv import GateSpec

STAGE_FILTERS = (16, 32, 64)


@tf.keras.utils.register_keras_serializable(package='keras_models')
class ZeroPadShortcut(tf.keras.layers.Layer):
  """Option-A shortcut: subsample by `stride`, zero-pad channels to `filters`."""

  def __init__(self, filters: int, stride: int, **kwargs):
    super().__init__(**kwargs)
    self.filters = int(filters)
    self.stride = int(stride)

  def call(self, x):
    pad = self.filters - x.shape[-1]
    x = x[:, ::self.stride, ::self.stride, :]
    return tf.pad(x, [[0, 0], [0, 0], [0, 0], [pad // 2, pad - pad // 2]])

  def get_config(self):
    return dict(super().get_config(), filters=self.filters, stride=self.stride)


def _shortcut(x, filters, stride, name):
  if stride == 1 and x.shape[-1] == filters:
    return x
  return ZeroPadShortcut(filters, stride, name=f'{name}_shortcut')(x)


def build_resnet(
    depth: int = 32,
    input_shape=(32, 32, 3),
    num_classes: int = 10,
    gate: Optional[GateSpec] = None,
) -> tf.keras.Model:
  """ResNet-`depth` (20, 32, 56, ...: depth = 6n + 2) returning logits.

  `gate` None is the dense model; without `gate.stem` the first
  convolution is not gated (the authors' ResNet).
  """
  if (depth - 2) % 6:
    raise ValueError(f'CIFAR ResNet depth must be 6n + 2, got {depth}')
  blocks = (depth - 2) // 6
  inputs = tf.keras.Input(input_shape, name='images')
  stem_gate = gate if gate is not None and gate.stem else None
  x = GatedConv2D(STAGE_FILTERS[0], gate=stem_gate, name='stem')(inputs)
  for stage, filters in enumerate(STAGE_FILTERS):
    for block in range(blocks):
      stride = 2 if stage and not block else 1
      name = f'stage{stage + 1}_block{block + 1}'
      shortcut = _shortcut(x, filters, stride, name)
      y = GatedConv2D(filters, strides=stride, gate=gate,
                      name=f'{name}_conv1')(x)
      y = GatedConv2D(filters, relu=False, gate=gate,
                      name=f'{name}_conv2')(y)
      x = tf.keras.layers.Add(name=f'{name}_add')([y, shortcut])
      x = tf.keras.layers.ReLU(name=f'{name}_relu')(x)
  x = tf.keras.layers.GlobalAveragePooling2D(name='gap')(x)
  outputs = tf.keras.layers.Dense(num_classes, name='logits')(x)
  return tf.keras.Model(inputs, outputs, name=f'resnet{depth}')
