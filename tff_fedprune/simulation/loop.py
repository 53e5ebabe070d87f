"""Runs a federated experiment: the run directory, the program, the outputs.

`run_experiment` checks the configuration, data and workers before writing
anything, takes the run directory, builds the program's parts (the learning
process and its per-client state, the client data source, the evaluation)
and hands them to `program.train_model`; it then saves the global model,
its preprocessing, the plots and `summary.json`. Program state goes through
`tff.program.FileProgramStateManager` (one version per completed round),
per-round measurements through TFF's CSV and TensorBoard release managers:
rerunning the same configuration resumes after the last completed round
with the same results.
"""

import collections
import dataclasses
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_model_optimization as tfmot

from tff_fedprune import algorithm as algorithm_lib
from tff_fedprune import data as data_lib
from tff_fedprune import encoding
from tff_fedprune import gated_conv
from tff_fedprune import learning_process
from tff_fedprune import model_state
from tff_fedprune import privacy
from tff_fedprune import runtime
from tff_fedprune import salience
from tff_fedprune import secure_sum
from tff_fedprune import server_support
from tff_fedprune.simulation import config as config_lib
from tff_fedprune.simulation import data_source as data_source_lib
from tff_fedprune.simulation import devices
from tff_fedprune.simulation import evaluation
from tff_fedprune.simulation import program
from tff_fedprune.simulation import reporting
from tff_fedprune.simulation import round_rows
from tff_fedprune.simulation import run_directory
from tff_fedprune.simulation import stateful_process
from tff_fedprune.simulation.config import ConfigError
from tff_fedprune.simulation.config import ExperimentConfig

CLIENTS_CSV = 'clients.csv'  # Per client and round (`round_rows.ClientRow`).
LAYERS_CSV = 'layers.csv'  # Per gated layer and round (`round_rows.LayerRow`).

ModelBuilder = Callable[..., tf.keras.Model]


def _num_bytes(arrays) -> int:
  return int(sum(np.asarray(a).nbytes for a in tf.nest.flatten(arrays)))


def model_fn_of(config: ExperimentConfig, build_model: ModelBuilder,
                source) -> Callable[..., tf.keras.Model]:
  """`model_fn(keep_ratio=config.keep_ratio)` of the configured model."""

  def model_fn(keep_ratio=config.keep_ratio):
    return build_model(
        input_shape=source.image_shape,
        num_classes=source.num_classes,
        gate=config.gate(keep_ratio),
    )

  return model_fn


def _process_key(config: ExperimentConfig) -> ExperimentConfig:
  """`config` less the fields a resumption or another directory may change."""
  defaults = ExperimentConfig()
  return dataclasses.replace(
      config, experiment_name='',
      **{name: getattr(defaults, name)
         for name in config_lib.RESUMABLE_FIELDS},
  )


@dataclasses.dataclass(frozen=True)
class BuiltProcess:
  """A configuration's learning process, reusable by `run_experiment`.

  It serves every configuration that differs from the one it was built for
  only in fields a resumption may change, the experiment name and the
  output root (`serves`), so resuming or rerunning in one Python process
  need not trace it again.
  """

  process: tff.learning.templates.LearningProcess
  algorithm: algorithm_lib.Algorithm
  built_for: ExperimentConfig

  def serves(self, config: ExperimentConfig) -> bool:
    return _process_key(config) == self.built_for


def upload_values(config: ExperimentConfig) -> encoding.ValueFormat:
  """How `config`'s clients code their uploaded values."""
  return encoding.ValueFormat.for_upload(
      config.upload_bits, config.upload_rotation, config.error_feedback,
      config.upload_rotation_block)


def model_aggregator(config: ExperimentConfig, model_fn):
  """The server-support aggregator of `config` (DP, secure sums), or None
  for the count-aware sparse mean."""
  dp = config.dp()
  if dp is None and config.upload_support == 'client':
    return None
  layout = server_support.SupportLayout.of_model(model_fn(), config.keep_ratio)
  record_sum, value_bits = None, 32
  if config.upload_bits < 32:
    record_sum = secure_sum.QuantizedSecureSumFactory(config.upload_bits,
                                                      dp.clip)
    value_bits = secure_sum.secure_bits(config.upload_bits,
                                        config.cohort_rows)
  if dp is None:
    mean = tff.aggregators.UnweightedMeanFactory()
    rate_weight = 1.0
  else:
    mean = privacy.build_dp_factory(dp, record_sum)
    rate_weight = privacy.rate_weight(dp, layout.channels)
  return server_support.ServerSupportFactory(
      layout, mean, rate_weight=rate_weight, value_bits=value_bits,
      clients_per_round=config.cohort_rows)


