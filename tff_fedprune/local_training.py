"""Local training on one client: gated SGD, channel counts, salience mask.

`build_local_training` returns a `tf.function` that trains a Keras model from
the global weights on one client's batches at the client's keep ratio,
counting which channels its data kept (`gated_conv`), and returns the update
together with the round's salience mask (`salience`, docs/design.md
section 2).

Weight decay, the FedProx term and an optional gradient correction (SCAFFOLD)
act only on weights whose channels have been kept at least once this round,
so with momentum they never move a coordinate outside the mask: with
`salience_threshold=0` the masked update equals the true update. The
objective adds the model's own losses (the gated layers' load-balancing
loss, `gate_ops.usage_balance`) to the cross-entropy, and with
`self_distillation` the divergence from the model's own full-width output
(`_Teacher`); the reported loss is the cross-entropy.
"""

from collections.abc import Callable

import tensorflow as tf
import tensorflow_federated as tff

from tff_fedprune import algorithm
from tff_fedprune import compact_training as compact_training_lib
from tff_fedprune import gated_conv
from tff_fedprune import model_state
from tff_fedprune import salience

ModelFn = Callable[[], tf.keras.Model]


def build_local_training(
    model: tf.keras.Model,
    optimizer: tff.learning.optimizers.Optimizer,
    *,
    weight_decay: float = 0.0,
    prox_mu: float = 0.0,
    salience_threshold: float = 0.0,
    measure_accuracy: bool = False,
    compact_training: str = 'off',
    self_distillation: float = 0.0,
):
  """A function training `model` on one client's data.

  Its arguments are the initial global weights, the client's batches, its
  keep ratio (a 1-element dataset) and optionally a gradient correction.
  It returns an `algorithm.LocalResult`: the unmasked update
  `initial - trained` of the global weights, the round's salience mask, the
  examples, loss sum and local steps; with `measure_accuracy`, also the
  trained model's accuracy on the same batches (inference mode, a second
  pass), which measures how far a client fits its own data.

  `compact_training` (`compact_training.MODES`): 'off' trains the model as
  it is called (every channel, then masks); 'step' computes only the
  channels some sample of each batch keeps, 'round' those of a pre-pass
  over the client's data (`compact_training.CompactModel`). Models without
  gated layers with masked batch statistics train as 'off'.

  `self_distillation` (weight, 0: off): a client below full width adds
  that weight times KL(full-width output || its output) to each step's
  objective, the full-width output computed by the same model, without
  gradient (`_Teacher`): the widest tier taught to the narrow ones, as
  FjORD distils its widest width into the sampled ones. Its forward pass
  counts in the training FLOPs.
  """
  if compact_training not in compact_training_lib.MODES:
    raise ValueError(f'compact_training must be one of'
                     f' {compact_training_lib.MODES}, got {compact_training!r}')
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  weights = model_state.global_weights(model)
  trainable = weights.trainable
  structure = salience.ChannelStructure(model)
  forward = _Forward(model, compact_training)
  teacher = _Teacher(model) if self_distillation else None

  def local_terms(initial_trainable, correction):
    """Decay, proximal and correction gradients on kept channels only."""
    terms = []
    for i, v in enumerate(trainable):
      parts = []
      if weight_decay:
        parts.append(weight_decay * v)
      if prox_mu:
        parts.append(prox_mu * (v - initial_trainable[i]))
      if correction is not None:
        parts.append(correction[i])
      terms.append(tf.add_n(parts))
    return structure.touched(tuple(terms))

  @tf.function
  def train(initial_weights, batches, keep_ratio, correction=None,
            width_seed=None):
    """`correction` (trainable-shaped) is added to every kept gradient.

    `width_seed` (int64 [2]) seeds a FjORD client's per-step widths.
    """
    tf.nest.map_structure(lambda v, t: v.assign(t), weights, initial_weights)
    capacity = keep_ratio.reduce(1.0, lambda _, r: r)
    model_state.set_keep_ratio(model, capacity)
    model_state.reset_channel_counts(model)
    opt_state = optimizer.initialize(
        tuple(tf.TensorSpec(v.shape, v.dtype) for v in trainable)
    )
    num_examples = tf.constant(0, tf.int64)
    loss_sum = tf.constant(0.0, tf.float32)
    steps = tf.constant(0, tf.int64)
    round_sets, cost = forward.start_round(batches)
    for images, labels in batches:
      forward.draw_width(capacity, width_seed, steps)
      with tf.GradientTape() as tape:
        logits, losses, cost = forward(images, round_sets, cost)
        loss = loss_fn(labels, logits)
        if teacher is not None:
          distilled, cost = teacher(images, logits, cost)
          losses = list(losses) + [self_distillation * distilled]
        objective = tf.add_n([loss] + losses) if losses else loss
      grads = tuple(tf.convert_to_tensor(g) for g in tape.gradient(
          objective, trainable))
      if weight_decay or prox_mu or correction is not None:
        extra = local_terms(initial_weights.trainable, correction)
        grads = tuple(g + e for g, e in zip(grads, extra))
      opt_state, new_values = optimizer.next(
          opt_state, tuple(v.read_value() for v in trainable), grads
      )
      for v, t in zip(trainable, new_values):
        v.assign(t)
      n = tf.shape(labels, out_type=tf.int64)[0]
      num_examples += n
      loss_sum += loss * tf.cast(n, tf.float32)
      steps += 1
    delta = tf.nest.map_structure(
        lambda t, v: t - v.read_value(), initial_weights, weights
    )
    outputs = (
        delta,
        structure.salience_masks(salience_threshold),
        num_examples,
        loss_sum,
        steps,
        cost,
    )
    if not measure_accuracy:
      return outputs
    return outputs + (_accuracy(model, batches, num_examples),)

  def train_client(*args, **kwargs) -> algorithm.LocalResult:
    outputs = train(*args, **kwargs)
    cost = compact_training_lib.TrainingCost(*outputs[5])
    return algorithm.LocalResult(*outputs[:5], *outputs[6:], cost=cost)

  return train_client


