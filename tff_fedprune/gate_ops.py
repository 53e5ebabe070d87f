"""The tensor operations of a channel gate (`gated_conv.GatedConv2D`).

docs/design.md, section 1. `top_k_mask` keeps each sample's k best channels;
`relative_scores` ranks them by their input-dependent part; `usage_balance`
is the load-balancing loss. A channel that a gate pruned for a sample is
never computed for it, so it takes no part in that channel's batch
statistics: `gated_batch_norm` takes the moments of channel j over the
samples that keep j, and its custom gradient is exact for this (a pruned
pair sends exactly zero gradient to the channel's kernel slice, BN scale and
shift).
"""

import tensorflow as tf


def gated_batch_norm(c, pi, gamma, beta, epsilon, relu):
  """Training-mode BN over the kept (sample, channel) pairs, gated by pi.

  The moments of channel j are taken over the samples whose gate pi_j is
  non-zero. Since pi >= 0, ReLU(BN(c) * pi) = ReLU(BN(c)) * pi, so the
  forward pass is TF's fused batch norm with the masked moments (one kernel,
  per-channel affine) and one multiplication by pi; the backward pass is
  `ReluGrad`, two per-(sample, channel) reductions and one
  `dz * A + c * C + D` with per-(sample, channel) A, C and D (C and D vanish
  for pruned pairs). Plain TF ops: TFF's worker binary has no XLA JIT (it
  runs `jit_compile` functions unfused), and passes over the activations are
  what a training step pays for here.

  Args:
    c: conv output (B, H, W, C).
    pi: gate values (B, C), 0 where pruned.
    gamma: BN scale (C,).
    beta: BN shift (C,).
    epsilon: BN epsilon.
    relu: whether a ReLU follows the gating.

  Returns:
    (y, batch_mean, batch_var, kept_count): the block output, the masked
    mean and unbiased variance (for the moving statistics) and the number of
    kept samples per channel. Only `y` carries a gradient.
  """

  @tf.custom_gradient
  def forward(c, pi, gamma, beta):
    y, mean, rstd, n, unbiased, kept = _masked_bn_forward(
        c, pi, gamma, beta, epsilon, relu
    )

    def grad(dy, *unused_grads):
      return _masked_bn_backward(dy, y, c, pi, gamma, beta, mean, rstd, n,
                                 relu)

    return (y, mean, unbiased, kept), grad

  y, mean, var, kept = forward(c, pi, gamma, beta)
  return (
      y,
      tf.stop_gradient(mean),
      tf.stop_gradient(var),
      tf.stop_gradient(kept),
  )


def _masked_bn_forward(c, pi, gamma, beta, epsilon, relu):
  """y and the masked moments of `gated_batch_norm`."""
  m = tf.cast(tf.not_equal(pi, 0.0), c.dtype)
  hw = tf.cast(tf.shape(c)[1] * tf.shape(c)[2], c.dtype)
  kept = tf.reduce_sum(m, axis=0)
  n = tf.maximum(kept * hw, 1.0)
  s1 = tf.reduce_sum(c, axis=[1, 2])
  s2 = tf.square(tf.math.reduce_euclidean_norm(c, axis=[1, 2]))
  mean = tf.reduce_sum(m * s1, axis=0) / n
  var = tf.maximum(tf.reduce_sum(m * s2, axis=0) / n - tf.square(mean), 0.0)
  u = tf.raw_ops.FusedBatchNormV3(
      x=c, scale=gamma, offset=beta, mean=mean, variance=var,
      epsilon=epsilon, is_training=False,
  ).y
  y = (tf.nn.relu(u) if relu else u) * pi[:, None, None, :]
  unbiased = var * n / tf.maximum(n - 1.0, 1.0)
  return y, mean, tf.math.rsqrt(var + epsilon), n, unbiased, kept


def _masked_bn_backward(dy, y, c, pi, gamma, beta, mean, rstd, n, relu):
  """(dc, dpi, dgamma, dbeta) of `gated_batch_norm`."""
  m = tf.cast(tf.not_equal(pi, 0.0), c.dtype)
  scale = gamma * rstd
  a = scale * pi
  dz = tf.raw_ops.ReluGrad(gradients=dy, features=y) if relu else dy
  p1 = tf.reduce_sum(dz, axis=[1, 2])
  p2 = tf.reduce_sum(dz * c, axis=[1, 2])
  # sum_hw dz * xhat for each (sample, channel).
  q = rstd * (p2 - mean * p1)
  dbeta = tf.reduce_sum(pi * p1, axis=0)
  dgamma = tf.reduce_sum(pi * q, axis=0)
  dpi = (gamma * q + beta * p1) * m
  cc = -m * (scale * rstd * dgamma / n)
  dd = -m * (scale / n) * (dbeta - mean * rstd * dgamma)
  dc = dz * a[:, None, None, :] + c * cc[:, None, None, :] + dd[:, None, None, :]
  return dc, dpi, dgamma, dbeta


def top_k_mask(scores, k):
  """1.0 on the k largest entries of each row (ties: lowest index), else 0.

  `scores` is (rows, depth); the ones are scattered (rows * k writes).
  """
  indices = tf.math.top_k(scores, k=k, sorted=False).indices
  rows, depth = tf.unstack(tf.shape(scores))
  flat = indices + depth * tf.range(rows)[:, tf.newaxis]
  mask = tf.scatter_nd(
      tf.reshape(flat, [-1, 1]), tf.ones([rows * k], scores.dtype),
      [rows * depth],
  )
  return tf.reshape(mask, [rows, depth])


def usage_balance(s, pi):
  """The load-balancing loss of a gated layer's batch (1 when balanced).

  C * sum_j f_j * P_j, as the Switch Transformer balances its experts:
  f_j is channel j's share of the kept (sample, channel) pairs (no gradient)
  and P_j its mean share of each sample's saliency. It is smallest, 1, when
  every channel is kept equally often, which forces the kept sets to differ
  between inputs, and its gradient lowers the saliency of the channels kept
  most often.
  """
  kept = tf.reduce_sum(tf.cast(tf.not_equal(pi, 0.0), s.dtype), axis=0)
  usage = tf.stop_gradient(kept / tf.maximum(tf.reduce_sum(kept), 1.0))
  share = s / tf.maximum(tf.reduce_sum(s, axis=-1, keepdims=True), 1e-12)
  channels = tf.cast(tf.shape(s)[-1], s.dtype)
  return channels * tf.reduce_sum(usage * tf.reduce_mean(share, axis=0))


def relative_scores(s, mean, variance, selection: str, epsilon: float):
  """Scores of 'centered' or 'standardized' selection; -inf-like where s = 0."""
  score = s - mean
  if selection == 'standardized':
    score = score * tf.math.rsqrt(variance + epsilon)
  return tf.where(s > 0, score, tf.float32.min)
