"""Compact training: a gated model computes only the channels its batch keeps.

docs/method.md, "Compact training". A gated layer trained as it is called
(`GatedConv2D.call`) computes every output channel and then masks; a device
given a low keep ratio because it is slow pays for the full model. Here the
model's functional graph is run layer by layer on `Channels`: a tensor of
some of a full-width activation's channels and which ones. A gated layer
with masked batch statistics computes only the channels U that some sample
of the batch keeps (`mode='step'`: the batch's union; `mode='round'`: a
set fixed for the client's round, `round_channels`), from a kernel gathered
to (U_in, U), and hands the next layer that compact activation; residual
additions and layers this module does not know read the full width again
(pruned channels are zeros there). The gradients are those of the masked
full computation: a channel no sample keeps has zero activation and zero
gradient in it, and a pruned input channel pools to 0 and enters the next
gate as subsample(0) (sigmoid(0) = 0.5) here too, because the gate reads the
full-width pool.

Widths are rounded up to a multiple of `BUCKET` (extra channels kept by no
sample, so computed as zeros): fewer distinct shapes for oneDNN's kernel
cache. Every call also counts its training FLOPs (forward plus backward, 3x
the forward convolutions and dense layers, gates included) from the widths
it computed.
"""

import dataclasses
from typing import Optional

import tensorflow as tf

from tff_fedprune import gate_ops
from tff_fedprune import gated_conv

MODES = ('off', 'step', 'round')
BUCKET = 8
# Forward plus backward (input and weight gradients) per forward FLOP.
TRAIN_FLOPS_PER_FORWARD = 3.0

_PASS_THROUGH = gated_conv.CHANNEL_PRESERVING


def _slots(index, width):
  """Position of each of `width` channels in `index`, len(index) if absent."""
  return tf.tensor_scatter_nd_update(
      tf.fill([width], tf.size(index)), index[:, None],
      tf.range(tf.size(index)))


def select(values, index, axis: int):
  """`tf.gather(values, index, axis)`, whose gradient is `expand`.

  For an axis with contiguous slices behind it (not the last). TF's
  gradient of a gather along an inner axis transposes the gradient twice
  around a segment sum; with an index of distinct channels the gradient is
  the inverse gather instead (one op).
  """

  @tf.custom_gradient
  def forward(values):
    width = tf.shape(values)[axis]

    def grad(upstream):
      return expand(upstream, index, width, axis)

    return tf.gather(values, index, axis=axis), grad

  return forward(values)


def expand(values, index, width, axis: int):
  """`values` (holding channels `index` along `axis`) at full `width`.

  The channels not in `index` are zeros; the gradient is `select`.
  """

  @tf.custom_gradient
  def forward(values):
    def grad(upstream):
      return select(upstream, index, axis)

    zeros = tf.zeros_like(tf.gather(values, [0], axis=axis))
    padded = tf.concat([values, zeros], axis)
    return tf.gather(padded, _slots(index, width), axis=axis), grad

  return forward(values)


# Kernels up to this size gather their output channels directly.
_DIRECT_GATHER_ELEMENTS = 1 << 17


def select_output_channels(kernel, index, full_size: int):
  """`kernel[..., index]` of a (k, k, C_in, C_out) kernel of `full_size`
  elements before any input channels were selected.

  A gather along the last axis copies one float at a time (slow on CPU for
  large kernels); with the last two axes swapped it copies rows of C_in
  floats, for two transposes.
  """
  if full_size <= _DIRECT_GATHER_ELEMENTS:
    return select(kernel, index, 3)
  swapped = tf.transpose(kernel, [0, 1, 3, 2])
  return tf.transpose(select(swapped, index, 2), [0, 1, 3, 2])


def _one_hot(index, width):
  """(width, len(index)): column i is 1 at channel index[i]."""
  return tf.one_hot(index, width, axis=0, dtype=tf.float32)


def select_last(values, index, width: int):
  """`values[..., index]` as a product with a one-hot matrix (exact).

  For activations, whose channel axis is last: a matrix product is one
  vectorised pass, where a gather along the last axis copies one float at
  a time; its gradient is the product with the transpose (`expand_last`).
  """
  flat = tf.reshape(values, [-1, width])
  out = tf.matmul(flat, _one_hot(index, width))
  return tf.reshape(out, _leading_shape(values) + [tf.size(index)])


