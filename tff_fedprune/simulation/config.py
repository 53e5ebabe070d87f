"""The configuration of a simulated run: fields, help text and validation.

`ExperimentConfig` is everything that defines a run; each field carries its
command-line help (`help_text`), so the flags of `experiments.cifar` are made
from it. A run directory stores its configuration in config.json; a key that
an older config.json lacks takes the field's default, which is the behaviour
runs had before that field existed (`with_defaults`).
"""

import dataclasses
import json
import math
import os
from typing import Optional

from tff_fedprune import aggregation as aggregation_lib
from tff_fedprune import data as data_lib
from tff_fedprune import encoding
from tff_fedprune import error_feedback
from tff_fedprune import gated_conv
from tff_fedprune import learning_process
from tff_fedprune.runtime import worker_process
from tff_fedprune.simulation import run_directory

# Fields that may change between a run and its resumption.
RESUMABLE_FIELDS = (
    'total_rounds', 'eval_every', 'root_output_dir', 'workers',
    'worker_ca_cert', 'worker_client_cert', 'worker_client_key',
    'insecure_workers', 'target_accuracy',
)


# Per user and out of /tmp, where another local user could create it first.
DEFAULT_ROOT = os.path.join(
    os.environ.get('XDG_STATE_HOME') or os.path.expanduser('~/.local/state'),
    'tff_fedprune',
)
_MAX_INTEGER = 2**31 - 1


class ConfigError(ValueError):
  """An experiment configuration is invalid."""


