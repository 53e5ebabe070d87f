"""Runs a federated experiment: rounds, evaluation, measurements, resume.

Program state goes through `tff.program.FileProgramStateManager` (one version
per completed round), per-round measurements through TFF's CSV and TensorBoard
release managers. Within a round the metrics are released before the state is
saved, so a crash at any point either replays the round (the CSV release
replaces its row) or finds it complete: rerunning the same configuration
resumes after the last completed round with the same results.
"""

import asyncio
import collections
import csv
import dataclasses
import os
import platform
import time
from collections.abc import Callable, Mapping

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_model_optimization as tfmot
import tqdm

from tff_fedprune import client_work
from tff_fedprune import data as data_lib
from tff_fedprune import gated_conv
from tff_fedprune import learning_process
from tff_fedprune import model_state
from tff_fedprune import runtime
from tff_fedprune.simulation import client_states
from tff_fedprune.simulation import config as config_lib
from tff_fedprune.simulation import evaluation
from tff_fedprune.simulation import reporting
from tff_fedprune.simulation import run_directory
from tff_fedprune.simulation.config import ConfigError
from tff_fedprune.simulation.config import ExperimentConfig

METRIC_COLUMNS = (
    'test_accuracy',
    'test_loss',
    'personal_accuracy_mean',
    'personal_accuracy_worst10',
    'train_accuracy',
    'local_train_accuracy',
    'train_loss',
    'upload_bytes',
    'dense_upload_bytes',
    'download_bytes',
    'update_density',
    'flops_ratio',
    'gate_jaccard',
    'channels_ever_kept',
    'round_seconds',
    'clients_completed',
    'clients_dropped',
    'non_finite_updates',
)


class NonFiniteModelError(RuntimeError):
  """A round left a model that cannot be trained; its state was not saved."""


def sample_clients(
    config: ExperimentConfig, round_num: int
) -> tuple[list[int], list[int]]:
  """The round's (completing, dropped) clients: seeded, identical on resume.

  `client_failure_rate` of the sampled clients (rounded, at least one
  client left) drop out, as devices lost mid-round.
  """
  rng = np.random.default_rng([config.seed, round_num])
  chosen = rng.choice(config.num_clients, config.clients_per_round, False)
  num_dropped = min(
      int(round(config.client_failure_rate * len(chosen))), len(chosen) - 1
  )
  dropped = rng.choice(chosen, num_dropped, replace=False)
  completing = [int(c) for c in chosen if c not in dropped]
  return sorted(completing), sorted(int(c) for c in dropped)


def _num_bytes(arrays) -> int:
  return int(sum(np.asarray(a).nbytes for a in tf.nest.flatten(arrays)))


def load_data(config: ExperimentConfig) -> data_lib.FederatedData:
  source = data_lib.load_source(config.dataset, config.data_dir)
  return data_lib.federate(
      source,
      config.num_clients,
      config.partition,
      seed=config.seed,
      dirichlet_alpha=config.dirichlet_alpha,
      classes_per_client=config.classes_per_client,
  )


ModelBuilder = Callable[..., tf.keras.Model]


def run_experiment(
    config: ExperimentConfig,
    models: Mapping[str, ModelBuilder],
    progress: bool = True,
) -> dict:
  """Runs (or resumes) `config` to `total_rounds`; returns the summary.

  `models` maps each architecture name to its builder
  `(input_shape=, num_classes=, gated=, keep_ratio=, gate_input=,
  gated_bn=, gate_selection=, gate_balance=, gate_stem=) -> Model` (e.g.
  `keras_models.BUILDERS`). Raises
  `ConfigError`, `data.DataSourceError` or `data.PartitionError` before
  anything is written if the configuration or data is unusable, and
  `run_directory.RunDirectoryError` if another run is writing there.
  """
  config_lib.validate(config, tuple(models))
  config_lib.check_resumable(config)
  fed_data = load_data(config)
  workers = runtime.parse_addresses(config.workers)
  try:
    credentials = config.worker_credentials()
    tls = config.worker_tls_context()
    for address in workers:
      if tls is not None and not runtime.is_local_socket(address):
        runtime.check_worker_certificate(address, tls, timeout_s=10)
      runtime.wait_until_ready(address, timeout_s=10, credentials=credentials)
  except runtime.WorkerError as e:
    raise ConfigError(f'--workers: {e}') from e
  run_directory.prepare(config.root_output_dir, config.run_dir)
  with run_directory.exclusive_writer(config.run_dir):
    config_lib.check_resumable(config)  # Again: another writer may have run.
    run_directory.remove_stale_temporaries(config.run_dir)
    os.makedirs(os.path.join(config.run_dir, run_directory.CHECKPOINTS),
                mode=0o700, exist_ok=True)
    for name in ('config.json', run_directory.BOUND_CONFIG):
      run_directory.write_json(os.path.join(config.run_dir, name),
                               dataclasses.asdict(config))
    started = time.time()
    if workers:
      with tff.framework.get_context_stack().install(
          runtime.create_distributed_context(workers, credentials)
      ):
        summary = _train(config, models[config.model], fed_data, progress,
                         workers, credentials)
    else:
      with runtime.local_runtime(
          log_path=os.path.join(config.run_dir, 'worker.log')
      ) as worker:
        summary = _train(config, models[config.model], fed_data, progress,
                         [worker.address], None)
    summary['wall_seconds_this_invocation'] = time.time() - started
    run_directory.write_json(
        os.path.join(config.run_dir, 'summary.json'), summary
    )
  return summary