def expand_last(values, index, width: int):
  """`values` holding channels `index` (last axis) at full `width`."""
  flat = tf.reshape(values, [-1, tf.size(index)])
  out = tf.matmul(flat, _one_hot(index, width), transpose_b=True)
  return tf.reshape(out, _leading_shape(values) + [width])


def _leading_shape(values) -> list:
  """The shape of `values` but its last axis; -1 for its one unknown one."""
  dims = values.shape[:-1].as_list()
  if dims.count(None) > 1:
    raise ValueError(f'at most one unknown leading dimension: {values.shape}')
  return [-1 if d is None else d for d in dims]


@dataclasses.dataclass(frozen=True)
class Channels:
  """Some channels of a full-width activation: `values[..., i]` is channel
  `index[i]` (`index` None: all `width` channels in order)."""

  values: tf.Tensor
  index: Optional[tf.Tensor]
  width: int

  def count(self):
    """The number of channels held (a scalar tensor)."""
    if self.index is None:
      return tf.constant(self.width, tf.int32)
    return tf.size(self.index)

  def full(self) -> tf.Tensor:
    """The full-width activation (zeros in the channels not held)."""
    if self.index is None:
      return self.values
    return expand_last(self.values, self.index, self.width)

  def rows(self, kernel, axis):
    """`kernel` restricted to the held channels along `axis`."""
    return kernel if self.index is None else select(kernel, self.index, axis)


@dataclasses.dataclass(frozen=True)
class CompactOutput:
  """One compact forward pass of a batch."""

  logits: tf.Tensor
  losses: list  # The gates' balance losses (training only).
  flops: tf.Tensor  # float64 training FLOPs of the batch (3x forward).
  computed: list  # Per gated layer, output channels computed (int32).
  kept: list  # Per gated layer, (C_out,) 1.0 where some sample kept it.
  outside: tf.Tensor  # (sample, channel) pairs a round set excluded.
  gated_pairs: tf.Tensor  # (sample, channel) pairs the free gates kept.


def uses_compact_path(model: tf.keras.Model) -> bool:
  """Whether compact training changes anything for `model`.

  Only gated layers with masked batch statistics compute fewer channels:
  with `gated_bn='full'` a layer's statistics cover every channel, so it
  trains at full width.
  """
  gated = gated_conv.gated_layers(model)
  return bool(gated) and all(l.gate.batch_stats == 'masked' for l in gated)