def _field(default, help_text: str, choices: tuple = ()):
  return dataclasses.field(
      default=default, metadata={'help': help_text, 'choices': choices}
  )


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything that defines a run (docs/design.md, section 5)."""

  experiment_name: str = _field(
      'quickstart', 'Run directory name under --root_output_dir.'
  )
  root_output_dir: str = _field(
      DEFAULT_ROOT, 'Where run directories are written (created 0700; one'
      " another user owns or can write to is refused)."
  )
  dataset: str = _field('digits', 'Image dataset.', data_lib.SOURCES)
  data_dir: Optional[str] = _field(
      None, 'Directory (or archive) holding the dataset files.'
  )
  model: str = _field('cnn', 'Model architecture (keras_models).')
  algorithm: str = _field(
      'fedavg', 'Federated algorithm.', learning_process.ALGORITHMS
  )
  dynamic_pruning: bool = _field(
      False, 'Gate every conv layer (FedDP) instead of dense.'
  )
  gate_input: str = _field(
      'sigmoid', "What a gate reads: sigmoid of the input's channel means"
      ' (the authors\' VGG) or the means themselves (identity, their ResNet).',
      gated_conv.GATE_INPUTS,
  )
  gated_bn: str = _field(
      'masked', 'Training batch statistics of a gated layer: over the'
      ' samples that keep each channel (masked, exact zero gradient from a'
      ' sample to the channels it pruned) or over all samples before gating'
      ' (full, the authors\' code).',
      gated_conv.GATED_BNS,
  )
  gate_selection: str = _field(
      'saliency', 'What ranks the channels for the top-k: the saliency'
      ' itself, its deviation from the channel\'s mean saliency (centered), or'
      ' that deviation over the channel\'s standard deviation (standardized);'
      ' kept channels are scaled by the saliency either way.',
      gated_conv.GATE_SELECTIONS,
  )
  gate_balance: float = _field(
      0.0, 'Weight of each gated layer\'s load-balancing loss in local'
      ' training (gated_conv.usage_balance): pushes every channel towards'
      ' being kept equally often, so that kept sets differ between inputs.'
      ' 0 turns it off.'
  )
  gate_stem: bool = _field(
      True, "Gate the first convolution too (--nogate_stem: leave it dense,"
      " as the authors' ResNet does)."
  )
  keep_ratio: float = _field(
      0.7, 'Share of output channels each gated layer keeps, in training'
      ' (unless --client_keep_ratios is set) and by default in evaluation.'
  )
  client_keep_ratios: str = _field(
      '', 'Comma-separated keep ratios for training, client id modulo the'
      ' list (heterogeneous devices); replaces --keep_ratio in training only:'
      ' evaluation, FLOPs and the saved model use --eval_keep_ratio.'
  )
  eval_keep_ratio: Optional[float] = _field(
      None, 'Keep ratio of the evaluated, measured and saved global model'
      ' (default: --keep_ratio).'
  )
  salience_threshold: float = _field(
      0.0, "A channel is uploaded iff kept in more than this share of the"
      " client's samples."
  )
  prox_mu: float = _field(0.01, 'FedProx proximal coefficient.')
  aggregation: str = _field(
      'count_aware', 'Server mean of the masked updates: count_aware (each'
      ' coordinate over the clients that sent it) or fedavg (over all'
      " clients, unsent coordinates as zero changes: the authors' code).",
      aggregation_lib.AGGREGATIONS,
  )
  upload_bits: int = _field(
      32, 'Bits per uploaded value: 32 (float32), or 16, 8 or 4 (stochastic'
      " rounding between each tensor's smallest and largest kept value,"
      ' seeded by --seed, the round and the client).'
  )
  error_feedback: bool = _field(
      False, 'Clients keep what masking and quantisation dropped from their'
      ' upload and add it to their next update (EF-SGD; fedavg and fedprox).'
  )
  measure_overfitting: bool = _field(
      False, 'At each evaluation also measure the global model on the pooled'
      " clients' training data (train_accuracy), and each round every trained"
      ' client model on its own training batches (local_train_accuracy).'
  )
  target_accuracy: Optional[float] = _field(
      None, 'Test accuracy whose first reaching summary.json reports with the'
      ' cumulative upload it took (upload_to_target).'
  )
  client_failure_rate: float = _field(
      0.0, "Share of each round's sampled clients that drop out (simulated"
      ' device loss).'
  )
  workers: str = _field(
      '', 'host:port,... of TFF workers (python -m tff_fedprune.worker) to'
      ' run the clients on, or unix:/path sockets of workers on this machine;'
      ' default: a local worker owned by this process.'
  )
  worker_ca_cert: str = _field(
      '', 'PEM CA certificate that signed the --workers\' TLS certificates.'
  )
  worker_client_cert: str = _field(
      '', "PEM certificate of this driver, signed by the workers'"
      ' --tls_client_ca.'
  )
  worker_client_key: str = _field(
      '', 'PEM private key of --worker_client_cert.'
  )
  insecure_workers: bool = _field(
      False, 'Talk to --workers in plaintext without authentication (workers'
      ' started with --insecure_plaintext_no_auth, on a trusted network).'
  )
  num_clients: int = _field(
      10, 'Number of clients the training set is split into.'
  )
  clients_per_round: int = _field(10, 'Clients sampled each round.')
  partition: str = _field(
      'dirichlet', 'How the training set is split.', data_lib.PARTITIONS
  )
  dirichlet_alpha: float = _field(
      0.5, 'Concentration of the Dirichlet label skew.'
  )
  classes_per_client: int = _field(
      2, 'Classes per client for --partition=shards.'
  )
  server_optimizer: str = _field(
      'sgd', 'Server optimizer.', learning_process.SERVER_OPTIMIZERS
  )
  server_learning_rate: float = _field(1.0, 'Server optimizer learning rate.')
  client_learning_rate: float = _field(0.05, 'Client SGD learning rate.')
  client_momentum: float = _field(0.9, 'Client SGD momentum.')
  weight_decay: float = _field(5e-4, 'Client L2 weight decay.')
  local_epochs: int = _field(1, 'Local epochs per round.')
  batch_size: int = _field(32, 'Client batch size.')
  total_rounds: int = _field(10, 'Number of federated rounds.')
  eval_every: int = _field(
      1, 'Evaluate the global model every N rounds (and the last).'
  )
  seed: int = _field(
      0, 'Seed of partition, sampling, initial weights and shuffling.'
  )

  @property
  def run_dir(self) -> str:
    return os.path.join(self.root_output_dir, self.experiment_name)

  def keep_ratio_of(self, client_id: int) -> float:
    """Client `client_id`'s keep ratio in training (heterogeneous devices)."""
    ratios = parse_ratios(self.client_keep_ratios) or [self.keep_ratio]
    return ratios[client_id % len(ratios)]

  def worker_credentials(self):
    """TLS credentials for --workers, or None (plaintext)."""
    if self.insecure_workers or not self.worker_ca_cert:
      return None
    return worker_process.tls_credentials(
        self.worker_ca_cert, self.worker_client_cert, self.worker_client_key
    )

  def worker_tls_context(self):
    """The driver's TLS context for checking --workers, or None (plaintext)."""
    if self.insecure_workers or not self.worker_ca_cert:
      return None
    return worker_process.tls_client_context(
        self.worker_ca_cert, self.worker_client_cert, self.worker_client_key
    )

  def gate(self, keep_ratio: Optional[float] = None):
    """The `gated_conv.GateSpec` of the model (None: dense), at `keep_ratio`.

    The keep ratio defaults to --keep_ratio.
    """
    if not self.dynamic_pruning:
      return None
    return gated_conv.GateSpec.from_flags(
        keep_ratio=self.keep_ratio if keep_ratio is None else keep_ratio,
        gate_input=self.gate_input, gated_bn=self.gated_bn,
        gate_selection=self.gate_selection, gate_balance=self.gate_balance,
        gate_stem=self.gate_stem,
    )

  @property
  def evaluation_keep_ratio(self) -> float:
    """The keep ratio of the evaluated, measured and saved global model."""
    if self.eval_keep_ratio is None:
      return self.keep_ratio
    return self.eval_keep_ratio