class _Forward:
  """A training step's forward pass and its cost (`compact_training`)."""

  def __init__(self, model, mode):
    self.model = model
    self.mode = mode
    self.compact = None
    if mode != 'off' and compact_training_lib.uses_compact_path(model):
      self.compact = compact_training_lib.CompactModel(model)
    per_forward = compact_training_lib.TRAIN_FLOPS_PER_FORWARD
    self.full_flops = per_forward * compact_training_lib.forward_flops(
        model, gates=True)
    self.dense_flops = per_forward * compact_training_lib.forward_flops(
        model, gates=False)
    gated = gated_conv.gated_layers(model)
    self.widths = tf.constant([l.filters for l in gated], tf.float64)
    self.ordered_dropout = bool(gated) and gated[0].gate.policy == 'fjord'

  def draw_width(self, capacity, seed, step):
    """FjORD's ordered dropout: this step's keep ratio, drawn uniformly
    among `gated_conv.FJORD_WIDTHS` up to the client's capacity (the
    capacity itself if it is below them all)."""
    if not self.ordered_dropout:
      return
    if seed is None:
      raise ValueError('FjORD local training needs a width_seed')
    widths = tf.constant(gated_conv.FJORD_WIDTHS, tf.float32)
    allowed = widths <= capacity + 1e-6
    logits = tf.where(allowed, 0.0, -1e9)[tf.newaxis]
    step_seed = tf.random.experimental.stateless_fold_in(seed, step)
    drawn = tf.random.stateless_categorical(logits, 1, step_seed)[0, 0]
    width = tf.where(tf.reduce_any(allowed), tf.gather(widths, drawn),
                     capacity)
    model_state.set_keep_ratio(self.model, width)

  def start_round(self, batches):
    """(round sets or None, the initial cost: a round pre-pass's FLOPs)."""
    zero = tf.constant(0.0, tf.float64)
    round_sets, flops = None, zero
    if self.compact is not None and self.mode == 'round':
      round_sets, flops = self.compact.round_channels(batches)
    return round_sets, (flops, zero, tf.zeros_like(self.widths), zero, zero)

  @tf.autograph.experimental.do_not_convert
  def __call__(self, images, round_sets, cost):
    """(logits, losses, cost) of a training batch, `cost` accumulated."""
    flops, dense, computed, outside, gated = cost
    n = tf.cast(tf.shape(images)[0], tf.float64)
    dense += self.dense_flops * n
    if self.compact is None:
      logits = self.model(images, training=True)
      return logits, list(self.model.losses), (
          flops + self.full_flops * n, dense, computed + self.widths * n,
          outside, gated)
    out = self.compact(images, True, round_sets)
    computed += tf.cast(tf.stack(out.computed), tf.float64) * n
    return out.logits, out.losses, (
        flops + out.flops, dense, computed,
        outside + tf.cast(out.outside, tf.float64),
        gated + tf.cast(out.gated_pairs, tf.float64))


class _Teacher:
  """The model's own full-width output on a batch, the target of a narrow
  client's self-distillation.

  A training-mode pass (batch statistics: the averaged moving statistics of
  mixed widths are what static batch norm replaces) whose side effects on
  the model's non-trainable variables (moving moments, channel counts, the
  keep ratio) are undone: it neither trains nor counts as kept.
  """

  def __init__(self, model):
    gated = gated_conv.gated_layers(model)
    if not gated:
      raise ValueError('self-distillation needs a gated model (a width to'
                       ' distil into)')
    self.model = model
    self.width = gated[0].keep_ratio
    self.flops = compact_training_lib.forward_flops(model, gates=True)

  @tf.autograph.experimental.do_not_convert
  def __call__(self, images, logits, cost):
    """(KL(full-width output || `logits`), `cost` plus the pass's FLOPs):
    0, and nothing computed, when the model already runs at full width."""
    variables = self.model.non_trainable_variables

    def full_width():
      state = [v.read_value() for v in variables]
      with tf.control_dependencies(state):
        model_state.set_keep_ratio(self.model, 1.0)
      target = tf.stop_gradient(self.model(images, training=True))
      with tf.control_dependencies([target]):
        for v, value in zip(variables, state):
          v.assign(value)
      n = tf.cast(tf.shape(images)[0], tf.float64)
      return _divergence(target, logits), self.flops * n

    def nothing():
      return tf.constant(0.0), tf.constant(0.0, tf.float64)

    distilled, flops = tf.cond(self.width < 1.0, full_width, nothing)
    return distilled, (cost[0] + flops,) + tuple(cost[1:])


def _divergence(target_logits, logits):
  """Mean over the batch of KL(softmax(target) || softmax(logits))."""
  target = tf.nn.softmax(target_logits)
  return tf.reduce_mean(tf.reduce_sum(target * (
      tf.nn.log_softmax(target_logits) - tf.nn.log_softmax(logits)), -1))


def _accuracy(model, batches, num_examples):
  """The model's accuracy on `batches` in inference mode (a second pass)."""
  correct = tf.constant(0, tf.int64)
  for images, labels in batches:
    predicted = tf.argmax(model(images, training=False), -1, tf.int32)
    correct += tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.int64))
  return tf.math.divide_no_nan(
      tf.cast(correct, tf.float32), tf.cast(num_examples, tf.float32)
  )
