"""Model zoo: architectures only, each with a dense variant."""

from keras_models.cnn import build_cnn

MODELS = ('cnn',)


def build_model(name: str, input_shape, num_classes: int, **kwargs):
  """Builds the architecture `name` (one of `MODELS`)."""
  if name == 'cnn':
    return build_cnn(input_shape, num_classes, **kwargs)
  raise ValueError(f'unknown model {name!r}; choose from {MODELS}')
