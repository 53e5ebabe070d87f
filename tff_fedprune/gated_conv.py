"""The gated convolution block of FedDP (docs/design.md, section 1).

`GatedConv2D` is conv -> BatchNorm -> (gate) -> ReLU in one Keras layer. With a
`GateSpec` (how its channels are chosen and computed; one value for the layer,
the model builders, the driver and the exporter) a saliency predictor on the
input's global average pool scores the output channels per sample, keeps the
top k = max(1, round(rho * C_out)), and scales the kept channels by their
score:

    z = sigmoid(GAP(x)); s = ReLU(z @ W_g + b_g); pi = s on top-k, 0 elsewhere
    y = ReLU(BN(conv(x)) * pi)

(`GateSpec.input='identity'` takes z = GAP(x), as the authors' ResNet gates
do.)

Which channels are kept (`GateSpec.selection`): 'saliency' ranks s itself, so a
channel's fixed offset (its bias, its mean over inputs) dominates and nearly
every input keeps the same channels. 'centered' ranks s - mean(s) instead, the
part of a channel's saliency that depends on the input, and 'standardized' (s -
mean(s)) / std(s); both over the channels with s > 0 only (a zero-saliency
channel would be kept but not computed). The per-channel moments are moving
averages of the batch moments (non-trainable model weights, averaged by the
server like BN statistics), used in training and in inference alike. Only the
selection changes: kept channels are still scaled by s. `GateSpec.balance` > 0
adds a load-balancing loss in training (`gate_ops.usage_balance`) that pushes
every channel towards being kept equally often.

A channel that is pruned for a sample is never computed for it, so it takes no
part in that channel's batch statistics either: in training the BN moments of
channel j are taken over the samples that keep j (`batch_stats='masked'`,
`gate_ops.gated_batch_norm`). A custom gradient makes the backward pass exact
for this: the kernel slice, BN scale and shift of a channel receive exactly
zero gradient from samples that pruned it, and no gradient flows through the
top-k selection (the gate learns through the kept values of pi).
`batch_stats='full'` is the authors' code instead: batch statistics over every
sample, then the gate; a pruned sample then still reaches a channel's kernel
through those statistics.

The keep ratio rho is a variable read at run time (one traced model serves any
ratio) and, with the per-channel kept counts, is client-local state: it is not
part of the model weights the federation exchanges (`model_state`). With
`gate=None` the layer is the dense conv-BN-ReLU baseline with the same
parameter names."""

import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf

from tff_fedprune import gate_ops


def num_kept(keep_ratio, channels):
  """k = max(1, round(rho * C)) as an int32 tensor (half to even, as round)."""
  k = tf.cast(tf.round(keep_ratio * tf.cast(channels, tf.float32)), tf.int32)
  return tf.clip_by_value(k, 1, channels)


