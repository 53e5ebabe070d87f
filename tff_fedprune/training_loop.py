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
import json
import os
import platform
import time
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_model_optimization as tfmot
import tqdm

import keras_models
from tff_fedprune import client_work
from tff_fedprune import data as data_lib
from tff_fedprune import evaluation
from tff_fedprune import flops
from tff_fedprune import layers
from tff_fedprune import learning_process
from tff_fedprune import reporting
from tff_fedprune import runtime

METRIC_COLUMNS = (
    'test_accuracy',
    'test_loss',
    'personal_accuracy_mean',
    'personal_accuracy_worst10',
    'train_loss',
    'upload_bytes',
    'dense_upload_bytes',
    'download_bytes',
    'update_density',
    'flops_ratio',
    'round_seconds',
    'clients_completed',
    'clients_dropped',
)
# Fields that may change between a run and its resumption.
_RESUMABLE_FIELDS = (
    'total_rounds', 'eval_every', 'root_output_dir', 'workers'
)


class ConfigError(ValueError):
  """An experiment configuration is invalid."""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything that defines a run (DESIGN.md section 3)."""

  experiment_name: str = 'quickstart'
  root_output_dir: str = '/tmp/tff_fedprune'
  dataset: str = 'digits'
  data_dir: Optional[str] = None
  model: str = 'cnn'
  algorithm: str = 'fedavg'
  dynamic_pruning: bool = False
  keep_ratio: float = 0.7
  client_keep_ratios: str = ''
  salience_threshold: float = 0.0
  prox_mu: float = 0.01
  client_failure_rate: float = 0.0
  workers: str = ''
  num_clients: int = 10
  clients_per_round: int = 10
  partition: str = 'dirichlet'
  dirichlet_alpha: float = 0.5
  classes_per_client: int = 2
  server_optimizer: str = 'sgd'
  server_learning_rate: float = 1.0
  client_learning_rate: float = 0.05
  client_momentum: float = 0.9
  weight_decay: float = 5e-4
  local_epochs: int = 1
  batch_size: int = 32
  total_rounds: int = 10
  eval_every: int = 1
  seed: int = 0

  @property
  def run_dir(self) -> str:
    return os.path.join(self.root_output_dir, self.experiment_name)

  def keep_ratio_of(self, client_id: int) -> float:
    """Client `client_id`'s keep ratio (DESIGN.md 1.4)."""
    ratios = parse_ratios(self.client_keep_ratios) or [self.keep_ratio]
    return ratios[client_id % len(ratios)]


def parse_ratios(spec: str) -> list[float]:
  """'0.5,0.7,1.0' -> [0.5, 0.7, 1.0]; raises ConfigError when malformed."""
  try:
    return [float(r) for r in spec.split(',') if r.strip()]
  except ValueError as e:
    raise ConfigError(
        f'--client_keep_ratios={spec!r} is not a list of numbers'
    ) from e


def validate(config: ExperimentConfig) -> None:
  """Raises `ConfigError` with a one-line reason if `config` is unusable."""

  def require(ok, message):
    if not ok:
      raise ConfigError(message)

  require(
      config.dataset in data_lib.SOURCES,
      f'unknown dataset {config.dataset!r}; choose from {data_lib.SOURCES}',
  )
  require(
      config.model in keras_models.MODELS,
      f'unknown model {config.model!r}; choose from {keras_models.MODELS}',
  )
  require(
      config.partition in data_lib.PARTITIONS,
      f'unknown partition {config.partition!r}; choose from'
      f' {data_lib.PARTITIONS}',
  )
  require(
      config.server_optimizer in learning_process.SERVER_OPTIMIZERS,
      f'unknown server optimizer {config.server_optimizer!r}; choose from'
      f' {learning_process.SERVER_OPTIMIZERS}',
  )
  for name in ('num_clients', 'clients_per_round', 'local_epochs',
               'batch_size', 'total_rounds', 'eval_every', 'classes_per_client'):
    value = getattr(config, name)
    require(value >= 1, f'--{name} must be >= 1, got {value}')
  require(
      config.algorithm in client_work.ALGORITHMS,
      f'unknown algorithm {config.algorithm!r}; choose from'
      f' {client_work.ALGORITHMS}',
  )
  for ratio in [config.keep_ratio] + parse_ratios(config.client_keep_ratios):
    require(0 < ratio <= 1, f'keep ratio must be in (0, 1], got {ratio}')
  require(
      0 <= config.salience_threshold < 1,
      f'--salience_threshold must be in [0, 1), got'
      f' {config.salience_threshold}',
  )
  require(config.prox_mu >= 0, f'--prox_mu must be >= 0, got {config.prox_mu}')
  require(
      0 <= config.client_failure_rate < 1,
      f'--client_failure_rate must be in [0, 1), got'
      f' {config.client_failure_rate}',
  )
  require(
      config.clients_per_round <= config.num_clients,
      f'--clients_per_round={config.clients_per_round} exceeds'
      f' --num_clients={config.num_clients}',
  )
  require(
      config.dirichlet_alpha > 0,
      f'--dirichlet_alpha must be > 0, got {config.dirichlet_alpha}',
  )
  for name in ('client_learning_rate', 'server_learning_rate'):
    value = getattr(config, name)
    require(value > 0, f'--{name} must be > 0, got {value}')
  require(
      0 <= config.client_momentum < 1,
      f'--client_momentum must be in [0, 1), got {config.client_momentum}',
  )
  require(
      config.weight_decay >= 0,
      f'--weight_decay must be >= 0, got {config.weight_decay}',
  )
  try:
    runtime.parse_addresses(config.workers)
  except ValueError as e:
    raise ConfigError(f'--workers: {e}') from e
  require(config.experiment_name, '--experiment_name must not be empty')
  require(
      os.sep not in config.experiment_name,
      f'--experiment_name must not contain {os.sep!r}',
  )
  for path in (config.root_output_dir, config.run_dir):
    require(
        not os.path.exists(path) or os.path.isdir(path),
        f'output path {path} exists and is not a directory',
    )


