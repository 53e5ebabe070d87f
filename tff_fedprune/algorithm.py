"""The hooks by which a federated algorithm shapes FedDP's client work.

What differs between FedAvg, FedProx, FedNova and SCAFFOLD (and error
feedback, which wraps FedAvg or FedProx) is an `Algorithm`: the state the
server broadcasts to every client (O(model)), the state each client keeps
between rounds (SCAFFOLD's c_k, error-feedback residuals: held by the driver
and handed to the client as client data), a gradient correction, the
client's output, how the server state moves, and the aggregator around the
count-aware mean. The base class is FedAvg; `FedProx` adds the proximal
term; `fednova`, `scaffold` and `error_feedback` override hooks.

Local training and each client's output pass between the client work and the
hooks as the dataclasses below, inside the client's TF computation.
"""

import collections
import dataclasses
from typing import Any, Optional

import tensorflow_federated as tff


@dataclasses.dataclass(frozen=True)
class LocalResult:
  """What one client's local training produced (`local_training`)."""

  delta: tff.learning.models.ModelWeights  # initial - trained, unmasked.
  mask: tff.learning.models.ModelWeights  # The round's salience mask.
  num_examples: Any
  loss_sum: Any
  steps: Any
  accuracy: Optional[Any] = None  # On its own batches, when measured.
  # `compact_training.TrainingCost`: FLOPs and channels computed.
  cost: Optional[Any] = None


@dataclasses.dataclass(frozen=True)
class ClientRound:
  """A client's view of its round when it forms its output."""

  local: LocalResult
  update: tff.learning.models.ModelWeights  # delta * mask.
  server_state: collections.OrderedDict
  client_state: Optional[collections.OrderedDict]
  rounding_seed: Any  # Seeds the stochastic rounding of its upload.


@dataclasses.dataclass(frozen=True)
class ClientOutput:
  """What a client hands on: its upload, result extras and state change."""

  update: tff.learning.models.ModelWeights
  extras: dict = dataclasses.field(default_factory=dict)  # Join the result.
  state_change: Optional[collections.OrderedDict] = None
  metrics: dict = dataclasses.field(default_factory=dict)  # `metric_names`.


class Algorithm:
  """A federated algorithm's hooks into the client work; as it is, FedAvg."""

  name = 'fedavg'
  prox_mu = 0.0  # The FedProx coefficient of the local loss.
  # Client metrics `client_output` adds, summed; `*_upload_bytes` count as
  # upload.
  metric_names = ()
  state_travels = False  # Client state crosses the network (SCAFFOLD).

  def server_state_spec(self, trainable_specs) -> collections.OrderedDict:
    """Specs of the state broadcast to every client (O(model))."""
    del trainable_specs
    return collections.OrderedDict()

  def client_state_spec(self, trainable_specs) -> collections.OrderedDict:
    """Specs of the state the driver keeps per client (empty: none)."""
    del trainable_specs
    return collections.OrderedDict()

  def gradient_correction(self, server_state, client_state) -> Optional[tuple]:
    """A trainable-shaped term added to every kept local gradient."""
    del server_state, client_state
    return None

  def client_output(self, client: ClientRound) -> ClientOutput:
    """The client's upload (the masked update), extras, state change."""
    return ClientOutput(client.update)

  def update_server_state(self, state, client_state_updates):
    """The new server state from the round's per-slot client state changes."""
    del client_state_updates
    return state

  def aggregator(
      self, factory: tff.aggregators.WeightedAggregationFactory
  ) -> tff.aggregators.WeightedAggregationFactory:
    """The aggregator of `OrderedDict(update, mask, **extras)` results."""
    return factory


class FedProx(Algorithm):
  """FedAvg whose local loss adds (mu / 2) ||w - w_0||^2."""

  name = 'fedprox'

  def __init__(self, prox_mu: float):
    self.prox_mu = prox_mu