def bucketed(kept_count, bucket: int = BUCKET):
  """Sorted indices of the channels with a non-zero count, plus the fewest
  others (lowest index first) that make their number a multiple of
  `bucket` (at most all channels)."""
  width = tf.size(kept_count)
  used = tf.math.count_nonzero(kept_count, dtype=tf.int32)
  size = tf.minimum(width, (used + bucket - 1) // bucket * bucket)
  size = tf.maximum(size, 1)
  order = tf.math.top_k(tf.cast(kept_count > 0, tf.float32), k=size).indices
  return tf.sort(order)


@dataclasses.dataclass(frozen=True)
class TrainingCost:
  """What a client's local training computed (summed over its steps)."""

  train_flops: tf.Tensor  # float64, forward + backward (+ a round pre-pass).
  dense_train_flops: tf.Tensor  # float64, a dense client's on the same data.
  computed_channels: tf.Tensor  # (gated layers,) sum of |U| x batch size.
  outside_pairs: tf.Tensor  # (sample, channel) pairs a round set excluded.
  gated_pairs: tf.Tensor  # (sample, channel) pairs the free gates kept.


def forward_flops(model: tf.keras.Model, gates: bool) -> float:
  """One sample's forward FLOPs over every channel: convolutions and dense
  layers (`gates`: plus the gates' matrix products)."""
  total = 0.0
  for layer in model.layers:
    if isinstance(layer, gated_conv.GatedConv2D):
      _, h, w, cin = layer.input_shape
      _, h, w, _ = layer.output_shape
      total += 2.0 * h * w * layer.kernel_size**2 * cin * layer.filters
      if gates and layer.learned_gate:
        total += 2.0 * cin * layer.filters
    elif isinstance(layer, tf.keras.layers.Dense):
      total += 2.0 * layer.input_shape[-1] * layer.units
  return total


class CompactModel:
  """A functional Keras model run on compact activations (see module doc)."""

  def __init__(self, model: tf.keras.Model, bucket: int = BUCKET):
    if not uses_compact_path(model):
      raise ValueError('compact training needs gated layers with masked'
                       ' batch statistics (--gated_bn=masked)')
    self.model = model
    self.bucket = int(bucket)
    self.gated = gated_conv.gated_layers(model)
    self._layers = [l for l in model.layers
                    if not isinstance(l, tf.keras.layers.InputLayer)]
    self._input_name = model.layers[0].name
    self._output_name = model.output_names[0]

  @tf.autograph.experimental.do_not_convert
  def __call__(self, images, training: bool, round_sets=None) -> CompactOutput:
    """The batch's logits and costs.

    `round_sets`: per gated layer a (C_out,) 0/1 vector of the channels the
    client computes this round (`mode='round'`); None: each batch's union.
    """
    step = _Step(training, round_sets, self.bucket,
                 {id(l): i for i, l in enumerate(self.gated)})
    values = {self._input_name: Channels(images, None, images.shape[-1])}
    for layer in self._layers:
      inputs = [values[l.name] for l in gated_conv.inbound_layers(layer)]
      values[layer.name] = step.apply(layer, inputs)
    logits = values[self._output_name].full()
    batch = tf.cast(tf.shape(images)[0], tf.float64)
    return CompactOutput(
        logits=logits, losses=step.losses,
        flops=TRAIN_FLOPS_PER_FORWARD * batch * tf.add_n(step.flops),
        computed=[step.computed[i] for i in range(len(self.gated))],
        kept=[step.kept[i] for i in range(len(self.gated))],
        outside=_total(step.outside), gated_pairs=_total(step.gated_pairs),
    )


  def round_channels(self, batches: tf.data.Dataset):
    """(round sets, FLOPs) of a pre-pass over the client's batches.

    Per gated layer, 1.0 on the channels some sample keeps in an inference
    pass of the global model (the `round_sets` of `__call__`), and the
    pass's forward FLOPs.
    """

    def fold(state, batch):
      sets, flops = state
      out = self(batch[0], training=False)
      return (tuple(tf.maximum(s, k) for s, k in zip(sets, out.kept)),
              flops + out.flops / TRAIN_FLOPS_PER_FORWARD)

    initial = (tuple(tf.zeros([l.filters]) for l in self.gated),
               tf.constant(0.0, tf.float64))
    return batches.reduce(initial, fold)


def _total(values):
  return tf.add_n(values) if values else tf.constant(0.0)


class _Step:
  """The layer rules of one compact pass (state of that pass)."""

  def __init__(self, training, round_sets, bucket, positions):
    self.training = bool(training)
    self.round_sets = round_sets
    self.bucket = bucket
    self.positions = positions
    self.losses, self.flops, self.outside, self.gated_pairs = [], [], [], []
    self.computed, self.kept = {}, {}

  def apply(self, layer, inputs) -> Channels:
    if isinstance(layer, gated_conv.GatedConv2D):
      if layer.gated:
        return self.gated_conv(layer, inputs[0])
      return self.plain_conv(layer, inputs[0])
    if isinstance(layer, tf.keras.layers.Dense):
      return self.dense(layer, inputs[0])
    if isinstance(layer, tf.keras.layers.Flatten):
      return self.flatten(layer, inputs[0])
    if isinstance(layer, _PASS_THROUGH):
      x = inputs[0]
      kwargs = ({'training': self.training}
                if isinstance(layer, tf.keras.layers.Dropout) else {})
      return Channels(layer.call(x.values, **kwargs), x.index, x.width)
    full = [x.full() for x in inputs]
    out = layer(full if len(full) > 1 else full[0], training=self.training)
    return Channels(out, None, out.shape[-1])

  def count_conv(self, layer, cin, cout):
    _, h, w, _ = layer.output_shape
    self.flops.append(2.0 * h * w * layer.kernel_size**2 * tf.cast(
        cin, tf.float64) * tf.cast(cout, tf.float64))

  def plain_conv(self, layer, x: Channels) -> Channels:
    """An ungated conv: every output channel, from the held inputs."""
    c = tf.nn.conv2d(x.values, x.rows(layer.kernel, 2), layer.strides,
                     padding='SAME')
    self.count_conv(layer, x.count(), layer.filters)
    y = layer._batch_norm(c, self.training)  # pylint: disable=protected-access
    return Channels(tf.nn.relu(y) if layer.relu else y, None, layer.filters)

  def count_gate(self, layer):
    if not layer.learned_gate:
      return
    self.flops.append(tf.constant(2.0 * layer.kernel.shape[2] * layer.filters,
                                  tf.float64))

  def record(self, layer, kept, computed):
    position = self.positions[id(layer)]
    self.kept[position] = kept
    self.computed[position] = tf.cast(computed, tf.int32)

  def gates(self, layer, pooled):
    """pi (B, C_out), restricted to the round set in round mode."""
    allowed = None
    if self.round_sets is not None:
      allowed = self.round_sets[self.positions[id(layer)]]
    s = layer.saliency_of_pooled(pooled)
    scores = layer.selection_scores(s, self.training)
    pi, loss = layer.gates_of_scores(s, scores, self.training, allowed)
    if loss is not None:
      self.losses.append(loss)
    if allowed is not None:
      free = tf.cast(tf.not_equal(s * layer.top_k(scores), 0.0), tf.float32)
      self.outside.append(tf.reduce_sum(free * (1.0 - allowed)))
      self.gated_pairs.append(tf.reduce_sum(free))
    return pi, allowed

  def gated_conv(self, layer, x: Channels) -> Channels:
    """A gated conv over the channels some sample keeps (or the round's)."""
    pooled = (Channels(tf.reduce_mean(x.values, axis=[1, 2]), x.index,
                       x.width).full() if layer.learned_gate
              else tf.zeros([tf.shape(x.values)[0], 0]))  # Unread by a prefix.
    pi, allowed = self.gates(layer, pooled)
    kept = tf.reduce_sum(tf.cast(tf.not_equal(pi, 0.0), tf.float32), axis=0)
    index = bucketed(kept if allowed is None else allowed, self.bucket)
    kernel = select_output_channels(x.rows(layer.kernel, 2), index,
                                    layer.kernel.shape.num_elements())
    c = tf.nn.conv2d(x.values, kernel, layer.strides, padding='SAME')
    self.count_conv(layer, x.count(), tf.size(index))
    self.count_gate(layer)
    self.record(layer, tf.cast(kept > 0, tf.float32), tf.size(index))
    pi_c = select_last(pi, index, layer.filters)
    gamma, beta = tf.gather(layer.gamma, index), tf.gather(layer.beta, index)
    out = Channels(None, index, layer.filters)
    if not self.training:
      y = tf.nn.batch_normalization(
          c, tf.gather(layer.moving_mean, index),
          tf.gather(layer.moving_variance, index), beta, gamma, layer.epsilon)
      y = (tf.nn.relu(y) if layer.relu else y) * pi_c[:, None, None, :]
      return dataclasses.replace(out, values=y)
    y, mean, var, _ = gate_ops.gated_batch_norm(
        c, pi_c, gamma, beta, layer.epsilon, layer.relu)
    widen = lambda v: Channels(v, index, layer.filters).full()
    layer._update_moving(widen(mean), widen(var), kept > 0)  # pylint: disable=protected-access
    layer._count_kept(kept, x.values)  # pylint: disable=protected-access
    return dataclasses.replace(out, values=y)

  def dense(self, layer, x: Channels) -> Channels:
    kernel = x.rows(layer.kernel, 0)
    self.flops.append(2.0 * tf.cast(x.count(), tf.float64) * layer.units)
    y = tf.matmul(x.values, kernel)
    if layer.use_bias:
      y = y + layer.bias
    return Channels(layer.activation(y), None, layer.units)

  def flatten(self, layer, x: Channels) -> Channels:
    del layer
    values = tf.reshape(x.values, [tf.shape(x.values)[0], -1])
    if x.index is None:
      return Channels(values, None, values.shape[-1])
    _, h, w, width = x.values.shape.as_list()[:3] + [x.width]
    index = tf.reshape(
        tf.range(h * w)[:, None] * width + x.index[None, :], [-1])
    return Channels(values, index, h * w * width)