# The last learning process built, by everything it depends on: the fields
# a resumption may change do not change it, so stopping and resuming (or
# rerunning) a configuration in one Python process traces it once.
_last_process = {}
_RESUMABLE_DEFAULTS = {
    name: getattr(ExperimentConfig(), name)
    for name in config_lib.RESUMABLE_FIELDS
}


class Rounds:
  """One configuration's process, client data and evaluation: its rounds.

  `initial_state` is the process's; `run_round` is one round as
  `run_experiment` counts it in `round_seconds`: client data, `process.next`
  (local training, encoding, aggregation, server update), the per-client
  state table, and evaluation. The process is reused from the previous
  `Rounds` if that one's configuration differed only in fields a
  resumption may change.
  """

  def __init__(self, config, build_model, fed_data, worker_addresses,
               credentials):
    self.config = config
    self.fed_data = fed_data
    self._workers = worker_addresses
    self._credentials = credentials
    source = fed_data.source

    def model_fn(keep_ratio=config.keep_ratio):
      return build_model(
          input_shape=source.image_shape,
          num_classes=source.num_classes,
          gated=config.dynamic_pruning,
          keep_ratio=keep_ratio,
          gate_input=config.gate_input,
          gated_bn=config.gated_bn,
          gate_selection=config.gate_selection,
          gate_balance=config.gate_balance,
          gate_stem=config.gate_stem,
      )

    tf.keras.utils.set_random_seed(config.seed)
    key = (
        dataclasses.replace(config, experiment_name='', **_RESUMABLE_DEFAULTS),
        build_model, source.image_shape, source.num_classes,
        repr(fed_data.element_spec),
    )
    if _last_process.get('key') != key:
      _last_process.clear()
      _last_process['process'] = learning_process.build_learning_process(
          model_fn,
          fed_data.element_spec,
          client_learning_rate=config.client_learning_rate,
          client_momentum=config.client_momentum,
          weight_decay=config.weight_decay,
          algorithm=config.algorithm,
          prox_mu=config.prox_mu,
          salience_threshold=config.salience_threshold,
          aggregation=config.aggregation,
          upload_bits=config.upload_bits,
          error_feedback=config.error_feedback,
          measure_local_accuracy=config.measure_overfitting,
          num_clients=config.num_clients,
          clients_per_round=config.clients_per_round,
          server_optimizer=config.server_optimizer,
          server_learning_rate=config.server_learning_rate,
      )
      _last_process['key'] = key
    self.process = _last_process['process']
    data_type = self.process.next.type_signature.parameter[1].member
    self.table = (
        client_states.ClientStateTable(
            tff.types.type_to_tf_tensor_specs(data_type.client_state.element)
        )
        if 'client_state' in tff.structure.name_list(data_type)
        else None
    )
    self.initial_state = runtime.call_watched(
        self.process.initialize, worker_addresses, credentials=credentials
    )
    self.eval_model = model_fn(config.evaluation_keep_ratio)
    self.evaluate = evaluation.Evaluator(self.eval_model)
    self.last_evaluation = None  # Test-set evaluation of the latest round.
    self._weight_bytes = _num_bytes(
        model_state.global_weights(self.eval_model)
    )
    # SCAFFOLD's variates travel too (c down, dc_k up); error-feedback
    # residuals stay on the client.
    self._control_size = (
        _num_bytes(self.table.get(0))
        if self.table is not None and not config.error_feedback else 0
    )

  def program_state(self, state):
    """The process state, with the client state table if there is one."""
    if self.table is None:
      return state
    return {'process': state, 'client_states': self.table.to_program_state()}

  def load_program_state(self, saved):
    """The process state of `saved`; restores the client state table."""
    if self.table is None:
      return saved
    self.table.load_program_state(saved['client_states'])
    return saved['process']

  def run_round(self, state, round_num):
    """(state, metrics) after round `round_num` from `state`."""
    config, fed_data = self.config, self.fed_data
    start = time.time()
    clients, dropped = sample_clients(config, round_num)
    table, evaluate = self.table, self.evaluate
    datasets = [
        client_work.client_data(
            fed_data.client_train_dataset(
                c, config.batch_size, config.local_epochs, config.seed,
                round_num,
            ),
            config.keep_ratio_of(c),
            slot=slot,
            client_state=table.get(c) if table is not None else None,
            upload_seed=client_work.rounding_seed(config.seed, round_num, c),
        )
        for slot, c in enumerate(clients)
    ]
    try:
      output = runtime.call_watched(
          lambda: self.process.next(state, datasets), self._workers,
          credentials=self._credentials,
      )
    except runtime.WorkerError as e:
      raise runtime.WorkerError(
          f'{e} during round {round_num}; rounds up to {round_num - 1} are'
          ' checkpointed: rerun with live workers to resume'
      ) from e
    state = output.state
    if table is not None:
      table.apply(clients, state.client_work[client_work.CLIENT_STATE_UPDATES])
    weights = self.process.get_model_weights(state)
    client_metrics = output.metrics['client_work']
    upload = output.metrics['aggregator']
    if round_num % config.eval_every == 0 or round_num == config.total_rounds:
      result = evaluate(weights, fed_data.test_dataset())
      self.last_evaluation = result
      test_accuracy, test_loss = result.accuracy, result.loss
      personal_mean, personal_worst = evaluation.personalised_accuracy(
          result.correct, fed_data.client_test
      )
      flops_ratio = evaluate.flops_ratio(result)
      gate_jaccard = _mean_or_nan(result.gates.jaccard)
      ever_kept = _mean_or_nan(result.gates.ever_kept)
      train_accuracy = (
          evaluate(weights, fed_data.train_eval_dataset()).accuracy
          if config.measure_overfitting else float('nan')
      )
    else:
      self.last_evaluation = None
      test_accuracy = test_loss = flops_ratio = float('nan')
      train_accuracy = float('nan')
      personal_mean = personal_worst = float('nan')
      gate_jaccard = ever_kept = float('nan')
    dense_bytes = len(clients) * self._weight_bytes
    control_bytes = len(clients) * self._control_size
    metrics = collections.OrderedDict(
        test_accuracy=test_accuracy,
        test_loss=test_loss,
        personal_accuracy_mean=personal_mean,
        personal_accuracy_worst10=personal_worst,
        train_accuracy=train_accuracy,
        local_train_accuracy=float(
            client_metrics.get('local_train_accuracy', float('nan'))
        ),
        train_loss=float(client_metrics['train_loss']),
        upload_bytes=int(upload['upload_bytes'])
        + int(client_metrics.get('control_upload_bytes', 0)),
        dense_upload_bytes=dense_bytes + control_bytes,
        download_bytes=dense_bytes + control_bytes,
        update_density=int(upload['kept_coordinates'])
        / (len(clients) * int(upload['coordinates_per_client'])),
        flops_ratio=flops_ratio,
        gate_jaccard=gate_jaccard,
        channels_ever_kept=ever_kept,
        round_seconds=time.time() - start,
        clients_completed=len(clients),
        clients_dropped=len(dropped),
        non_finite_updates=int(client_metrics['non_finite_updates']),
    )
    return state, metrics