def build_process(config: ExperimentConfig, build_model: ModelBuilder,
                  fed_data: data_lib.FederatedData) -> BuiltProcess:
  """The learning process of `config`, its initial weights seeded by it.

  TF, numpy and Python are seeded with `config.seed` once, before the first
  model is built, so the initial weights are a function of the seed.
  """
  model_fn = model_fn_of(config, build_model, fed_data.source)
  aggregator = model_aggregator(config, model_fn)
  tf.keras.utils.set_random_seed(config.seed)
  values = upload_values(config)
  hooks = learning_process.build_algorithm(
      config.algorithm, prox_mu=config.prox_mu, num_clients=config.num_clients,
      learning_rate=config.client_learning_rate,
      momentum=config.client_momentum, error_feedback=config.error_feedback,
      upload_values=values,
  )
  process = learning_process.build_learning_process(
      model_fn,
      fed_data.element_spec,
      client_learning_rate=config.client_learning_rate,
      client_momentum=config.client_momentum,
      weight_decay=config.weight_decay,
      algorithm=hooks,
      salience_threshold=config.salience_threshold,
      aggregation=config.aggregation,
      upload_values=values,
      measure_local_accuracy=config.measure_overfitting,
      compact_training=config.compact_training,
      self_distillation=config.self_distillation,
      clients_per_round=config.cohort_rows,
      round_deadline_s=config.round_deadline_s,
      server_optimizer=config.server_optimizer,
      server_learning_rate=config.server_learning_rate,
      model_aggregator=aggregator,
  )
  return BuiltProcess(process, hooks, _process_key(config))


def run_experiment(
    config: ExperimentConfig,
    models: Mapping[str, ModelBuilder],
    progress: bool = True,
    built: Optional[BuiltProcess] = None,
) -> dict:
  """Runs (or resumes) `config` to `total_rounds`; returns the summary.

  `models` maps each architecture name to its builder
  `(input_shape=, num_classes=, gate=) -> Model` (e.g.
  `keras_models.BUILDERS`). `built` is a process from `build_process` to
  reuse (it must `serve` `config`). Raises
  `ConfigError`, `data.DataSourceError` or `data.PartitionError` before
  anything is written if the configuration or data is unusable, and
  `run_directory.RunDirectoryError` if another run is writing there.
  """
  config_lib.validate(config, tuple(models))
  run_directory.check_resumable(config)
  if built is not None and not built.serves(config):
    raise ValueError('the process passed in was built for another'
                     ' configuration')
  fed_data = data_source_lib.load_data(config)
  workers = runtime.parse_addresses(config.workers)
  credentials = _check_workers(config, workers)
  run_directory.prepare(config.root_output_dir, config.run_dir)
  with run_directory.exclusive_writer(config.run_dir):
    run_directory.check_resumable(config)  # Again: another writer may have run.
    run_directory.remove_stale_temporaries(config.run_dir)
    os.makedirs(os.path.join(config.run_dir, run_directory.CHECKPOINTS),
                mode=0o700, exist_ok=True)
    for name in ('config.json', run_directory.BOUND_CONFIG):
      run_directory.write_json(os.path.join(config.run_dir, name),
                               dataclasses.asdict(config))
    started = time.time()
    build_model = models[config.model]
    if workers:
      with tff.framework.get_context_stack().install(
          runtime.create_distributed_context(workers, credentials)
      ):
        summary = _train(config, build_model, fed_data, progress, built,
                         workers, credentials)
    else:
      with runtime.local_runtime(
          log_path=os.path.join(config.run_dir, 'worker.log')
      ) as worker:
        summary = _train(config, build_model, fed_data, progress, built,
                         [worker.address], None)
    summary['wall_seconds_this_invocation'] = time.time() - started
    run_directory.write_json(
        os.path.join(config.run_dir, 'summary.json'), summary
    )
  return summary


def _check_workers(config: ExperimentConfig, workers):
  """The workers' TLS credentials (or None) once every worker answers."""
  try:
    credentials = config.worker_credentials()
    tls = config.worker_tls_context()
    for address in workers:
      if tls is not None and not runtime.is_local_socket(address):
        runtime.check_worker_certificate(address, tls, timeout_s=10)
      runtime.wait_until_ready(address, timeout_s=10, credentials=credentials)
  except runtime.WorkerError as e:
    raise ConfigError(f'--workers: {e}') from e
  return credentials