def help_text(field: dataclasses.Field) -> str:
  return field.metadata['help']


def choices(field: dataclasses.Field) -> tuple:
  return field.metadata['choices']


def with_defaults(saved: dict) -> dict:
  """A stored configuration with the defaults of the keys it lacks."""
  defaults = dataclasses.asdict(ExperimentConfig())
  return {**defaults, **saved}


def parse_ratios(spec: str) -> list[float]:
  """'0.5,0.7,1.0' -> [0.5, 0.7, 1.0]; raises ConfigError when malformed."""
  try:
    return [float(r) for r in spec.split(',') if r.strip()]
  except ValueError as e:
    raise ConfigError(
        f'--client_keep_ratios={spec!r} is not a list of numbers'
    ) from e


def validate(config: ExperimentConfig, model_names=()) -> None:
  """Raises `ConfigError` with a one-line reason if `config` is unusable.

  `model_names` are the architectures the caller can build (all if empty).
  """

  def require(ok, message):
    if not ok:
      raise ConfigError(message)

  for field in dataclasses.fields(config):
    options = choices(field) or (
        tuple(model_names) if field.name == 'model' else ()
    )
    value = getattr(config, field.name)
    require(
        not options or value in options,
        f'unknown {field.name.replace("_", " ")} {value!r}; choose from'
        f' {options}',
    )
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    require(
        not isinstance(value, float) or math.isfinite(value),
        f'--{field.name} must be finite, got {value}',
    )
    require(
        not isinstance(value, int) or isinstance(value, bool)
        or field.name == 'seed' or abs(value) <= _MAX_INTEGER,
        f'--{field.name} must be at most {_MAX_INTEGER}, got {value}',
    )
    require(
        not isinstance(value, str) or _is_utf8(value),
        f'--{field.name} must be UTF-8 text without NUL, got {value!r}',
    )
  require(
      config.upload_bits in encoding.UPLOAD_BITS,
      f'--upload_bits must be one of {encoding.UPLOAD_BITS}, got'
      f' {config.upload_bits}',
  )
  require(
      0 <= config.seed < 2**32, f'--seed must be in [0, 2^32), got {config.seed}'
  )
  for name in ('num_clients', 'clients_per_round', 'local_epochs',
               'batch_size', 'total_rounds', 'eval_every', 'classes_per_client'):
    value = getattr(config, name)
    require(value >= 1, f'--{name} must be >= 1, got {value}')
  require(
      not config.error_feedback
      or config.algorithm in error_feedback.ALGORITHMS,
      f'--error_feedback serves {" and ".join(error_feedback.ALGORITHMS)},'
      f' not {config.algorithm}',
  )
  require(
      config.target_accuracy is None or 0 < config.target_accuracy <= 1,
      f'--target_accuracy must be in (0, 1], got {config.target_accuracy}',
  )
  ratios = [config.keep_ratio, config.evaluation_keep_ratio]
  for ratio in ratios + parse_ratios(config.client_keep_ratios):
    require(0 < ratio <= 1, f'keep ratio must be in (0, 1], got {ratio}')
  require(
      0 <= config.salience_threshold < 1,
      f'--salience_threshold must be in [0, 1), got'
      f' {config.salience_threshold}',
  )
  require(config.prox_mu >= 0, f'--prox_mu must be >= 0, got {config.prox_mu}')
  require(
      config.gate_balance >= 0,
      f'--gate_balance must be >= 0, got {config.gate_balance}',
  )
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
    workers = worker_process.parse_addresses(config.workers)
  except ValueError as e:
    raise ConfigError(f'--workers: {e}') from e
  tls_files = (config.worker_ca_cert, config.worker_client_cert,
               config.worker_client_key)
  remote = [a for a in workers if not worker_process.is_local_socket(a)]
  require(
      not remote or config.insecure_workers or all(tls_files),
      '--workers on host:port need --worker_ca_cert, --worker_client_cert and'
      ' --worker_client_key (mutual TLS), or --insecure_workers',
  )
  for path in filter(None, tls_files):
    require(os.path.isfile(path), f'no such file: {path}')
  require(
      config.experiment_name not in ('', '.', '..')
      and not any(s and s in config.experiment_name
                  for s in (os.sep, os.altsep)),
      f'--experiment_name={config.experiment_name!r} must name a directory'
      ' inside --root_output_dir (not empty, ., .. or a path)',
  )
  for path in (config.root_output_dir, config.run_dir):
    require(
        not os.path.exists(path) or os.path.isdir(path),
        f'output path {path} exists and is not a directory',
    )


