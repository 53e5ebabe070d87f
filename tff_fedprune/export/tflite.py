"""TFLite export of gated models that really skip pruned channels.

docs/design.md, section 7.

`inference_function` rebuilds a trained Keras model as a batch-1 graph in
which every gated layer computes only its k = max(1, round(rho * C_out))
kept channels:

* the gate reads the input's global average pool (for an input that is itself
  compact, the pruned channels' pool is 0, so their subsample is sigmoid(0) =
  0.5 or 0 and their share of the gate's pre-activation is a constant folded
  at export);
* TOPK_V2 picks the kept output channels; GATHER takes their slices of the
  BN-folded kernel, and only the kept input rows when the input is compact;
* a convolution of k_in inputs and k_out outputs runs; its output stays
  compact (values and channel indices) through pooling and activations and is
  scattered to full width (a one-hot matmul) only where a full-width tensor
  is needed: residual additions, the classifier head, other layers.

Inputs are raw pixels (the dataset's own scale); the normalisation used in
training is part of the graph. With `dense=True` the same model is exported
without gates (every channel, constant weights): the baseline a phone would
otherwise run. `convert` produces a TFLite flatbuffer with builtin ops only
and the `serving_default` signature (input `images`, output `logits`).
"""

import dataclasses
import tempfile

import numpy as np
import tensorflow as tf

from tff_fedprune import gated_conv

SIGNATURE = 'serving_default'
QUANTIZATIONS = ('none', 'float16', 'dynamic_int8')


@dataclasses.dataclass(frozen=True)
class _Compact:
  """A channels-last tensor of which only `indices` (of `width`) are non-zero."""

  values: tf.Tensor
  indices: tf.Tensor
  width: int

  def full(self) -> tf.Tensor:
    shape = tf.shape(self.values)
    # (width, k) one-hot: a FULLY_CONNECTED with runtime weights, no transpose.
    scatter = tf.one_hot(self.indices, self.width, axis=0,
                         dtype=self.values.dtype)
    flat = tf.reshape(self.values, [-1, shape[-1]])
    full = tf.matmul(flat, scatter, transpose_b=True)
    return tf.reshape(full, tf.concat([shape[:-1], [self.width]], 0))


def _full(x):
  return x.full() if isinstance(x, _Compact) else x


class _FoldedConv:
  """A GatedConv2D's inference constants: BN folded into kernel and bias."""

  def __init__(self, layer: gated_conv.GatedConv2D):
    scale = layer.gamma.numpy() / np.sqrt(
        layer.moving_variance.numpy() + layer.epsilon
    )
    self.layer = layer
    self.kernel = (layer.kernel.numpy() * scale).astype(np.float32)
    # TFLite's convolutions take OHWI filters: gathering output channels is
    # then a gather of whole rows, and the final transpose to TF's HWIO
    # cancels the converter's own transpose back to OHWI.
    self.kernel_ohwi = np.ascontiguousarray(self.kernel.transpose(3, 0, 1, 2))
    self.bias = (layer.beta.numpy() - layer.moving_mean.numpy() * scale).astype(
        np.float32
    )
    if layer.gated:
      gate_kernel = layer.gate_kernel.numpy()
      self.gate_kernel = gate_kernel
      # (C_out, C_in), as FULLY_CONNECTED takes its weights.
      self.gate_kernel_t = np.ascontiguousarray(gate_kernel.T)
      self.gate_bias = layer.gate_bias.numpy()
      # Pruned inputs pool to 0 and score subsample(0): 0.5 or 0.
      self.zero_point = float(layer.subsample(tf.constant(0.0)))
      self.gate_pruned = (
          self.zero_point * gate_kernel.sum(axis=0) + self.gate_bias
      )

  def activate(self, x):
    return tf.nn.relu(x) if self.layer.relu else x

  def dense(self, x):
    y = tf.nn.conv2d(_full(x), self.kernel, self.layer.strides, 'SAME')
    return self.activate(y + self.bias)

  def gated(self, x, k: int) -> _Compact:
    if isinstance(x, _Compact):
      pooled = self.layer.subsample(
          tf.reduce_mean(x.values, axis=[1, 2])) - self.zero_point
      pre = self.gate_pruned + tf.matmul(
          pooled, tf.gather(self.gate_kernel_t, x.indices, axis=1),
          transpose_b=True,
      )
      inputs = x.values
    else:
      pooled = self.layer.subsample(tf.reduce_mean(x, axis=[1, 2]))
      pre = tf.matmul(pooled, self.gate_kernel) + self.gate_bias
      inputs = x
    saliency, kept = tf.math.top_k(tf.nn.relu(pre)[0], k=k)
    # relu(z) * s = relu(z * s) for s >= 0: the saliency scales the k
    # gathered kernel rows and biases, not the (larger) output.
    kernel = tf.gather(self.kernel_ohwi, kept) * tf.reshape(
        saliency, [k, 1, 1, 1]
    )
    if isinstance(x, _Compact):
      kernel = tf.gather(kernel, x.indices, axis=3)
    kernel = tf.transpose(kernel, [1, 2, 3, 0])
    y = tf.nn.conv2d(inputs, kernel, self.layer.strides, 'SAME')
    y = self.activate(y + tf.gather(self.bias, kept) * saliency)
    return _Compact(y, kept, self.layer.filters)


def _inbound(layer):
  inbound = layer._inbound_nodes[0].inbound_layers  # pylint: disable=protected-access
  return inbound if isinstance(inbound, list) else [inbound]