@dataclasses.dataclass(frozen=True)
class ProgramParts:
  """What `program.train_model` is handed for one configuration."""

  process: stateful_process.ClientStateProcess
  data_source: data_source_lib.ClientDataSource
  evaluation: evaluation.RoundEvaluation
  traffic: program.Traffic
  federation: Optional[devices.Federation]  # None without --device_tiers.


# Pooled training images whose statistics are a static batch norm's.
CALIBRATION_IMAGES = 2048


def prefix_policy(config: ExperimentConfig) -> bool:
  """Whether devices train fixed channel prefixes (HeteroFL, FjORD)."""
  return config.dynamic_pruning and config.channel_policy != 'feddp'


def static_batch_norm(config: ExperimentConfig) -> bool:
  """Whether the model is evaluated with static batch norm."""
  return config.static_batch_norm or prefix_policy(config)


def sub_model_bytes(model: tf.keras.Model, keep_ratio: float) -> int:
  """Bytes of the weights a prefix policy's device of `keep_ratio` holds."""
  prefixes = [
      tf.cast(tf.range(l.filters) < gated_conv.num_kept(keep_ratio, l.filters),
              tf.float32) for l in gated_conv.gated_layers(model)]
  masks = salience.ChannelStructure(model).masks(prefixes)
  return 4 * int(sum(float(tf.reduce_sum(m)) for m in tf.nest.flatten(masks)))


def build_federation(config: ExperimentConfig, model: tf.keras.Model,
                     traffic: program.Traffic) -> Optional[devices.Federation]:
  """The run's devices (None without --device_tiers)."""
  client_tiers = config.client_tiers()
  if client_tiers is None:
    return None
  tiers = tuple(config.tiers())
  prefix = prefix_policy(config)
  return devices.Federation(
      tiers=tiers, client_tiers=client_tiers,
      download_bytes=tuple(
          sub_model_bytes(model, t.keep_ratio) + traffic.state_bytes
          if prefix else traffic.per_client for t in tiers),
      reference_flops_per_s=config.reference_flops_per_s,
  )


def build_parts(config: ExperimentConfig, build_model: ModelBuilder,
                fed_data: data_lib.FederatedData,
                built: Optional[BuiltProcess] = None) -> ProgramParts:
  """The process (built unless `built`), data source and evaluation."""
  built = built or build_process(config, build_model, fed_data)
  eval_model = model_fn_of(config, build_model, fed_data.source)(
      config.evaluation_keep_ratio)
  weights = model_state.global_weights(eval_model)
  state_spec = built.algorithm.client_state_spec(tuple(
      tf.TensorSpec(v.shape, v.dtype) for v in weights.trainable))
  traffic = program.Traffic(
      model_bytes=_num_bytes(weights),
      state_bytes=sum(s.shape.num_elements() * s.dtype.size
                      for s in tf.nest.flatten(state_spec))
      if built.algorithm.state_travels else 0,
  )
  federation = build_federation(config, eval_model, traffic)
  calibration = (fed_data.calibration_images(CALIBRATION_IMAGES, config.seed)
                 if static_batch_norm(config) else None)
  return ProgramParts(
      process=stateful_process.ClientStateProcess(built.process, state_spec),
      data_source=data_source_lib.ClientDataSource(config, fed_data,
                                                   federation),
      evaluation=evaluation.RoundEvaluation(
          eval_model, fed_data, eval_every=config.eval_every,
          total_rounds=config.total_rounds,
          measure_train_accuracy=config.measure_overfitting,
          tiers=[(t.label, t.keep_ratio) for t in federation.tiers]
          if federation and config.dynamic_pruning else (),
          calibration_images=calibration,
      ),
      traffic=traffic,
      federation=federation,
  )


def _watched(worker_addresses, credentials):
  """Runs a computation, naming the workers if they fail."""

  def call(computation):
    return runtime.call_watched(computation, worker_addresses,
                                credentials=credentials)

  return call