def _train(config, build_model, fed_data, progress, worker_addresses,
           credentials) -> dict:
  source = fed_data.source
  rounds_of = Rounds(config, build_model, fed_data, worker_addresses,
                     credentials)
  process = rounds_of.process
  run_dir = config.run_dir
  checkpoint_dir = os.path.join(run_dir, run_directory.CHECKPOINTS)
  state_manager = tff.program.FileProgramStateManager(
      checkpoint_dir, keep_total=3
  )
  csv_manager = tff.program.CSVFileReleaseManager(
      os.path.join(run_dir, 'metrics.csv'), key_fieldname='round'
  )
  tensorboard_manager = tff.program.TensorBoardReleaseManager(
      os.path.join(run_dir, 'tensorboard')
  )
  initial_state = rounds_of.initial_state
  saved, last_round = asyncio.run(run_directory.load_latest_intact(
      state_manager, rounds_of.program_state(initial_state), checkpoint_dir
  ))
  if saved is None:
    state, last_round = initial_state, 0
  else:
    state = rounds_of.load_program_state(saved)

  eval_model, evaluate = rounds_of.eval_model, rounds_of.evaluate
  weights = process.get_model_weights(state)
  history = _read_history(os.path.join(run_dir, 'metrics.csv'), last_round)

  rounds = range(last_round + 1, config.total_rounds + 1)
  bar = tqdm.tqdm(
      total=config.total_rounds, initial=last_round, desc='rounds',
      unit='round', disable=not progress,
  )
  with bar:
    for round_num in rounds:
      state, metrics = rounds_of.run_round(state, round_num)
      weights = process.get_model_weights(state)
      asyncio.run(_release(metrics, round_num, csv_manager, tensorboard_manager))
      failure = _training_failure(weights, metrics)
      if failure:
        raise NonFiniteModelError(
            f'round {round_num}: {failure} (its metrics are in metrics.csv,'
            f' its state was not saved; rounds up to {round_num - 1} are'
            ' checkpointed): lower the learning rates in a new run'
        )
      asyncio.run(
          state_manager.save(rounds_of.program_state(state), round_num)
      )
      history.append(dict(metrics, round=round_num))
      bar.set_postfix(
          acc=f'{metrics["test_accuracy"]:.3f}',
          up_MB=f'{sum(h["upload_bytes"] for h in history) / 1e6:.2f}',
      )
      bar.update(1)

  model_dir = os.path.join(run_dir, 'model')
  model_state.assign_weights(eval_model, weights)
  os.makedirs(model_dir, exist_ok=True)
  run_directory.save_keras_model(
      eval_model, os.path.join(model_dir, 'model.keras')
  )
  run_directory.write_json(
      os.path.join(model_dir, 'preprocessing.json'),
      {
          'dataset': source.name,
          'image_shape': source.image_shape,
          'mean': fed_data.mean,
          'std': fed_data.std,
      },
  )
  finished_run = reporting.load_run(
      run_dir, config=config_lib.with_defaults(dataclasses.asdict(config)))
  reporting.plot_runs([finished_run], os.path.join(run_dir, 'plots'))
  summary = _summary(config, fed_data, history)
  if config.target_accuracy is not None:
    reached = finished_run.upload_to_target(config.target_accuracy)
    summary['upload_to_target'] = {
        'target_accuracy': config.target_accuracy,
        'round': reached[0] if reached else None,
        'upload_bytes': reached[1] if reached else None,
    }
  final = rounds_of.last_evaluation  # The last round always evaluates.
  if final is None:  # Resumed with every round done.
    final = evaluate(weights, fed_data.test_dataset())
  gates = final.gates
  summary['final_gate_dynamics'] = {
      layer.name: {'jaccard': j, 'channels_ever_kept': e}
      for layer, j, e in zip(
          gated_conv.gated_layers(eval_model), gates.jaccard, gates.ever_kept
      )
  }
  return summary