def _check_resumable(config: ExperimentConfig) -> None:
  """Refuses to resume a run directory that holds another configuration."""
  path = os.path.join(config.run_dir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  current = dataclasses.asdict(config)
  changed = sorted(
      k
      for k in set(saved) | set(current)
      if k not in _RESUMABLE_FIELDS and saved.get(k) != current.get(k)
  )
  if changed:
    raise ConfigError(
        f'{config.run_dir} holds a run with different {", ".join(changed)};'
        ' use another --experiment_name or --root_output_dir'
    )


def _write_json(path: str, value) -> None:
  """Writes JSON atomically (temporary file, then rename)."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, default=_json_default)
  os.replace(tmp, path)


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f'not JSON serialisable: {type(value)}')


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


def run_experiment(config: ExperimentConfig, progress: bool = True) -> dict:
  """Runs (or resumes) `config` to `total_rounds`; returns the summary.

  Raises `ConfigError`, `data.DataSourceError` or `data.PartitionError`
  before anything is written if the configuration or data is unusable.
  """
  validate(config)
  _check_resumable(config)
  fed_data = load_data(config)
  workers = runtime.parse_addresses(config.workers)
  for address in workers:
    try:
      runtime.wait_until_ready(address, timeout_s=10)
    except runtime.WorkerError as e:
      raise ConfigError(f'--workers: {e}') from e
  os.makedirs(config.run_dir, exist_ok=True)
  _write_json(
      os.path.join(config.run_dir, 'config.json'), dataclasses.asdict(config)
  )
  started = time.time()
  if workers:
    with tff.framework.get_context_stack().install(
        runtime.create_distributed_context(workers)
    ):
      summary = _train(config, fed_data, progress, workers)
  else:
    with runtime.local_runtime(
        log_path=os.path.join(config.run_dir, 'worker.log')
    ) as worker:
      summary = _train(config, fed_data, progress, [worker.address])
  summary['wall_seconds_this_invocation'] = time.time() - started
  _write_json(os.path.join(config.run_dir, 'summary.json'), summary)
  return summary


def _train(config, fed_data, progress, worker_addresses) -> dict:
  source = fed_data.source

  def model_fn():
    return keras_models.build_model(
        config.model,
        source.image_shape,
        source.num_classes,
        gated=config.dynamic_pruning,
        keep_ratio=config.keep_ratio,
    )

  tf.keras.utils.set_random_seed(config.seed)
  process = learning_process.build_learning_process(
      model_fn,
      fed_data.element_spec,
      client_learning_rate=config.client_learning_rate,
      client_momentum=config.client_momentum,
      weight_decay=config.weight_decay,
      algorithm=config.algorithm,
      prox_mu=config.prox_mu,
      salience_threshold=config.salience_threshold,
      num_clients=config.num_clients,
      server_optimizer=config.server_optimizer,
      server_learning_rate=config.server_learning_rate,
  )
  run_dir = config.run_dir
  state_manager = tff.program.FileProgramStateManager(
      os.path.join(run_dir, 'checkpoints'), keep_total=3
  )
  csv_manager = tff.program.CSVFileReleaseManager(
      os.path.join(run_dir, 'metrics.csv'), key_fieldname='round'
  )
  tensorboard_manager = tff.program.TensorBoardReleaseManager(
      os.path.join(run_dir, 'tensorboard')
  )
  initial_state = runtime.call_watched(process.initialize, worker_addresses)
  state, last_round = asyncio.run(state_manager.load_latest(initial_state))
  if state is None:
    state, last_round = initial_state, 0

  eval_model = model_fn()
  evaluate = evaluation.Evaluator(eval_model)
  weights = process.get_model_weights(state)
  weight_bytes = _num_bytes(weights)
  control_size = (
      _num_bytes(weights.trainable) if config.algorithm == 'scaffold' else 0
  )
  history = _read_history(os.path.join(run_dir, 'metrics.csv'), last_round)

  rounds = range(last_round + 1, config.total_rounds + 1)
  bar = tqdm.tqdm(
      total=config.total_rounds, initial=last_round, desc='rounds',
      unit='round', disable=not progress,
  )
  with bar:
    for round_num in rounds:
      start = time.time()
      clients, dropped = sample_clients(config, round_num)
      datasets = [
          client_work.client_data(
              fed_data.client_train_dataset(
                  c, config.batch_size, config.local_epochs, config.seed,
                  round_num,
              ),
              config.keep_ratio_of(c),
              client_id=c,
          )
          for c in clients
      ]
      try:
        output = runtime.call_watched(
            lambda: process.next(state, datasets), worker_addresses
        )
      except runtime.WorkerError as e:
        raise runtime.WorkerError(
            f'{e} during round {round_num}; rounds up to {round_num - 1} are'
            ' checkpointed: rerun with live workers to resume'
        ) from e
      state = output.state
      weights = process.get_model_weights(state)
      client_metrics = output.metrics['client_work']
      upload = output.metrics['aggregator']
      if round_num % config.eval_every == 0 or round_num == config.total_rounds:
        test_accuracy, test_loss, correct = evaluate(
            weights, fed_data.test_dataset()
        )
        personal_mean, personal_worst = evaluation.personalised_accuracy(
            correct, fed_data.client_test
        )
        flops_ratio = flops.dynamic_flops_ratio(
            eval_model, fed_data.test_dataset()
        )
      else:
        test_accuracy = test_loss = flops_ratio = float('nan')
        personal_mean = personal_worst = float('nan')
      dense_bytes = len(clients) * weight_bytes
      # SCAFFOLD's control variates travel too: c down, dc_k up (encoded).
      control_bytes = len(clients) * control_size
      metrics = collections.OrderedDict(
          test_accuracy=test_accuracy,
          test_loss=test_loss,
          personal_accuracy_mean=personal_mean,
          personal_accuracy_worst10=personal_worst,
          train_loss=float(client_metrics['train_loss']),
          upload_bytes=int(upload['upload_bytes'])
          + int(client_metrics.get('control_upload_bytes', 0)),
          dense_upload_bytes=dense_bytes + control_bytes,
          download_bytes=dense_bytes + control_bytes,
          update_density=int(upload['kept_coordinates'])
          / (len(clients) * int(upload['coordinates_per_client'])),
          flops_ratio=flops_ratio,
          round_seconds=time.time() - start,
          clients_completed=len(clients),
          clients_dropped=len(dropped),
      )
      asyncio.run(_release(metrics, round_num, csv_manager, tensorboard_manager))
      asyncio.run(state_manager.save(state, round_num))
      history.append(dict(metrics, round=round_num))
      bar.set_postfix(
          acc=f'{test_accuracy:.3f}',
          up_MB=f'{sum(h["upload_bytes"] for h in history) / 1e6:.2f}',
      )
      bar.update(1)

  model_dir = os.path.join(run_dir, 'model')
  layers.assign_weights(eval_model, weights)
  os.makedirs(model_dir, exist_ok=True)
  eval_model.save(os.path.join(model_dir, 'model.keras'))
  _write_json(
      os.path.join(model_dir, 'preprocessing.json'),
      {
          'dataset': source.name,
          'image_shape': source.image_shape,
          'mean': fed_data.mean,
          'std': fed_data.std,
      },
  )
  reporting.plot_runs(
      [reporting.load_run(run_dir)], os.path.join(run_dir, 'plots')
  )
  return _summary(config, fed_data, history)


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
      'versions': {
          'python': platform.python_version(),
          'tensorflow': tf.__version__,
          'tensorflow_federated': tff.__version__,
          'tensorflow_model_optimization': tfmot.__version__,
          'numpy': np.__version__,
      },
  }