def inference_function(
    model: tf.keras.Model,
    mean,
    std,
    keep_ratio: float | None = None,
    dense: bool = False,
) -> tf.Module:
  """The batch-1 inference graph of `model` (raw pixels in, logits out).

  Returns a module holding `model` (whose remaining variables the graph reads)
  and `serve`, the concrete function to convert.

  Args:
    model: a functional model of the zoo (gated or dense GatedConv2D layers).
    mean: per-channel pixel mean used in training.
    std: per-channel pixel standard deviation used in training.
    keep_ratio: rho of every gated layer; default: the model's current one.
    dense: ignore the gates and compute every channel.
  """
  if keep_ratio is not None and not 0 < keep_ratio <= 1:
    raise ValueError(f'keep_ratio must be in (0, 1], got {keep_ratio}')
  folded, kept = {}, {}
  for layer in model.layers:
    if isinstance(layer, gated_conv.GatedConv2D):
      folded[layer.name] = _FoldedConv(layer)
      if layer.gated and not dense:
        rho = keep_ratio if keep_ratio is not None else layer.keep_ratio
        kept[layer.name] = int(gated_conv.num_kept(rho, layer.filters))
  mean = np.asarray(mean, np.float32)
  inv_std = 1.0 / np.asarray(std, np.float32)
  shape = [1] + list(model.input_shape[1:])

  @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, 'images')])
  def serve(images):
    outputs = {}
    for layer in model.layers:
      if isinstance(layer, tf.keras.layers.InputLayer):
        outputs[layer.name] = (images - mean) * inv_std
        continue
      inputs = [outputs[l.name] for l in _inbound(layer)]
      if layer.name in kept:
        y = folded[layer.name].gated(inputs[0], kept[layer.name])
      elif layer.name in folded:
        y = folded[layer.name].dense(inputs[0])
      elif isinstance(layer, gated_conv.CHANNEL_PRESERVING) and isinstance(
          inputs[0], _Compact
      ):
        x = inputs[0]
        y = _Compact(layer(x.values, training=False), x.indices, x.width)
      else:
        args = [_full(x) for x in inputs]
        y = layer(args if len(args) > 1 else args[0], training=False)
      outputs[layer.name] = y
    return {'logits': _full(outputs[model.layers[-1].name])}

  module = tf.Module()
  module.model = model
  module.serve = serve.get_concrete_function()
  return module


def ungated_copy(model: tf.keras.Model) -> tf.keras.Model:
  """The same architecture and weights with every gate off (dense reference).

  It computes what `inference_function(..., dense=True)` exports.
  """
  config = model.get_config()
  for layer in config['layers']:
    if layer['class_name'].endswith('GatedConv2D'):
      layer['config']['gated'] = False
  dense = tf.keras.Model.from_config(config)
  short = lambda v: v.name.rsplit('/', 1)[-1].strip()
  for layer in dense.layers:
    values = {short(v): v for v in model.get_layer(layer.name).weights}
    for variable in layer.weights:
      variable.assign(values[short(variable)])
  return dense


def convert(inference: tf.Module, quantize: str = 'none') -> bytes:
  """A TFLite flatbuffer of `inference_function`'s module: builtin ops only."""
  if quantize not in QUANTIZATIONS:
    raise ValueError(f'quantize must be one of {QUANTIZATIONS}, got {quantize!r}')
  with tempfile.TemporaryDirectory() as saved_model:
    tf.saved_model.save(
        inference, saved_model, signatures={SIGNATURE: inference.serve}
    )
    converter = tf.lite.TFLiteConverter.from_saved_model(
        saved_model, signature_keys=[SIGNATURE]
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize != 'none':
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == 'float16':
      converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def interpreter(
    model_content: bytes, num_threads: int = 1, xnnpack: bool = True
) -> tf.lite.Interpreter:
  """A TFLite interpreter, with or without the default XNNPACK delegate."""
  resolver = (
      tf.lite.experimental.OpResolverType.AUTO
      if xnnpack
      else tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
  )
  return tf.lite.Interpreter(
      model_content=model_content,
      num_threads=num_threads,
      experimental_op_resolver_type=resolver,
  )


def run(model_content: bytes, images: np.ndarray, **kwargs) -> np.ndarray:
  """Logits of the TFLite model for each image, one invoke per image."""
  runner = interpreter(model_content, **kwargs).get_signature_runner(SIGNATURE)
  return np.concatenate([
      runner(images=image[np.newaxis].astype(np.float32))['logits']
      for image in images
  ])


def op_names(model_content: bytes) -> set[str]:
  """The names of the operators the TFLite model uses."""
  details = interpreter(model_content, xnnpack=False)._get_ops_details()  # pylint: disable=protected-access
  return {d['op_name'] for d in details}


def compare(
    model: tf.keras.Model,
    model_content: bytes,
    images: np.ndarray,
    mean,
    std,
    labels: np.ndarray | None = None,
) -> dict:
  """TFLite vs Keras on raw `images` (with `model`'s current keep ratio).

  Returns the largest absolute logit difference, the share of images with
  the same top-1 class and, given `labels`, both models' accuracies.
  """
  expected = model.predict(
      (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32),
      batch_size=256, verbose=0,
  )
  got = run(model_content, images)
  report = {
      'images': len(images),
      'max_abs_diff': float(np.abs(got - expected).max()),
      'top1_agreement': float(np.mean(got.argmax(-1) == expected.argmax(-1))),
  }
  if labels is not None:
    report['keras_accuracy'] = float(np.mean(expected.argmax(-1) == labels))
    report['tflite_accuracy'] = float(np.mean(got.argmax(-1) == labels))
  return report