def _stored_config(path: str) -> Optional[dict]:
  """The configuration stored at `path` (with defaults), or None if absent."""
  if not os.path.lexists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(
        f'cannot read {path} ({type(e).__name__}: {e}); move the run'
        ' directory away or use another --experiment_name'
    ) from None
  if not isinstance(saved, dict):
    raise ConfigError(f'{path} holds no configuration (a JSON object)')
  return with_defaults(saved)


def _is_utf8(text: str) -> bool:
  try:
    text.encode('utf-8')
    return '\x00' not in text
  except UnicodeEncodeError:
    return False


def check_resumable(config: ExperimentConfig) -> None:
  """Refuses to resume a run directory that holds another configuration.

  Both the run's config.json and the configuration its checkpoints are bound
  to (`run_directory.BOUND_CONFIG`) must match `config`; checkpoints with
  neither are refused, since nothing says what wrote them.
  """
  run_dir = config.run_dir
  stored = {
      path: _stored_config(path)
      for path in (os.path.join(run_dir, 'config.json'),
                   os.path.join(run_dir, run_directory.BOUND_CONFIG))
  }
  if (all(s is None for s in stored.values())
      and run_directory.has_checkpoints(run_dir)):
    raise ConfigError(
        f'{run_dir} has checkpoints but no config.json: which configuration'
        ' they belong to is unknown; move the directory away or use another'
        ' --experiment_name'
    )
  current = dataclasses.asdict(config)
  for path, saved in stored.items():
    if saved is None:
      continue
    changed = sorted(
        k
        for k in set(saved) | set(current)
        if k not in RESUMABLE_FIELDS and saved.get(k) != current.get(k)
    )
    if changed:
      raise ConfigError(
          f'{run_dir} holds a run with different {", ".join(changed)}'
          f' ({os.path.relpath(path, run_dir)}); use another'
          ' --experiment_name or --root_output_dir'
      )