def _train(config, build_model, fed_data, progress, built, worker_addresses,
           credentials) -> dict:
  parts = build_parts(config, build_model, fed_data, built)
  call = _watched(worker_addresses, credentials)
  run_dir = config.run_dir
  metrics_csv = os.path.join(run_dir, 'metrics.csv')
  result = program.train_model(
      train_process=parts.process,
      train_data_source=parts.data_source,
      train_total_rounds=config.total_rounds,
      program_state_manager=run_directory.CheckpointManager(
          os.path.join(run_dir, run_directory.CHECKPOINTS)),
      train_metrics_managers=[
          tff.program.CSVFileReleaseManager(metrics_csv,
                                            key_fieldname='round'),
          tff.program.TensorBoardReleaseManager(
              os.path.join(run_dir, 'tensorboard')),
      ],
      client_costs_managers=[round_rows.RoundRowsCsv(
          os.path.join(run_dir, CLIENTS_CSV), round_rows.ClientRow)],
      layer_costs_managers=[round_rows.RoundRowsCsv(
          os.path.join(run_dir, LAYERS_CSV), round_rows.LayerRow)],
      evaluation=parts.evaluation,
      traffic=parts.traffic,
      initial_state=call(parts.process.initialize),
      metrics_csv=metrics_csv,
      call=call,
      progress=progress,
      gated_layers=tuple((l.name, l.filters) for l in gated_conv.gated_layers(
          parts.evaluation.model)),
      federation=parts.federation,
      round_deadline_s=config.round_deadline_s,
      dp=config.dp(),
  )
  weights = result.weights
  eval_model = parts.evaluation.evaluate.prepare(weights)
  _save_model(run_dir, eval_model, fed_data)
  finished_run = reporting.load_run(
      run_dir, config=config_lib.with_defaults(dataclasses.asdict(config)))
  reporting.plot_runs([finished_run], os.path.join(run_dir, 'plots'))
  summary = _summary(config, fed_data, result.history)
  summary.update(_cost_summary(run_dir))
  if parts.federation is not None:
    summary['device_tiers'] = _tier_summary(parts.federation)
  if config.target_accuracy is not None:
    reached = finished_run.upload_to_target(config.target_accuracy)
    summary['upload_to_target'] = {
        'target_accuracy': config.target_accuracy,
        'round': reached[0] if reached else None,
        'upload_bytes': reached[1] if reached else None,
    }
    if parts.federation is not None:
      summary['upload_to_target']['simulated_seconds'] = next(
          (h['simulated_seconds'] for h in result.history
           if reached and h['round'] == reached[0]), None)
  final = result.last_evaluation  # The last round always evaluates.
  if final is None:  # Resumed with every round done.
    final = parts.evaluation.test(weights)
  gates = final.gates
  summary['final_gate_dynamics'] = {
      layer.name: {'jaccard': j, 'channels_ever_kept': e}
      for layer, j, e in zip(
          gated_conv.gated_layers(eval_model), gates.jaccard, gates.ever_kept
      )
  }
  return summary


def _save_model(run_dir, eval_model, fed_data) -> None:
  """The global model (as evaluated) and its preprocessing, RUN_DIR/model."""
  model_dir = os.path.join(run_dir, 'model')
  os.makedirs(model_dir, exist_ok=True)
  run_directory.save_keras_model(
      eval_model, os.path.join(model_dir, 'model.keras')
  )
  run_directory.write_json(
      os.path.join(model_dir, 'preprocessing.json'),
      {
          'dataset': fed_data.source.name,
          'image_shape': fed_data.source.image_shape,
          'mean': fed_data.mean,
          'std': fed_data.std,
      },
  )


def _tier_summary(federation: devices.Federation) -> list:
  """Each tier, its clients and what its device downloads."""
  return [dict(dataclasses.asdict(tier),
               clients=[int(c) for c in np.flatnonzero(
                   federation.client_tiers == i)],
               download_bytes=federation.download_bytes[i])
          for i, tier in enumerate(federation.tiers)]


def _cost_summary(run_dir) -> dict:
  """Training FLOPs totals (clients.csv) and computed shares (layers.csv)."""
  clients = round_rows.RoundRowsCsv(
      os.path.join(run_dir, CLIENTS_CSV), round_rows.ClientRow).read()
  layers = round_rows.RoundRowsCsv(
      os.path.join(run_dir, LAYERS_CSV), round_rows.LayerRow).read()
  total = lambda key: sum(float(r[key]) for r in clients)
  shares = collections.defaultdict(list)
  for r in layers:
    shares[r['layer']].append(float(r['computed_share']))
  return {
      'total_train_flops': total('train_flops'),
      'total_dense_train_flops': total('dense_train_flops'),
      'mean_computed_share': {
          name: float(np.mean(s)) for name, s in shares.items()},
  }


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
      'bits_per_parameter': program.bits_per_parameter(
          sum(h['upload_bytes'] for h in history),
          sum(h['dense_upload_bytes'] for h in history)),
      'total_download_bytes': sum(h['download_bytes'] for h in history),
      'total_round_seconds': sum(h['round_seconds'] for h in history),
      'simulated_seconds': final.get('simulated_seconds'),
      'dp_epsilon': final.get('dp_epsilon', math.nan),
      'dp_delta': 1 / config.num_clients
      if config.dp_noise_multiplier is not None else None,
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
