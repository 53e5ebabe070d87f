"""The training clients of a simulated federation, round by round.

`ClientDataSource` owns who takes part in a round (`sample`: seeded by the
run's seed and the round, so a resumed run samples as an uninterrupted one)
and what each client brings (`inputs`: its shuffled batches for the round,
its keep ratio and the seed of its upload rounding), as TFF's
`tff.program.FederatedDataSource` owns a program's client data. Per-client
state is not here: `stateful_process.ClientStateProcess` keeps it.
"""

import dataclasses
from typing import Optional

from absl import logging
import numpy as np
import tensorflow as tf

from tff_fedprune import client_work
from tff_fedprune import data as data_lib
from tff_fedprune.simulation import devices
from tff_fedprune.simulation.config import ExperimentConfig


@dataclasses.dataclass(frozen=True)
class RoundClients:
  """A round's sampled clients: those that complete and those that drop."""

  completing: list[int]
  dropped: list[int]


@dataclasses.dataclass(frozen=True)
class ClientInput:
  """One client's input to a round, before any per-client state joins it."""

  client_id: int
  batches: tf.data.Dataset
  keep_ratio: float
  rounding_seed: np.ndarray
  device: Optional[np.ndarray] = None  # `client_work.DEVICE_FIELDS`.


def load_data(config: ExperimentConfig) -> data_lib.FederatedData:
  """The configured dataset, split into the configured clients."""
  source = data_lib.load_source(config.dataset, config.data_dir)
  return data_lib.federate(
      source,
      config.num_clients,
      config.partition,
      seed=config.seed,
      dirichlet_alpha=config.dirichlet_alpha,
      classes_per_client=config.classes_per_client,
  )


def sample_clients(config: ExperimentConfig, round_num: int) -> RoundClients:
  """The round's clients: seeded, identical on resume.

  `client_failure_rate` of the sampled clients (rounded, at least one
  client left) drop out, as devices lost mid-round. With
  `tier_min_keep_ratio` only clients of tiers that wide are sampled. Under
  DP each client joins with probability q (`poisson_sample`).
  """
  rng = np.random.default_rng([config.seed, round_num])
  if config.dp_noise_multiplier is not None:
    chosen = poisson_sample(config, rng)
  elif config.tier_min_keep_ratio:
    eligible = [c for c in range(config.num_clients)
                if config.keep_ratio_of(c) >= config.tier_min_keep_ratio]
    chosen = rng.choice(eligible, min(config.clients_per_round, len(eligible)),
                        False)
  else:
    chosen = rng.choice(config.num_clients, config.clients_per_round, False)
  num_dropped = max(0, min(
      int(round(config.client_failure_rate * len(chosen))), len(chosen) - 1
  ))
  dropped = rng.choice(chosen, num_dropped, replace=False)
  completing = [int(c) for c in chosen if c not in dropped]
  return RoundClients(sorted(completing), sorted(int(c) for c in dropped))


def poisson_sample(config: ExperimentConfig, rng) -> np.ndarray:
  """Each client with probability q = clients per round / clients, as DP's
  accounting assumes; a cohort beyond `cohort_rows` (six standard deviations
  above the mean) is truncated, with a warning."""
  q = config.clients_per_round / config.num_clients
  chosen = np.flatnonzero(rng.random(config.num_clients) < q)
  if len(chosen) > config.cohort_rows:
    logging.warning('Poisson cohort of %d truncated to %d clients',
                    len(chosen), config.cohort_rows)
    chosen = chosen[:config.cohort_rows]
  return chosen


class ClientDataSource:
  """Samples a configuration's clients and serves their round inputs."""

  def __init__(self, config: ExperimentConfig,
               fed_data: data_lib.FederatedData,
               federation: Optional[devices.Federation] = None):
    """`federation`: the devices, whose description a client brings when
    the round has a deadline."""
    self.config = config
    self.fed_data = fed_data
    self.federation = federation

  @property
  def element_spec(self):
    return self.fed_data.element_spec

  def sample(self, round_num: int) -> RoundClients:
    return sample_clients(self.config, round_num)

  def inputs(self, round_num: int, client_ids) -> list[ClientInput]:
    """The inputs of `client_ids` to round `round_num`."""
    config = self.config
    return [
        ClientInput(
            client_id=c,
            batches=self.fed_data.client_train_dataset(
                c, config.batch_size, config.local_epochs, config.seed,
                round_num,
            ),
            keep_ratio=config.training_keep_ratio(c, round_num),
            rounding_seed=client_work.rounding_seed(config.seed, round_num, c),
            device=self.federation.device_vector(c) if (
                self.federation and config.round_deadline_s is not None)
            else None,
        )
        for c in client_ids
    ]
