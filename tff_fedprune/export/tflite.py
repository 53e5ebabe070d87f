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

With `channels` (a channel map, `export.channels`), the named gated layers
instead keep a fixed channel set for every input (`ALL_CHANNELS`: every
channel): their kernels, BN and gate are
sliced at export, so the convolution has constant filters (which XNNPACK
packs) and only the saliency of the kept channels is computed at run time
(a pooling and a small constant FULLY_CONNECTED) to scale them. With a set
for every gated layer (`static_channels` picks the channels a device's own
data selects most often) the graph has no TOPK_V2, GATHER or SCATTER_ND at
all: the static, device-specialised export. `channels.reference_model` is
the Keras model that computes the same, for parity checks and accuracy.

Each layer is exported by the rule of its class (`EXPORT_RULES`), in the
order of the model's layers, reading its inputs from
`gated_conv.inbound_layers`.

Inputs are raw pixels (the dataset's own scale); the normalisation used in
training is part of the graph. With `dense=True` the same model is exported
without gates (every channel, constant weights): the baseline a phone would
otherwise run. `convert` produces a TFLite flatbuffer with builtin ops only
and the `serving_default` signature (input `images`, output `logits`).
"""

import dataclasses
import tempfile
import time
from typing import Mapping, Optional

import numpy as np
import tensorflow as tf

from tff_fedprune import gate_ops
from tff_fedprune import gated_conv
from tff_fedprune.export import channels as channel_maps
from tff_fedprune.export import compact

SIGNATURE = 'serving_default'
QUANTIZATIONS = ('none', 'float16', 'dynamic_int8')
RUNTIMES = ('tensorflow', 'litert')
# Gate every layer: on LiteRT's XNNPACK no zoo layer measured gains from its
# top-k (docs/export.md), but this keeps the export the model as trained.
DEFAULT_GATE_MIN_FLOPS = 0.0


class _FoldedConv:
  """A GatedConv2D's inference constants: BN folded into kernel and bias."""

  def __init__(self, layer: gated_conv.GatedConv2D):
    scale = layer.gamma.numpy() / np.sqrt(
        layer.moving_variance.numpy() + layer.epsilon
    )
    self.layer = layer
    self.kernel = (layer.kernel.numpy() * scale).astype(np.float32)
    self.kernel_oihw = np.ascontiguousarray(self.kernel.transpose(3, 2, 0, 1))
    self.bias = (layer.beta.numpy() - layer.moving_mean.numpy() * scale).astype(
        np.float32
    )
    if layer.learned_gate:
      gate_kernel = layer.gate_kernel.numpy()
      self.gate_kernel = gate_kernel
      self.gate_bias = layer.gate_bias.numpy()
      # Pruned inputs pool to 0 and score subsample(0): 0.5 or 0.
      self.zero_point = float(layer.subsample(tf.constant(0.0)))
      self.gate_pruned = (
          self.zero_point * gate_kernel.sum(axis=0) + self.gate_bias
      )
      if layer.gate.selection != 'saliency':
        self.saliency_moments = (layer.saliency_mean.numpy(),
                                 layer.saliency_variance.numpy())

  def activate(self, x):
    return tf.nn.relu(x) if self.layer.relu else x

  def dense(self, x):
    y = tf.nn.conv2d(compact.full(x), self.kernel, self.layer.strides, 'SAME')
    return self.activate(y + self.bias)

  def gate_logits(self, x, kept=None):
    """The gate's pre-activation (1, C_out), or only its columns `kept`.

    For a compact input the pruned channels pool to 0: their share is the
    constant `gate_pruned`.
    """
    columns = slice(None) if kept is None else kept
    if not isinstance(x, compact.Compact):
      z = self.layer.subsample(tf.reduce_mean(x, axis=[1, 2]))
      return tf.matmul(z, self.gate_kernel[:, columns]) + self.gate_bias[
          columns]
    rows = (self.gate_kernel[x.indices][:, columns] if x.fixed
            else tf.gather(self.gate_kernel[:, columns], x.indices))
    z = self.layer.subsample(tf.reduce_mean(x.values, axis=[1, 2]))
    return tf.matmul(z - self.zero_point, rows) + self.gate_pruned[columns]

  def fixed(self, x, kept: Optional[np.ndarray]):
    """Only the channels `kept` (ALL_CHANNELS: all), scaled by their saliency.

    Everything but the input's pool, the saliency of the kept channels and
    the convolution with constant filters is sliced here, at export.
    """
    kept = (np.arange(self.layer.filters)
            if kept is channel_maps.ALL_CHANNELS else kept)
    if isinstance(x, compact.Compact) and not x.fixed:
      x = x.full()
    rows, inputs = ((x.indices, x.values) if isinstance(x, compact.Compact)
                    else (slice(None), x))
    kernel = np.ascontiguousarray(self.kernel[:, :, rows][..., kept])
    y = tf.nn.conv2d(inputs, kernel, self.layer.strides, 'SAME') + self.bias[
        kept]
    if self.layer.learned_gate:
      saliency = tf.nn.relu(self.gate_logits(x, kept))
      y = y * tf.reshape(saliency, [-1, 1, 1, len(kept)])
    y = self.activate(y)
    if len(kept) == self.layer.filters:
      return y
    return compact.Compact(y, kept, self.layer.filters)

  def gated(self, x, k: int) -> compact.Compact:
    s = tf.nn.relu(self.gate_logits(x))[0]
    layer = self.layer
    if layer.gate.selection == 'saliency':
      saliency, kept = tf.math.top_k(s, k=k)
    else:
      _, kept = tf.math.top_k(gate_ops.relative_scores(
          s, *self.saliency_moments, layer.gate.selection, layer.epsilon),
          k=k)
      saliency = tf.gather(s, kept)
    # Gathers along leading axes only (whole rows: contiguous copies).
    kernel = tf.gather(self.kernel_oihw, kept)
    if isinstance(x, compact.Compact):
      inputs = x.values
      kernel = tf.transpose(tf.gather(
          tf.transpose(kernel, [1, 0, 2, 3]), x.indices), [2, 3, 0, 1])
    else:
      inputs = x
      kernel = tf.transpose(kernel, [2, 3, 1, 0])
    y = tf.nn.conv2d(inputs, kernel, self.layer.strides, 'SAME')
    # relu(z) * s = relu(z * s) for s >= 0.
    y = self.activate((y + tf.gather(self.bias, kept)) * saliency)
    return compact.Compact(y, kept, self.layer.filters)


def _dense_on_fixed(layer: tf.keras.layers.Dense, weights, x: compact.Compact):
  """A Dense layer on a fixed-set input: only the rows of the kept inputs."""
  y = tf.matmul(x.values, np.ascontiguousarray(weights[0][x.indices]))
  if layer.use_bias:
    y += weights[1]
  return layer.activation(y)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What the export of each layer needs, computed before tracing."""

  folded: dict  # GatedConv2D name -> its `_FoldedConv`.
  top_k: dict  # Gated layer name -> k, for layers choosing per input.
  fixed: dict  # Layer name -> its fixed channel set (`channels` module).
  dense_weights: dict  # Dense layer name -> its weights.


def _plan(model, keep_ratio, dense, channels) -> _Plan:
  fixed = {} if dense else channel_maps.check_channels(model, channels or {})
  folded, top_k = {}, {}
  for layer in model.layers:
    if isinstance(layer, gated_conv.GatedConv2D):
      folded[layer.name] = _FoldedConv(layer)
      if layer.gated and not dense and layer.name not in fixed:
        rho = keep_ratio if keep_ratio is not None else layer.keep_ratio
        k = int(gated_conv.num_kept(rho, layer.filters))
        if layer.gate.prefix:  # A sub-model: its channel prefix, static.
          fixed[layer.name] = np.arange(k)
        else:
          top_k[layer.name] = k
  weights = {l.name: l.get_weights() for l in model.layers
             if isinstance(l, tf.keras.layers.Dense)}
  return _Plan(folded, top_k, fixed, weights)


def _keras_rule(plan, layer, inputs):
  """Any other layer: the Keras layer on full-width inputs."""
  del plan
  args = [compact.full(x) for x in inputs]
  return layer(args if len(args) > 1 else args[0], training=False)


def _gated_conv_rule(plan, layer, inputs):
  conv = plan.folded[layer.name]
  if layer.name in plan.top_k:
    return conv.gated(inputs[0], plan.top_k[layer.name])
  if layer.name in plan.fixed:
    return conv.fixed(inputs[0], plan.fixed[layer.name])
  return conv.dense(inputs[0])


def _add_rule(plan, layer, inputs):
  if layer.name in plan.fixed:
    return compact.narrowed_sum(inputs, plan.fixed[layer.name],
                         layer.output_shape[-1])
  return _keras_rule(plan, layer, inputs)


def _channelwise_rule(plan, layer, inputs):
  """Pooling and activations keep a compact tensor compact."""
  x = inputs[0]
  if isinstance(x, compact.Compact):
    return compact.Compact(layer(x.values, training=False), x.indices, x.width)
  return _keras_rule(plan, layer, inputs)


def _flatten_rule(plan, layer, inputs):
  if compact.is_fixed(inputs[0]):
    return inputs[0].flatten()
  return _keras_rule(plan, layer, inputs)


def _dense_rule(plan, layer, inputs):
  if compact.is_fixed(inputs[0]):
    return _dense_on_fixed(layer, plan.dense_weights[layer.name], inputs[0])
  return _keras_rule(plan, layer, inputs)


# How each layer class is exported: rule(plan, layer, inputs) -> output.
EXPORT_RULES = {
    gated_conv.GatedConv2D: _gated_conv_rule,
    tf.keras.layers.Add: _add_rule,
    tf.keras.layers.Flatten: _flatten_rule,
    tf.keras.layers.Dense: _dense_rule,
    **{cls: _channelwise_rule for cls in gated_conv.CHANNEL_PRESERVING},
}


def export_rule(layer):
  """The `EXPORT_RULES` entry of `layer`'s class (or nearest base)."""
  for cls in type(layer).__mro__:
    if cls in EXPORT_RULES:
      return EXPORT_RULES[cls]
  return _keras_rule


def inference_function(
    model: tf.keras.Model,
    mean,
    std,
    keep_ratio: float | None = None,
    dense: bool = False,
    channels: Optional[Mapping[str, Optional[np.ndarray]]] = None,
) -> tf.Module:
  """The batch-1 inference graph of `model` (raw pixels in, logits out).

  Returns a module holding `serve`, the concrete function to convert, and
  the variables of `model` it reads (`variables_read`).

  Args:
    model: a functional model of the zoo (gated or dense GatedConv2D layers).
    mean: per-channel pixel mean used in training.
    std: per-channel pixel standard deviation used in training.
    keep_ratio: rho of every gated layer; default: the model's current one.
    dense: ignore the gates and compute every channel.
    channels: gated layer name -> its fixed channel set (or `ALL_CHANNELS`);
      the other gated layers keep their top k per input. A residual
      addition's name -> the only channels of the residual stream it keeps
      (`static_channels(..., residual='shared')`).
  """
  if keep_ratio is not None and not 0 < keep_ratio <= 1:
    raise ValueError(f'keep_ratio must be in (0, 1], got {keep_ratio}')
  plan = _plan(model, keep_ratio, dense, channels)
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
      inputs = [outputs[l.name] for l in gated_conv.inbound_layers(layer)]
      outputs[layer.name] = export_rule(layer)(plan, layer, inputs)
    return {'logits': compact.full(outputs[model.layers[-1].name])}

  module = tf.Module()
  module.serve = serve.get_concrete_function()
  # The variables the graph still reads, without the Keras model: saving a
  # model traces every layer's call functions, most of a conversion's time.
  captured = {id(t) for t in module.serve.captured_inputs}
  module.variables_read = [v for v in model.variables
                           if id(v.handle) in captured]
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
    model_content: bytes,
    num_threads: int = 1,
    xnnpack: bool = True,
    runtime: str = 'tensorflow',
):
  """A TFLite interpreter, with or without the default XNNPACK delegate.

  `runtime`: 'tensorflow' (TF's own `tf.lite.Interpreter`) or 'litert'
  (the `ai-edge-litert` package, the runtime Android apps ship; a
  development dependency of this project).
  """
  if runtime == 'tensorflow':
    module = tf.lite
    resolvers = tf.lite.experimental.OpResolverType
  elif runtime == 'litert':
    from ai_edge_litert import interpreter as module  # pylint: disable=g-import-not-at-top
    resolvers = module.OpResolverType
  else:
    raise ValueError(f'runtime must be one of {RUNTIMES}, got {runtime!r}')
  resolver = (resolvers.AUTO if xnnpack
              else resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
  return module.Interpreter(
      model_content=model_content,
      num_threads=num_threads,
      experimental_op_resolver_type=resolver,
  )


def median_latency_ms(model_content: bytes, image: np.ndarray, *,
                      runtime: str = 'litert', xnnpack: bool = True,
                      num_threads: int = 1, warmup: int = 20,
                      invokes: int = 100) -> float:
  """Median milliseconds of one invoke on `image` (batch 1), after warm-up."""
  runner = interpreter(model_content, num_threads=num_threads,
                       xnnpack=xnnpack, runtime=runtime)
  runner.allocate_tensors()
  runner.set_tensor(runner.get_input_details()[0]['index'],
                    image.astype(np.float32))
  for _ in range(warmup):
    runner.invoke()
  times = []
  for _ in range(invokes):
    start = time.perf_counter()
    runner.invoke()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


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


def keras_logits(model: tf.keras.Model, images: np.ndarray, mean, std,
                 channels=None, batch_size: int = 256) -> np.ndarray:
  """Logits of the Keras model on raw `images`, gates in inference mode.

  With `channels`, of `channels.reference_model` (what the static export
  computes).
  """
  normalised = ((images - np.asarray(mean, np.float32))
                / np.asarray(std, np.float32)).astype(np.float32)
  if channels:
    model = channel_maps.reference_model(model, channels)
  return np.concatenate([
      model(normalised[i:i + batch_size], training=False).numpy()
      for i in range(0, len(images), batch_size)
  ])


def compare(
    model: tf.keras.Model,
    model_content: bytes,
    images: np.ndarray,
    mean,
    std,
    labels: np.ndarray | None = None,
    channels=None,
) -> dict:
  """TFLite vs Keras on raw `images` (with `model`'s current keep ratio).

  `channels` as `keras_logits` takes them. Returns the largest absolute logit
  difference, the share of images with the same top-1 class and, given
  `labels`, both models' accuracies.
  """
  expected = keras_logits(model, images, mean, std, channels)
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