GATE_INPUTS = ('sigmoid', 'identity')
GATED_BNS = ('masked', 'full')
GATE_SELECTIONS = ('saliency', 'centered', 'standardized')
# How a gated layer picks its channels: FedDP's learned top-k, or the fixed
# channel prefix of the sub-model methods HeteroFL and FjORD.
CHANNEL_POLICIES = ('feddp', 'heterofl', 'fjord')
# FjORD's ordered-dropout widths (a client draws among those up to its keep
# ratio at every local step).
FJORD_WIDTHS = (0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class GateSpec:
  """How the gated layers of a model choose and compute their channels.

  One value for the layer, the model builders, the driver and the exporter.
  `policy` is how a layer's kept channels are chosen (`CHANNEL_POLICIES`):
  'feddp', the k channels of each input's highest `selection` scores
  (learned gates, scaled by their saliency); 'heterofl' and 'fjord', the
  first k channels for every input (a sub-model: no gate parameters, no
  scaling). They differ in training and evaluation, not in the layer: a
  FjORD client draws its width per step (`local_training`), and both
  evaluate with static batch norm (`simulation.evaluation`). `stem` is read
  by the builders: whether the first convolution is gated too. The flag and
  `get_config` names of each field are `FLAG_NAMES`.
  """

  keep_ratio: float = 1.0
  selection: str = 'saliency'  # GATE_SELECTIONS.
  input: str = 'sigmoid'  # GATE_INPUTS: what the gate reads.
  batch_stats: str = 'masked'  # GATED_BNS: training BN moments.
  balance: float = 0.0  # Weight of the load-balancing loss.
  stem: bool = True
  policy: str = 'feddp'  # CHANNEL_POLICIES.

  FLAG_NAMES = {
      'keep_ratio': 'keep_ratio', 'selection': 'gate_selection',
      'input': 'gate_input', 'batch_stats': 'gated_bn',
      'balance': 'gate_balance', 'stem': 'gate_stem',
      'policy': 'channel_policy',
  }

  def __post_init__(self):
    def require(ok, field, expected):
      if not ok:
        value = getattr(self, field)
        raise ValueError(f'{self.FLAG_NAMES.get(field, field)} must be'
                         f' {expected}, got {value!r}')

    require(0 < self.keep_ratio <= 1, 'keep_ratio', 'in (0, 1]')
    require(self.selection in GATE_SELECTIONS, 'selection',
            f'one of {GATE_SELECTIONS}')
    require(self.input in GATE_INPUTS, 'input', f'one of {GATE_INPUTS}')
    require(self.batch_stats in GATED_BNS, 'batch_stats',
            f'one of {GATED_BNS}')
    require(self.balance >= 0, 'balance', '>= 0')
    require(self.policy in CHANNEL_POLICIES, 'policy',
            f'one of {CHANNEL_POLICIES}')
    if self.prefix:
      require(self.selection == 'saliency', 'selection',
              f"'saliency' with channel_policy={self.policy}")
      require(self.balance == 0, 'balance',
              f'0 with channel_policy={self.policy}')

  @property
  def prefix(self) -> bool:
    """Whether layers keep a fixed channel prefix (no learned gate)."""
    return self.policy != 'feddp'

  @classmethod
  def from_flags(cls, **flags) -> 'GateSpec':
    """The spec of flag-named values (`keep_ratio=`, `gate_input=`, ...)."""
    fields = {flag: field for field, flag in cls.FLAG_NAMES.items()}
    unknown = set(flags) - set(fields)
    if unknown:
      raise TypeError(f'unknown gate options {sorted(unknown)}')
    return cls(**{fields[k]: v for k, v in flags.items()})

  def flags(self) -> dict:
    """The flag-named values (`from_flags` inverts it)."""
    return {flag: getattr(self, field)
            for field, flag in self.FLAG_NAMES.items()}

  def with_keep_ratio(self, keep_ratio: float) -> 'GateSpec':
    return dataclasses.replace(self, keep_ratio=float(keep_ratio))


# A `fixed_channels` value: every channel (still scaled by its saliency).
ALL = 'all'


def channel_set(channels, width: int, name: str) -> np.ndarray:
  """`channels` as sorted unique indices; ValueError unless in 0..width-1."""
  kept = np.unique(np.asarray(channels, np.int64))
  if not len(kept) or kept[0] < 0 or kept[-1] >= width:
    raise ValueError(f'channels of {name!r} must be a non-empty subset of'
                     f' 0..{width - 1}')
  return kept


@tf.keras.utils.register_keras_serializable(package='tff_fedprune')
class GatedConv2D(tf.keras.layers.Layer):
  """Conv -> BN -> per-sample top-k channel gate -> (ReLU).

  Attributes:
    local_variables: keep ratio, per-channel kept counts and samples seen;
      client-local state, excluded from `global_weights`.
  """

  def __init__(
      self,
      filters: int,
      kernel_size: int = 3,
      strides: int = 1,
      gate: Optional[GateSpec] = GateSpec(),
      relu: bool = True,
      momentum: float = 0.9,
      epsilon: float = 1e-5,
      fixed_channels=None,
      **kwargs,
  ):
    """`gate=None` is the dense block; `fixed_channels` see `fix_channels`."""
    super().__init__(**kwargs)
    self.gate = gate
    self.filters = int(filters)
    self.kernel_size = int(kernel_size)
    self.strides = int(strides)
    self.relu = bool(relu)
    self.momentum = float(momentum)
    self.epsilon = float(epsilon)
    self.fixed_channels = None
    if fixed_channels is not None:
      self.fix_channels(fixed_channels)

  @property
  def gated(self) -> bool:
    return self.gate is not None

  @property
  def learned_gate(self) -> bool:
    """Gated by a saliency predictor (FedDP), not a fixed prefix."""
    return self.gated and not self.gate.prefix

  def fix_channels(self, channels) -> None:
    """Keeps `channels` (indices, or `ALL`) for every input instead of top-k.

    Saliency still scales the kept channels. This is what a static,
    device-specialised export computes (`export.tflite`); None restores the
    per-input top-k. Set it before the layer's call is traced.
    """
    if channels is None or isinstance(channels, str):
      if channels not in (None, ALL):
        raise ValueError(f'channels must be indices, {ALL!r} or None')
      self.fixed_channels = channels
      return
    self.fixed_channels = channel_set(channels, self.filters, self.name)

  def build(self, input_shape):
    cin = int(input_shape[-1])
    cout = self.filters
    self.kernel = self.add_weight(
        'kernel', (self.kernel_size, self.kernel_size, cin, cout),
        initializer='he_normal',
    )
    self.gamma = self.add_weight('gamma', (cout,), initializer='ones')
    self.beta = self.add_weight('beta', (cout,), initializer='zeros')
    self.moving_mean = self.add_weight(
        'moving_mean', (cout,), initializer='zeros', trainable=False
    )
    self.moving_variance = self.add_weight(
        'moving_variance', (cout,), initializer='ones', trainable=False
    )
    self.local_variables = []
    if self.learned_gate:
      self.gate_kernel = self.add_weight(
          'gate_kernel', (cin, cout), initializer='he_normal'
      )
      self.gate_bias = self.add_weight(
          'gate_bias', (cout,), initializer='ones'
      )
    if self.gated:
      self.keep_ratio = self.add_weight(
          'keep_ratio', (), trainable=False,
          initializer=tf.keras.initializers.Constant(self.gate.keep_ratio),
      )
      self.kept_count = self.add_weight(
          'kept_count', (cout,), initializer='zeros', trainable=False
      )
      self.samples_seen = self.add_weight(
          'samples_seen', (), initializer='zeros', trainable=False
      )
      self.local_variables = [
          self.keep_ratio, self.kept_count, self.samples_seen
      ]
      if self.gate.selection != 'saliency':
        self.saliency_mean = self.add_weight(
            'saliency_mean', (cout,), initializer='zeros', trainable=False
        )
        self.saliency_variance = self.add_weight(
            'saliency_variance', (cout,), initializer='ones', trainable=False
        )
    super().build(input_shape)

  def conv(self, x):
    return tf.nn.conv2d(x, self.kernel, self.strides, padding='SAME')

  def subsample(self, pooled):
    """z from the input's global average pool: sigmoid or identity."""
    return tf.sigmoid(pooled) if self.gate.input == 'sigmoid' else pooled

  def saliency(self, x):
    """s (B, C_out) = ReLU(z @ W_g + b_g), z = subsample(GAP(x)).

    A prefix policy has no saliency: s = 1 for every channel.
    """
    if not self.learned_gate:
      return tf.ones([tf.shape(x)[0], self.filters])
    return self.saliency_of_pooled(tf.reduce_mean(x, axis=[1, 2]))

  def saliency_of_pooled(self, pooled):
    """s of an input whose global average pool is `pooled` (B, C_in)."""
    if not self.learned_gate:
      return tf.ones([tf.shape(pooled)[0], self.filters])
    z = self.subsample(pooled)
    return tf.nn.relu(tf.matmul(z, self.gate_kernel) + self.gate_bias)

  def top_k(self, s):
    """The 0/1 mask of the k = max(1, round(rho * C_out)) largest scores.

    With `fixed_channels`, the mask of that set for every input; with a
    prefix policy, the first k channels.
    """
    if self.fixed_channels is not None:
      mask = np.zeros(self.filters, np.float32)
      mask[slice(None) if isinstance(self.fixed_channels, str)
           else self.fixed_channels] = 1.0
      return tf.ones_like(s) * mask
    k = num_kept(self.keep_ratio, self.filters)
    if self.gate.prefix:
      return tf.ones_like(s) * tf.cast(tf.range(self.filters) < k, tf.float32)
    return gate_ops.top_k_mask(tf.stop_gradient(s), k)

  def selection_scores(self, s, training=False):
    """What `top_k` ranks (`gate_selection`).

    Training moves the moving moments towards the batch's first and ranks by
    them, as inference does: ranking by batch moments in training and moving
    ones in inference changed the selection so much that the quickstart's
    test accuracy fell to 59% (standardized; 95.5% this way).
    """
    if self.gate.selection == 'saliency':
      return s
    s = tf.stop_gradient(s)
    if training:
      mean, variance = tf.nn.moments(s, axes=[0])
      decay = 1.0 - self.momentum
      self.saliency_mean.assign_sub((self.saliency_mean - mean) * decay)
      self.saliency_variance.assign_sub(
          (self.saliency_variance - variance) * decay
      )
    return gate_ops.relative_scores(
        s, self.saliency_mean, self.saliency_variance, self.gate.selection,
        self.epsilon,
    )

  def channel_gates(self, x, training=False):
    """pi (B, C_out): saliency on the top-k channels of each sample, else 0.

    A channel whose gate value is 0 (pruned, or kept with zero saliency) is
    not computed for that sample and is not counted as kept.
    """
    s = self.saliency(x)
    pi, balance_loss = self.gates_of_scores(
        s, self.selection_scores(s, training), training)
    if balance_loss is not None:
      self.add_loss(balance_loss)
    return pi

  def gates_of_scores(self, s, scores, training=False, allowed=None):
    """(pi, balance loss or None) of saliency `s` ranked by `scores`.

    `allowed` (C_out,) 0/1, if given, restricts every sample's top-k to
    those channels (a client's round set, `compact_training`).
    """
    if allowed is not None:
      scores = tf.where(allowed > 0, scores, tf.float32.min)
    pi = s * self.top_k(scores)
    if allowed is not None:
      pi = pi * allowed
    if not (training and self.gate.balance):
      return pi, None
    return pi, self.gate.balance * gate_ops.usage_balance(s, pi)

  def _update_moving(self, mean, var, valid):
    decay = 1.0 - self.momentum
    self.moving_mean.assign_sub(
        tf.where(valid, (self.moving_mean - mean) * decay, 0.0)
    )
    self.moving_variance.assign_sub(
        tf.where(valid, (self.moving_variance - var) * decay, 0.0)
    )

  def call(self, x, training=None):
    training = bool(training)
    c = self.conv(x)
    if not self.gated:
      y = self._batch_norm(c, training)
      return tf.nn.relu(y) if self.relu else y
    pi = self.channel_gates(x, training)
    if training and self.gate.batch_stats == 'masked':
      y, mean, var, kept = gate_ops.gated_batch_norm(
          c, pi, self.gamma, self.beta, self.epsilon, self.relu
      )
      self._update_moving(mean, var, kept > 0)
      self._count_kept(kept, x)
      return y
    if training:
      self._count_kept(
          tf.reduce_sum(tf.cast(tf.not_equal(pi, 0.0), tf.float32), axis=0), x)
    z = self._batch_norm(c, training) * pi[:, tf.newaxis, tf.newaxis, :]
    return tf.nn.relu(z) if self.relu else z

  def _batch_norm(self, c, training):
    """BN over the whole batch in training (fused), else moving statistics."""
    if training:
      y, mean, var = tf.compat.v1.nn.fused_batch_norm(
          c, self.gamma, self.beta, epsilon=self.epsilon, is_training=True
      )
      self._update_moving(mean, var, tf.ones_like(mean, tf.bool))
      return y
    return tf.nn.batch_normalization(
        c, self.moving_mean, self.moving_variance, self.beta, self.gamma,
        self.epsilon,
    )

  def _count_kept(self, kept, x):
    self.kept_count.assign_add(kept)
    self.samples_seen.assign_add(tf.cast(tf.shape(x)[0], tf.float32))

  def compute_output_shape(self, input_shape):
    h, w = input_shape[1:3]
    out = lambda d: None if d is None else -(-d // self.strides)
    return tf.TensorShape([input_shape[0], out(h), out(w), self.filters])

  def get_config(self):
    config = super().get_config()
    gate = self.gate or GateSpec()
    config.update(
        filters=self.filters,
        kernel_size=self.kernel_size,
        strides=self.strides,
        gated=self.gated,
        relu=self.relu,
        momentum=self.momentum,
        epsilon=self.epsilon,
        **{k: v for k, v in gate.flags().items() if k != 'gate_stem'},
    )
    if self.fixed_channels is not None:
      config['fixed_channels'] = (
          ALL if isinstance(self.fixed_channels, str)
          else [int(c) for c in self.fixed_channels])
    return config

  @classmethod
  def from_config(cls, config):
    """The layer of a `get_config` (flat gate keys, as saved models hold)."""
    config = dict(config)
    flags = {k: config.pop(k) for k in list(config)
             if k in GateSpec.FLAG_NAMES.values()}
    gated = config.pop('gated', True)
    return cls(gate=GateSpec.from_flags(**flags) if gated else None, **config)


def conv_layers(model: tf.keras.Model) -> list[GatedConv2D]:
  """Every `GatedConv2D` of `model`, gated or not, nested ones included."""
  found = []

  def visit(layer):
    if isinstance(layer, GatedConv2D):
      found.append(layer)
    for sub in getattr(layer, 'layers', []):
      visit(sub)

  visit(model)
  return found


def gated_layers(model: tf.keras.Model) -> list[GatedConv2D]:
  """The model's gated `GatedConv2D` layers, in topological order."""
  return [l for l in conv_layers(model) if l.gated]


# Layers that act on each channel alone and keep zero channels zero.
CHANNEL_PRESERVING = (
    tf.keras.layers.MaxPool2D,
    tf.keras.layers.AveragePooling2D,
    tf.keras.layers.GlobalAveragePooling2D,
    tf.keras.layers.ReLU,
    tf.keras.layers.Dropout,
)


def inbound_layers(layer: tf.keras.layers.Layer) -> list:
  """The layers whose outputs `layer` reads in its (first) functional call."""
  inbound = layer.inbound_nodes[0].inbound_layers
  return inbound if isinstance(inbound, list) else [inbound]


def channel_source(layer: tf.keras.layers.Layer):
  """The nearest layer before `layer` other than pooling and activations.

  Its output reaches `layer`'s input channel-for-channel (a list if that
  layer has several inputs).
  """
  source = layer.inbound_nodes[0].inbound_layers
  while isinstance(source, CHANNEL_PRESERVING):
    source = source.inbound_nodes[0].inbound_layers
  return source


def feeding_gate(layer: tf.keras.layers.Layer):
  """The gated layer whose output reaches `layer`'s input channel-for-channel.

  Follows the functional graph back through pooling and activations; None if
  the input is the model input, a merge (residual addition: full width) or
  anything else.
  """
  source = channel_source(layer)
  if isinstance(source, GatedConv2D) and source.gated:
    return source
  return None
