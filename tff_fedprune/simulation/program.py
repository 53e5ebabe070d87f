"""The training program: rounds, their metrics, releases and saved state.

`train_model` has the shape of `tff.learning.programs.train_model`: it is
handed the process, the data source, the program-state manager, the release
managers of the per-round metrics and the evaluation, resumes from the
latest intact saved state, and runs the remaining rounds. It differs where
calling TFF's would change the outputs: no round-0 state is saved, the
evaluation of a round is part of that round's metrics (one `metrics.csv`
row), and a round whose model is not finite stops the program before its
state is saved. Within a round the metrics are released before the state is
saved, so a crash at any point either replays the round (the CSV release
replaces its row) or finds it complete.
"""

import asyncio
import collections
import csv
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tqdm

from tff_fedprune import aggregation
from tff_fedprune import client_work
from tff_fedprune import privacy
from tff_fedprune import runtime
from tff_fedprune.simulation import data_source as data_source_lib
from tff_fedprune.simulation import devices
from tff_fedprune.simulation import evaluation as evaluation_lib
from tff_fedprune.simulation import round_rows
from tff_fedprune.simulation import stateful_process


@dataclasses.dataclass(frozen=True)
class RoundMetrics:
  """One round's row of `metrics.csv` (its fields are the columns)."""

  test_accuracy: float
  test_loss: float
  personal_accuracy_mean: float
  personal_accuracy_worst10: float
  train_accuracy: float
  local_train_accuracy: float
  train_loss: float
  upload_bytes: int
  dense_upload_bytes: int
  bits_per_parameter: float  # 32 * upload_bytes / dense_upload_bytes.
  download_bytes: int
  update_density: float
  flops_ratio: float
  train_flops_ratio: float
  round_set_outside_share: float
  gate_jaccard: float
  channels_ever_kept: float
  round_seconds: float
  simulated_round_seconds: float  # nan without --device_tiers.
  simulated_seconds: float  # Cumulative.
  clients_completed: int
  clients_dropped: int
  clients_late: int  # Missed --round_deadline_s: left out of the aggregate.
  non_finite_updates: int
  # Epsilon spent so far at delta = 1 / clients (nan without DP; inf at
  # noise 0).
  dp_epsilon: float
  # Device tier label -> test accuracy (`evaluation.tier_column` columns).
  tier_test_accuracy: dict = dataclasses.field(default_factory=dict)

  def release_value(self) -> collections.OrderedDict:
    """The metrics.csv row: the fields, the tier mapping flattened."""
    values = collections.OrderedDict(dataclasses.asdict(self))
    for label, accuracy in values.pop('tier_test_accuracy').items():
      values[evaluation_lib.tier_column(label)] = accuracy
    return values


COLUMNS = tuple(f.name for f in dataclasses.fields(RoundMetrics)
                if f.name != 'tier_test_accuracy')


def bits_per_parameter(upload_bytes: int, dense_upload_bytes: int) -> float:
  """Uploaded bits per dense parameter and client: a float32 upload is 32."""
  if not dense_upload_bytes:
    return math.nan
  return 32 * upload_bytes / dense_upload_bytes


class NonFiniteModelError(RuntimeError):
  """A round left a model that cannot be trained; its state was not saved."""


@dataclasses.dataclass(frozen=True)
class Traffic:
  """Dense bytes each sampled client would exchange each way in a round."""

  model_bytes: int  # The global weights.
  state_bytes: int  # Per-client state that travels (SCAFFOLD's variates).

  @property
  def per_client(self) -> int:
    return self.model_bytes + self.state_bytes


@dataclasses.dataclass(frozen=True)
class RoundCosts:
  """What the round's local training computed (`compact_training`)."""

  train_flops_ratio: float  # Mean over clients of train / dense FLOPs.
  round_set_outside_share: float  # nan unless --compact_training=round.
  clients: list  # `round_rows.ClientRow`s.
  layers: list  # `round_rows.LayerRow`s.


def round_costs(round_num, inputs, client_metrics, upload, gated_layers,
                federation: Optional[devices.Federation] = None,
                dense_download_bytes: int = 0) -> RoundCosts:
  """The costs of a round whose clients were `inputs`, in slot order.

  `gated_layers`: (name, output channels) of the model's gated layers.
  With a `federation`, each client's download and simulated seconds are
  its tier's; without, every client downloads `dense_download_bytes`.
  """
  table = client_metrics[client_work.CLIENT_COSTS]
  sent = upload[aggregation.CLIENT_UPLOAD_BYTES]
  clients = []
  for slot, i in enumerate(inputs):
    row = dict(
        round=round_num, client=i.client_id, keep_ratio=i.keep_ratio,
        train_flops=float(table[slot][0]),
        dense_train_flops=float(table[slot][1]),
        upload_bytes=int(sent[slot]) + int(table[slot][2]),
        download_bytes=dense_download_bytes, tier='',
        simulated_seconds=math.nan)
    if federation is not None:
      row.update(
          download_bytes=federation.download_of(i.client_id),
          tier=federation.tier_of(i.client_id).label,
          simulated_seconds=federation.seconds(
              i.client_id, row['train_flops'], row['upload_bytes']).total)
    clients.append(round_rows.ClientRow(**row))
  ratios = [c.train_flops / c.dense_train_flops for c in clients
            if c.dense_train_flops > 0]
  examples = float(client_metrics['trained_examples'])
  layers = [round_rows.LayerRow(
      round=round_num, layer=name,
      computed_share=float(computed) / (width * examples) if examples else
      math.nan,
  ) for (name, width), computed in zip(
      gated_layers, client_metrics['computed_channels'])]
  gated_pairs = float(client_metrics['round_set_gated_pairs'])
  return RoundCosts(
      train_flops_ratio=float(np.mean(ratios)) if ratios else math.nan,
      round_set_outside_share=(
          float(client_metrics['round_set_outside_pairs']) / gated_pairs
          if gated_pairs else math.nan),
      clients=clients, layers=layers,
  )


