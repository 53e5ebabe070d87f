"""Model zoo: architectures only, each with a dense and a gated variant.

`BUILDERS` maps each name to `(input_shape=, num_classes=, gate=) ->
tf.keras.Model`, `gate` a `tff_fedprune.gated_conv.GateSpec` (None: the
dense model); the gated layer is `tff_fedprune.gated_conv.GatedConv2D`.
"""

import functools

from keras_models.cnn import build_cnn
from keras_models.resnet import build_resnet
from keras_models.vgg import build_vgg11

BUILDERS = {
    'cnn': build_cnn,
    'resnet20': functools.partial(build_resnet, 20),
    'resnet32': functools.partial(build_resnet, 32),
    'resnet56': functools.partial(build_resnet, 56),
    'vgg11': build_vgg11,
}
MODELS = tuple(BUILDERS)


def build_model(name: str, input_shape, num_classes: int, gate=None):
  """Builds `name` (one of `MODELS`) gated by `gate` (None: dense)."""
  if name not in BUILDERS:
    raise ValueError(f'unknown model {name!r}; choose from {MODELS}')
  return BUILDERS[name](
      input_shape=input_shape, num_classes=num_classes, gate=gate
  )
