"""Client-level differential privacy: seeded DP queries and their accounting.

docs/design.md, section 8. Each client's upload (on the server-chosen
support, `server_support`) is clipped to L2 norm S, the server sums, adds
Gaussian noise N(0, (z S)^2) to every coordinate and divides by the expected
number of clients: TFF's `tff.aggregators.DifferentiallyPrivateFactory`
around tensorflow_privacy's Gaussian (fixed clip) or quantile-adaptive
(adaptive clip) sum query. tensorflow_privacy 0.9 draws that noise unseeded;
the queries here draw it from a stateless seed carried in the query's global
state (the aggregator's state), started from the run's seed and split every
round, so a resumed run adds the same noise as an uninterrupted one. The
simulation's noise is pseudo-random for that reason; a deployment draws it
from a cryptographic generator.

Clients are Poisson-sampled with q = clients per round / clients, and the
privacy spent after r rounds is epsilon at delta = 1 / clients from
`dp_accounting`'s RDP accountant composing r Poisson-sampled Gaussians.
"""

import collections
import dataclasses
import math
from typing import Optional

import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_privacy as tfp

# Stream of the run seed the DP noise is drawn from (sampling and rounding
# use their own).
_NOISE_STREAM = 0x4450


def noise_seed(run_seed: int, noise: int = 0) -> np.ndarray:
  """The first round's seed (int64 [2]) of a run's `noise`-th noise."""
  return np.array([run_seed, _NOISE_STREAM + noise], np.int64)


def _split(seed):
  """(next round's seed, this round's seed)."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  return seeds[0], seeds[1]


class SeededGaussianSumQuery(tfp.GaussianSumQuery):
  """`tfp.GaussianSumQuery` drawing its noise from a seed in its state."""

  _GlobalState = collections.namedtuple(
      '_GlobalState', ['l2_norm_clip', 'stddev', 'seed'])

  def __init__(self, l2_norm_clip, stddev, seed: np.ndarray):
    super().__init__(l2_norm_clip, stddev)
    self._seed = seed

  def make_global_state(self, l2_norm_clip, stddev, seed=None):
    return self._GlobalState(
        tf.cast(l2_norm_clip, tf.float32), tf.cast(stddev, tf.float32),
        tf.cast(self._seed if seed is None else seed, tf.int64))

  def get_noised_result(self, sample_state, global_state):
    next_seed, round_seed = _split(global_state.seed)
    flat = tf.nest.flatten(sample_state)
    seeds = tf.random.experimental.stateless_split(round_seed, max(len(flat), 1))
    noised = [
        v + tf.random.stateless_normal(tf.shape(v), seeds[i],
                                       stddev=global_state.stddev,
                                       dtype=v.dtype)
        for i, v in enumerate(flat)
    ]
    event = dp_accounting.GaussianDpEvent(
        global_state.stddev / global_state.l2_norm_clip)
    return (tf.nest.pack_sequence_as(sample_state, noised),
            global_state._replace(seed=next_seed), event)


class SeededAdaptiveClipSumQuery(tfp.QuantileAdaptiveClipSumQuery):
  """`tfp.QuantileAdaptiveClipSumQuery` whose two noises are seeded.

  The update's noise and the clipped count's noise come from
  `SeededGaussianSumQuery`s on two seeds of `run_seed`.
  """

  def __init__(self, initial_l2_norm_clip, noise_multiplier,
               target_unclipped_quantile, learning_rate, clipped_count_stddev,
               expected_num_records, run_seed: int):
    super().__init__(initial_l2_norm_clip, noise_multiplier,
                     target_unclipped_quantile, learning_rate,
                     clipped_count_stddev, expected_num_records,
                     geometric_update=True)
    self._sum_query = SeededGaussianSumQuery(
        initial_l2_norm_clip, noise_multiplier * initial_l2_norm_clip,
        noise_seed(run_seed))
    self._quantile_estimator_query._below_estimate_query = (  # pylint: disable=protected-access
        tfp.NormalizedQuery(
            SeededGaussianSumQuery(0.5, clipped_count_stddev,
                                   noise_seed(run_seed, 1)),
            denominator=expected_num_records))

  def get_noised_result(self, sample_state, global_state):
    noised, sum_state, sum_event = self._sum_query.get_noised_result(
        sample_state.sum_state, global_state.sum_state)
    clip, quantile_state, quantile_event = (
        self._quantile_estimator_query.get_noised_result(
            sample_state.quantile_estimator_state,
            global_state.quantile_estimator_state))
    clip = tf.maximum(clip, 0.0)
    sum_state = self._sum_query.make_global_state(
        clip, clip * global_state.noise_multiplier, sum_state.seed)
    event = dp_accounting.ComposedDpEvent(events=[sum_event, quantile_event])
    return noised, self._GlobalState(
        global_state.noise_multiplier, sum_state, quantile_state), event


@dataclasses.dataclass(frozen=True)
class DpConfig:
  """Client-level DP of a run: noise multiplier z, clip S, who is sampled."""

  noise_multiplier: float
  clip: float  # With `adaptive_clip`, the initial clip.
  expected_clients: float  # q * clients: the fixed denominator.
  num_clients: int
  seed: int
  adaptive_clip: bool = False

  @property
  def sampling_probability(self) -> float:
    return self.expected_clients / self.num_clients

  @property
  def delta(self) -> float:
    return 1.0 / self.num_clients


# Share of the clip a client's channel mask may take in its record.
RATE_SHARE = 0.25


def rate_weight(dp: DpConfig, channels) -> float:
  """The scale of the channel masks in a server-support record: at most
  `RATE_SHARE` of the clip in norm, so the update keeps most of it."""
  return RATE_SHARE * dp.clip / math.sqrt(max(sum(channels), 1))


def build_dp_factory(
    dp: DpConfig,
    record_sum_factory: Optional[tff.aggregators.UnweightedAggregationFactory]
    = None,
) -> tff.aggregators.DifferentiallyPrivateFactory:
  """TFF's DP mean with seeded noise; records summed by `record_sum_factory`.

  Fixed clip: the Gaussian sum query of `gaussian_fixed`. Adaptive clip:
  that of `gaussian_adaptive` (its defaults: median target, rate 0.2,
  clipped-count noise 0.05 q N), z split between update and count by TFF's
  `adaptive_clip_noise_params`, so z stays the mechanism's total.
  """
  if dp.adaptive_clip:
    value_z, count_stddev = (
        tff.aggregators.differential_privacy.adaptive_clip_noise_params(
            dp.noise_multiplier, dp.expected_clients))
    query = SeededAdaptiveClipSumQuery(
        dp.clip, value_z, 0.5, 0.2, count_stddev, dp.expected_clients, dp.seed)
  else:
    query = SeededGaussianSumQuery(dp.clip, dp.clip * dp.noise_multiplier,
                                   noise_seed(dp.seed))
  return tff.aggregators.DifferentiallyPrivateFactory(
      tfp.NormalizedQuery(query, denominator=dp.expected_clients),
      record_aggregation_factory=record_sum_factory)


def epsilon(dp: DpConfig, rounds: int) -> float:
  """Epsilon at delta = 1 / clients after `rounds` Poisson-sampled rounds."""
  if rounds == 0:
    return 0.0
  if dp.noise_multiplier == 0:
    return math.inf
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(
      dp_accounting.PoissonSampledDpEvent(
          dp.sampling_probability,
          dp_accounting.GaussianDpEvent(dp.noise_multiplier)),
      rounds)
  return float(accountant.get_epsilon(dp.delta))