@dataclasses.dataclass
class RoundRunner:
  """One round as `round_seconds` counts it.

  Client data, `process.next` (local training, encoding, aggregation, server
  update), the per-client state table and the evaluation. `call` runs the
  process's computations (e.g. `runtime.call_watched` on the workers).
  """

  process: stateful_process.ClientStateProcess
  data_source: data_source_lib.ClientDataSource
  evaluation: evaluation_lib.RoundEvaluation
  traffic: Traffic
  call: Callable[[Callable[[], Any]], Any] = lambda computation: computation()
  gated_layers: tuple = ()  # (name, output channels) of the gated layers.
  federation: Optional[devices.Federation] = None
  round_deadline_s: Optional[float] = None
  dp: Optional[privacy.DpConfig] = None  # Accounts `dp_epsilon`.

  def __call__(self, state, round_num: int) -> 'RoundOutput':
    """The round's new state, global weights, metrics and evaluation."""
    start = time.time()
    clients = self.data_source.sample(round_num)
    inputs = self.data_source.inputs(round_num, clients.completing)
    try:
      output = self.call(lambda: self.process.next(state, inputs))
      weights = self.call(
          lambda: self.process.get_model_weights(output.state))
    except runtime.WorkerError as e:
      raise runtime.WorkerError(
          f'{e} during round {round_num}; rounds up to {round_num - 1} are'
          ' checkpointed: rerun with live workers to resume'
      ) from e
    model, result = self.evaluation(weights, round_num)
    client_metrics = output.metrics['client_work']
    upload = output.metrics['aggregator']
    completed = len(clients.completing)
    dense_bytes = completed * self.traffic.per_client
    upload_bytes = int(upload['upload_bytes']) + _client_upload_bytes(
        client_metrics)
    costs = round_costs(round_num, inputs, client_metrics, upload,
                        self.gated_layers, self.federation,
                        self.traffic.per_client)
    metrics = RoundMetrics(
        **dataclasses.asdict(model),
        train_flops_ratio=costs.train_flops_ratio,
        round_set_outside_share=costs.round_set_outside_share,
        local_train_accuracy=float(
            client_metrics.get('local_train_accuracy', math.nan)
        ),
        train_loss=float(client_metrics['train_loss']),
        upload_bytes=upload_bytes,
        dense_upload_bytes=dense_bytes,
        bits_per_parameter=bits_per_parameter(upload_bytes, dense_bytes),
        download_bytes=sum(c.download_bytes for c in costs.clients),
        update_density=int(upload['kept_coordinates'])
        / max(1, completed * int(upload['coordinates_per_client'])),
        round_seconds=time.time() - start,
        simulated_round_seconds=simulated_round_seconds(
            costs.clients, self.round_deadline_s),
        simulated_seconds=math.nan,  # Cumulated by `train_model`.
        clients_completed=completed,
        clients_dropped=len(clients.dropped),
        clients_late=int(upload.get('clients_late', 0)),
        non_finite_updates=int(client_metrics['non_finite_updates']),
        dp_epsilon=privacy.epsilon(self.dp, round_num) if self.dp
        else math.nan,
    )
    return RoundOutput(output.state, weights, metrics, result, costs)


@dataclasses.dataclass(frozen=True)
class RoundOutput:
  """What one round left: state, global weights, metrics, evaluation."""

  state: Any
  weights: Any
  metrics: RoundMetrics
  evaluation: Optional[evaluation_lib.Evaluation]  # None if not evaluated.
  costs: RoundCosts


def simulated_round_seconds(clients, deadline_s=None) -> float:
  """The slowest client's simulated seconds (nan without device tiers).

  With a deadline, a round some client misses lasts the deadline.
  """
  seconds = max((c.simulated_seconds for c in clients), default=math.nan)
  if deadline_s is not None and seconds > deadline_s:
    return float(deadline_s)
  return seconds


def _client_upload_bytes(client_metrics) -> int:
  """What clients upload beside the aggregated update (`*_upload_bytes`)."""
  return sum(int(v) for k, v in client_metrics.items()
             if k.endswith('_upload_bytes'))