def _mean_or_nan(values) -> float:
  return float(np.mean(values)) if values else float('nan')


def _training_failure(weights, metrics) -> str:
  """Why training cannot go on after a round, or '' if it can."""
  if not all(np.all(np.isfinite(w)) for w in tf.nest.flatten(weights)):
    return 'the global model is not finite'
  if metrics['non_finite_updates'] == metrics['clients_completed']:
    return "every client's update was non-finite"
  return ''


async def _release(metrics, round_num, *managers):
  await asyncio.gather(*(m.release(metrics, key=round_num) for m in managers))


def _read_history(path: str, last_round: int) -> list[dict]:
  """Rows of metrics.csv for rounds up to `last_round` (resume)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = list(csv.DictReader(f))
  history = []
  for row in rows:
    r = int(row['round'])
    if r <= last_round:
      history.append(
          {'round': r, **{k: float(row[k]) for k in METRIC_COLUMNS if k in row}}
      )
  return history


def _summary(config, fed_data, history) -> dict:
  final = history[-1] if history else {}
  evaluated = [h for h in history if not np.isnan(h['test_accuracy'])]
  return {
      'config': dataclasses.asdict(config),
      'data': fed_data.report(),
      'rounds_completed': len(history),
      'final': final,
      'best_test_accuracy': max(
          (h['test_accuracy'] for h in evaluated), default=None
      ),
      'total_upload_bytes': sum(h['upload_bytes'] for h in history),
      'total_dense_upload_bytes': sum(h['dense_upload_bytes'] for h in history),
      'total_download_bytes': sum(h['download_bytes'] for h in history),
      'total_round_seconds': sum(h['round_seconds'] for h in history),
      'total_non_finite_updates': sum(
          h.get('non_finite_updates', 0) for h in history
      ),
      'versions': {
          'python': platform.python_version(),
          'tensorflow': tf.__version__,
          'tensorflow_federated': tff.__version__,
          'tensorflow_model_optimization': tfmot.__version__,
          'numpy': np.__version__,
      },
  }