@dataclasses.dataclass(frozen=True)
class TrainingResult:
  """Where `train_model` left the run."""

  state: Any
  weights: Any  # The global model's weights in `state`.
  history: list[dict]  # Every completed round's metrics, with its number.
  last_evaluation: Optional[evaluation_lib.Evaluation]  # None if no round ran.


def train_model(
    *,
    train_process: stateful_process.ClientStateProcess,
    train_data_source: data_source_lib.ClientDataSource,
    train_total_rounds: int,
    program_state_manager: tff.program.ProgramStateManager,
    train_metrics_managers: Sequence[tff.program.ReleaseManager],
    client_costs_managers: Sequence[tff.program.ReleaseManager] = (),
    layer_costs_managers: Sequence[tff.program.ReleaseManager] = (),
    evaluation: evaluation_lib.RoundEvaluation,
    traffic: Traffic,
    initial_state,
    metrics_csv: str,
    call: Callable[[Callable[[], Any]], Any] = lambda computation: (
        computation()),
    progress: bool = True,
    gated_layers: tuple = (),
    federation: Optional[devices.Federation] = None,
    round_deadline_s: Optional[float] = None,
    dp: Optional[privacy.DpConfig] = None,
) -> TrainingResult:
  """Resumes from the latest intact saved state and trains to the last round.

  `metrics_csv` is the CSV the managers release to, from which the history
  of the rounds done before resuming is read. The cost managers receive
  each round's `round_rows.ClientRow`s and `LayerRow`s (of `gated_layers`,
  (name, output channels) of the model's gated layers). With a
  `federation` each round's simulated seconds are measured
  (`simulated_round_seconds`). With `dp` each round's `dp_epsilon` is
  the privacy spent up to it.
  """
  run_round = RoundRunner(train_process, train_data_source, evaluation,
                          traffic, call, gated_layers, federation,
                          round_deadline_s, dp)
  state, last_round = _resume(train_process, program_state_manager,
                              initial_state)
  history = read_history(metrics_csv, last_round)
  last_evaluation = weights = None
  bar = tqdm.tqdm(
      total=train_total_rounds, initial=last_round, desc='rounds',
      unit='round', disable=not progress,
  )
  with bar:
    for round_num in range(last_round + 1, train_total_rounds + 1):
      done = run_round(state, round_num)
      state, weights = done.state, done.weights
      metrics = dataclasses.replace(
          done.metrics, simulated_seconds=done.metrics.simulated_round_seconds
          + (history[-1].get('simulated_seconds', math.nan) if history
             else 0.0))
      last_evaluation = done.evaluation
      values = metrics.release_value()
      asyncio.run(_release(values, round_num, train_metrics_managers))
      asyncio.run(_release(done.costs.clients, round_num,
                           client_costs_managers))
      asyncio.run(_release(done.costs.layers, round_num, layer_costs_managers))
      _check_trainable(weights, metrics, round_num)
      asyncio.run(program_state_manager.save(
          train_process.program_state(state), round_num))
      history.append(dict(values, round=round_num))
      bar.set_postfix(
          acc=f'{metrics.test_accuracy:.3f}',
          up_MB=f'{sum(h["upload_bytes"] for h in history) / 1e6:.2f}',
      )
      bar.update(1)
  if weights is None:  # Resumed with every round done.
    weights = call(lambda: train_process.get_model_weights(state))
  return TrainingResult(state, weights, history, last_evaluation)


def _resume(process, program_state_manager, initial_state):
  """(state, last completed round) from the latest intact saved state."""
  saved, last_round = asyncio.run(program_state_manager.load_latest(
      process.program_state(initial_state)))
  if saved is None:
    return initial_state, 0
  return process.load_program_state(saved), last_round


def _check_trainable(weights, metrics: RoundMetrics, round_num: int) -> None:
  """Raises `NonFiniteModelError` if training cannot go on after the round."""
  if not all(np.all(np.isfinite(w)) for w in tf.nest.flatten(weights)):
    failure = 'the global model is not finite'
  elif metrics.non_finite_updates == metrics.clients_completed:
    failure = "every client's update was non-finite"
  else:
    return
  raise NonFiniteModelError(
      f'round {round_num}: {failure} (its metrics are in metrics.csv,'
      f' its state was not saved; rounds up to {round_num - 1} are'
      ' checkpointed): lower the learning rates in a new run'
  )


async def _release(values, round_num, managers):
  await asyncio.gather(*(m.release(values, key=round_num) for m in managers))


def read_history(path: str, last_round: int) -> list[dict]:
  """Rows of metrics.csv for rounds up to `last_round` (resume)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = list(csv.DictReader(f))
  history = []
  for row in rows:
    r = int(row['round'])
    if r <= last_round:
      history.append({'round': r, **{
          k: float(v) if v != '' else math.nan for k, v in row.items()
          if k in COLUMNS or k.startswith(evaluation_lib.TIER_ACCURACY_PREFIX)
      }})
  return history
