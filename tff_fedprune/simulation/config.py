"""The configuration of a simulated run: its sections and their validation.

`ExperimentConfig` is everything that defines a run, composed of its run,
data, model, algorithm and upload sections, with the workers and their TLS
apart. Each field carries its command-line help, enum choices and value
constraint (`fields.field`), so the flags of `experiments.cifar` are made
from it and `validate` checks it where it is declared. A run directory
stores its configuration in config.json, flat, by field name; a key that an
older config.json lacks takes the field's default, which is the behaviour
runs had before that field existed (`with_defaults`).
"""

import dataclasses
import functools
import math
import os
from typing import Optional

import numpy as np

from tff_fedprune import aggregation as aggregation_lib
from tff_fedprune import compact_training as compact_training_lib
from tff_fedprune import data as data_lib
from tff_fedprune import encoding
from tff_fedprune import error_feedback
from tff_fedprune import gated_conv
from tff_fedprune import learning_process
from tff_fedprune import privacy
from tff_fedprune import server_support as server_support_lib
from tff_fedprune.runtime import worker_process
from tff_fedprune.simulation import devices
from tff_fedprune.simulation import fields

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


@dataclasses.dataclass(frozen=True)
class RunSection:
  """What a run is called, where it writes, how long it is, what it measures."""

  experiment_name: str = fields.field(
      'quickstart', 'Run directory name under --root_output_dir.'
  )
  root_output_dir: str = fields.field(
      DEFAULT_ROOT, 'Where run directories are written (created 0700; one'
      " another user owns or can write to is refused)."
  )
  total_rounds: int = fields.field(
      10, 'Number of federated rounds.',
      constraint=fields.Range(1),
  )
  eval_every: int = fields.field(
      1, 'Evaluate the global model every N rounds (and the last).',
      constraint=fields.Range(1),
  )
  seed: int = fields.field(
      0, 'Seed of partition, sampling, initial weights and shuffling.',
      constraint=fields.Range(0, 2**32, high_open=True, text='in [0, 2^32)'),
  )
  measure_overfitting: bool = fields.field(
      False, 'At each evaluation also measure the global model on the pooled'
      " clients' training data (train_accuracy), and each round every trained"
      ' client model on its own training batches (local_train_accuracy).'
  )
  target_accuracy: Optional[float] = fields.field(
      None, 'Test accuracy whose first reaching summary.json reports with the'
      ' cumulative upload it took (upload_to_target).',
      constraint=fields.Range(0, 1, low_open=True),
  )

  @property
  def run_dir(self) -> str:
    return os.path.join(self.root_output_dir, self.experiment_name)


@dataclasses.dataclass(frozen=True)
class DataSection:
  """The dataset and its federation: the clients, their split, who takes part."""

  dataset: str = fields.field('digits', 'Image dataset.', data_lib.SOURCES)
  data_dir: Optional[str] = fields.field(
      None, 'Directory (or archive) holding the dataset files.'
  )
  num_clients: int = fields.field(
      10, 'Number of clients the training set is split into.',
      constraint=fields.Range(1),
  )
  clients_per_round: int = fields.field(
      10, 'Clients sampled each round.',
      constraint=fields.Range(1),
  )
  client_failure_rate: float = fields.field(
      0.0, "Share of each round's sampled clients that drop out (simulated"
      ' device loss).',
      constraint=fields.Range(0, 1, high_open=True),
  )
  partition: str = fields.field(
      'dirichlet', 'How the training set is split.', data_lib.PARTITIONS
  )
  dirichlet_alpha: float = fields.field(
      0.5, 'Concentration of the Dirichlet label skew.',
      constraint=fields.Range(0, low_open=True),
  )
  classes_per_client: int = fields.field(
      2, 'Classes per client for --partition=shards.',
      constraint=fields.Range(1),
  )


@dataclasses.dataclass(frozen=True)
class ModelSection:
  """The architecture and its gates (`gate` gives them as one `GateSpec`)."""

  model: str = fields.field('cnn', 'Model architecture (keras_models).')
  dynamic_pruning: bool = fields.field(
      False, 'Gate every conv layer (FedDP) instead of dense.'
  )
  gate_input: str = fields.field(
      'sigmoid', "What a gate reads: sigmoid of the input's channel means"
      ' (the authors\' VGG) or the means themselves (identity, their ResNet).',
      gated_conv.GATE_INPUTS,
  )
  gated_bn: str = fields.field(
      'masked', 'Training batch statistics of a gated layer: over the'
      ' samples that keep each channel (masked, exact zero gradient from a'
      ' sample to the channels it pruned) or over all samples before gating'
      ' (full, the authors\' code).',
      gated_conv.GATED_BNS,
  )
  gate_selection: str = fields.field(
      'saliency', 'What ranks the channels for the top-k: the saliency'
      ' itself, its deviation from the channel\'s mean saliency (centered), or'
      ' that deviation over the channel\'s standard deviation (standardized);'
      ' kept channels are scaled by the saliency either way.',
      gated_conv.GATE_SELECTIONS,
  )
  gate_balance: float = fields.field(
      0.0, 'Weight of each gated layer\'s load-balancing loss in local'
      ' training (gated_conv.usage_balance): pushes every channel towards'
      ' being kept equally often, so that kept sets differ between inputs.'
      ' 0 turns it off.',
      constraint=fields.Range(0),
  )
  gate_stem: bool = fields.field(
      True, "Gate the first convolution too (--nogate_stem: leave it dense,"
      " as the authors' ResNet does)."
  )
  channel_policy: str = fields.field(
      'feddp', 'How gated layers choose their channels: learned per-input'
      ' gates (feddp), or a fixed channel prefix per device, the sub-model'
      ' of HeteroFL (its width the client\'s keep ratio, static batch norm)'
      ' or FjORD (ordered dropout: a width drawn every local step among'
      f' {gated_conv.FJORD_WIDTHS} up to the keep ratio, static batch norm).',
      gated_conv.CHANNEL_POLICIES,
  )
  static_batch_norm: bool = fields.field(
      False, 'Evaluate and save the global model with its batch-norm'
      ' statistics recomputed at the evaluated keep ratio on 2048 pooled'
      ' training images (HeteroFL\'s static BN; always on for heterofl and'
      ' fjord): averaged statistics mix clients of every width.'
  )
  keep_ratio: float = fields.field(
      0.7, 'Share of output channels each gated layer keeps, in training'
      ' (unless --client_keep_ratios or --device_tiers is set) and by default'
      ' in evaluation.',
      constraint=fields.Range(0, 1, low_open=True, label='keep ratio'),
  )
  client_keep_ratios: str = fields.field(
      '', 'Comma-separated keep ratios for training, client id modulo the'
      ' list (heterogeneous devices); replaces --keep_ratio in training only:'
      ' evaluation, FLOPs and the saved model use --eval_keep_ratio.'
  )
  eval_keep_ratio: Optional[float] = fields.field(
      None, 'Keep ratio of the evaluated, measured and saved global model'
      ' (default: --keep_ratio).',
      constraint=fields.Range(0, 1, low_open=True, label='keep ratio'),
  )

  def keep_ratio_of(self, client_id: int) -> float:
    """Client `client_id`'s keep ratio in training (heterogeneous devices)."""
    ratios = parse_ratios(self.client_keep_ratios) or [self.keep_ratio]
    return ratios[client_id % len(ratios)]

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
        gate_stem=self.gate_stem, channel_policy=self.channel_policy,
    )

  @property
  def evaluation_keep_ratio(self) -> float:
    """The keep ratio of the evaluated, measured and saved global model."""
    if self.eval_keep_ratio is None:
      return self.keep_ratio
    return self.eval_keep_ratio


@dataclasses.dataclass(frozen=True)
class DeviceSection:
  """The devices of a heterogeneous federation (`devices`)."""

  device_tiers: str = fields.field(
      '', 'Device tiers keep_ratio:speed:Mbps,... (e.g.'
      ' 0.5:1:1,0.7:2:5,1.0:4:10): each tier trains at its keep ratio'
      ' (replacing --keep_ratio in training), computes at speed x'
      ' --reference_flops_per_s and transfers at Mbps (10^6 bit/s) each way;'
      ' the global model is evaluated at every tier\'s keep ratio.'
  )
  tier_shares: str = fields.field(
      '', 'Share of the clients in each of --device_tiers (comma-separated,'
      ' summing to 1; default equal), assigned by --seed.'
  )
  reference_flops_per_s: float = fields.field(
      1e10, 'Training FLOP/s of a speed-1 device in the simulated round time.',
      constraint=fields.Range(0, low_open=True),
  )
  tier_min_keep_ratio: float = fields.field(
      0.0, 'Only clients of device tiers with at least this keep ratio take'
      ' part (1.0 with a dense model: a federation of the devices that can'
      ' train it); each round samples min(--clients_per_round, their number).',
      constraint=fields.Range(0, 1),
  )
  round_deadline_s: Optional[float] = fields.field(
      None, 'Simulated seconds a round waits: a client whose download,'
      ' training and upload take longer is dropped from the aggregate'
      ' (clients_late). Default: none.',
      constraint=fields.Range(0, low_open=True),
  )
  keep_ratio_warmup_rounds: int = fields.field(
      0, 'Rounds over which every client\'s training keep ratio falls'
      ' linearly from 1.0 (dense, round 1) to its own (reached in round'
      ' N + 1): a schedule that starts dense, costed at what each client'
      ' computes. 0: no schedule.',
      constraint=fields.Range(0),
  )


@dataclasses.dataclass(frozen=True)
class AlgorithmSection:
  """The federated algorithm: local training, aggregation and the server update."""

  algorithm: str = fields.field(
      'fedavg', 'Federated algorithm.', learning_process.ALGORITHMS
  )
  prox_mu: float = fields.field(
      0.01, 'FedProx proximal coefficient.',
      constraint=fields.Range(0),
  )
  aggregation: str = fields.field(
      'count_aware', 'Server mean of the masked updates: count_aware (each'
      ' coordinate over the clients that sent it) or fedavg (over all'
      " clients, unsent coordinates as zero changes: the authors' code).",
      aggregation_lib.AGGREGATIONS,
  )
  server_optimizer: str = fields.field(
      'sgd', 'Server optimizer.', learning_process.SERVER_OPTIMIZERS
  )
  server_learning_rate: float = fields.field(
      1.0, 'Server optimizer learning rate.',
      constraint=fields.Range(0, low_open=True),
  )
  client_learning_rate: float = fields.field(
      0.05, 'Client SGD learning rate.',
      constraint=fields.Range(0, low_open=True),
  )
  client_momentum: float = fields.field(
      0.9, 'Client SGD momentum.',
      constraint=fields.Range(0, 1, high_open=True),
  )
  weight_decay: float = fields.field(
      5e-4, 'Client L2 weight decay.',
      constraint=fields.Range(0),
  )
  self_distillation: float = fields.field(
      0.0, 'Weight of a gated client\'s KL divergence from the model\'s own'
      ' full-width output in local training, when it trains narrower (the'
      ' widest tier taught to the narrow ones, as FjORD distils; its'
      ' full-width forward pass counts in the training FLOPs). 0: off.',
      constraint=fields.Range(0),
  )
  local_epochs: int = fields.field(1, 'Local epochs per round.', constraint=fields.Range(1))
  batch_size: int = fields.field(32, 'Client batch size.', constraint=fields.Range(1))
  compact_training: str = fields.field(
      'step', 'Which channels a gated client computes in local training:'
      ' every one, then masks (off); those some sample of each batch keeps'
      ' (step); those its samples keep in a pre-pass over its data before'
      ' the round (round: gates then choose within them). Exact for step;'
      ' with --gated_bn=full a layer needs every channel and trains at full'
      ' width whatever this says.',
      compact_training_lib.MODES,
  )


@dataclasses.dataclass(frozen=True)
class UploadSection:
  """What a client uploads: which channels and at how many bits."""

  salience_threshold: float = fields.field(
      0.0, "A channel is uploaded iff kept in more than this share of the"
      " client's samples.",
      constraint=fields.Range(0, 1, high_open=True),
  )
  upload_bits: int = fields.field(
      32, 'Bits per uploaded value: 32 (float32), or 16, 8, 4, 2 or 1'
      " (stochastic rounding between each tensor's smallest and largest kept"
      ' value, seeded by --seed, the round and the client; with'
      ' --error_feedback, 2 and 1 bits are deterministic sign levels scaled'
      ' by mean magnitudes).',
      constraint=fields.OneOf(encoding.UPLOAD_BITS),
  )
  upload_rotation: str = fields.field(
      'none', 'Rotate the kept values before quantising them: hadamard'
      " (tfmot's randomised Hadamard transform in blocks of"
      ' --upload_rotation_block, padding and seed sent and counted).',
      encoding.ROTATIONS,
  )
  upload_rotation_block: int = fields.field(
      256, 'Coordinates per rotated block (a power of two; smaller blocks'
      ' pad less, larger ones spread more).',
      constraint=fields.Range(2, 1 << 20),
  )
  error_feedback: bool = fields.field(
      False, 'Clients keep what masking and quantisation dropped from their'
      ' upload and add it to their next update (EF-SGD; fedavg and fedprox).'
  )


@dataclasses.dataclass(frozen=True)
class PrivacySection:
  """Who picks the uploaded channels, and client-level DP (design section 8)."""

  upload_support: str = fields.field(
      'client', 'Which channels a gated client uploads: client (those its'
      ' data made salient, positions sent) or server (k = round(rho * C) per'
      ' gated layer the server chose from released kept rates, the same for'
      ' every client, values only; needs --dynamic_pruning).',
      server_support_lib.SUPPORTS,
  )
  dp_noise_multiplier: Optional[float] = fields.field(
      None, 'Client-level DP: Gaussian noise of std z * --dp_clip on the sum'
      ' of clipped client updates, a mean over the expected clients, clients'
      ' Poisson-sampled with q = --clients_per_round / --num_clients, epsilon'
      ' at delta = 1 / --num_clients in dp_epsilon (fedavg and fedprox; a'
      ' gated model needs --upload_support=server). 0: clipping only.'
      ' Default: no DP.',
      constraint=fields.Range(0),
  )
  dp_clip: Optional[float] = fields.field(
      None, 'L2 clip S of each client\'s upload under DP (the initial clip'
      ' with --dp_adaptive_clip; the secure sum\'s bound with --upload_bits'
      ' below 32).',
      constraint=fields.Range(0, low_open=True),
  )
  dp_adaptive_clip: bool = fields.field(
      False, 'Adapt the clip to the median update norm (TFF\'s'
      ' gaussian_adaptive: part of the noise goes to the clipped count).'
  )

  def dp(self) -> Optional[privacy.DpConfig]:
    """The run's DP (None without --dp_noise_multiplier)."""
    if self.dp_noise_multiplier is None:
      return None
    return privacy.DpConfig(
        noise_multiplier=self.dp_noise_multiplier, clip=self.dp_clip,
        expected_clients=float(self.clients_per_round),
        num_clients=self.num_clients, seed=self.seed,
        adaptive_clip=self.dp_adaptive_clip)

  @property
  def cohort_rows(self) -> int:
    """Most clients in a round: --clients_per_round, or under DP's Poisson
    sampling its mean plus six standard deviations (beyond: truncated)."""
    if self.dp_noise_multiplier is None:
      return self.clients_per_round
    mean = float(self.clients_per_round)
    q = mean / self.num_clients
    return min(self.num_clients,
               math.ceil(mean + 6 * math.sqrt(mean * (1 - q))) + 1)


@dataclasses.dataclass(frozen=True)
class WorkerSection:
  """Where the clients run: TFF workers and the TLS that authenticates them."""

  workers: str = fields.field(
      '', 'host:port,... of TFF workers (python -m tff_fedprune.worker) to'
      ' run the clients on, or unix:/path sockets of workers on this machine;'
      ' default: a local worker owned by this process.'
  )
  worker_ca_cert: str = fields.field(
      '', 'PEM CA certificate that signed the --workers\' TLS certificates.'
  )
  worker_client_cert: str = fields.field(
      '', "PEM certificate of this driver, signed by the workers'"
      ' --tls_client_ca.'
  )
  worker_client_key: str = fields.field(
      '', 'PEM private key of --worker_client_cert.'
  )
  insecure_workers: bool = fields.field(
      False, 'Talk to --workers in plaintext without authentication (workers'
      ' started with --insecure_plaintext_no_auth, on a trusted network).'
  )

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


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(WorkerSection, PrivacySection, UploadSection,
                       AlgorithmSection,
                       DeviceSection, ModelSection, DataSection, RunSection):
  """Everything that defines a run (docs/design.md, section 5).

  Composed of its sections, whose fields it holds flat: flags, flagfiles
  and config.json name them as they always have.
  """

  def tiers(self) -> list[devices.DeviceTier]:
    """--device_tiers (raises `ConfigError` if malformed)."""
    try:
      return devices.parse_tiers(self.device_tiers)
    except devices.TierSpecError as e:
      raise ConfigError(str(e)) from e

  def client_tiers(self) -> Optional[np.ndarray]:
    """Each client's index in `tiers()`, or None without tiers."""
    return _client_tiers(self.device_tiers, self.tier_shares,
                         self.num_clients, self.seed)

  def keep_ratio_of(self, client_id: int) -> float:
    """Client `client_id`'s keep ratio in training: its tier's, if any."""
    tiers = self.client_tiers()
    if tiers is None:
      return super().keep_ratio_of(client_id)
    return self.tiers()[tiers[client_id]].keep_ratio

  def training_keep_ratio(self, client_id: int, round_num: int) -> float:
    """The keep ratio client `client_id` trains at in round `round_num`
    (1-based): its own, or on --keep_ratio_warmup_rounds' way to it."""
    own = self.keep_ratio_of(client_id)
    if not self.keep_ratio_warmup_rounds:
      return own
    warmup = self.keep_ratio_warmup_rounds
    dense_share = max(0.0, 1.0 - (round_num - 1) / warmup)
    return own + (1.0 - own) * dense_share


@functools.lru_cache(maxsize=16)
def _client_tiers(device_tiers, tier_shares, num_clients, seed):
  """`ExperimentConfig.client_tiers`, computed once per configuration."""
  try:
    tiers = devices.parse_tiers(device_tiers)
    if not tiers:
      return None
    shares = devices.parse_shares(tier_shares, len(tiers))
  except devices.TierSpecError as e:
    raise ConfigError(str(e)) from e
  assigned = devices.assign_tiers(num_clients, shares, seed)
  assigned.setflags(write=False)  # Shared between calls.
  return assigned


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

  Each field's own constraints come with it (`_field`); the rules between
  fields follow. `model_names` are the architectures the caller can build
  (all if empty).
  """
  for field in dataclasses.fields(config):
    problem = _field_problem(field, getattr(config, field.name), model_names)
    if problem:
      raise ConfigError(problem)
  for ok, message in _rules(config):
    if not ok:
      raise ConfigError(message)


def _field_problem(field: dataclasses.Field, value, model_names) -> str:
  """Why `value` does not fit `field`, or ''."""
  name = field.name
  options = fields.choices(field) or (
      tuple(model_names) if name == 'model' else ()
  )
  constraint = field.metadata['constraint']
  if options and value not in options:
    return (f'unknown {name.replace("_", " ")} {value!r}; choose from'
            f' {options}')
  if isinstance(value, float) and not math.isfinite(value):
    return f'--{name} must be finite, got {value}'
  if (isinstance(value, int) and not isinstance(value, bool)
      and name != 'seed' and abs(value) > _MAX_INTEGER):
    return f'--{name} must be at most {_MAX_INTEGER}, got {value}'
  if isinstance(value, str) and not fields.is_utf8(value):
    return f'--{name} must be UTF-8 text without NUL, got {value!r}'
  if constraint is not None and value is not None and not constraint.allows(
      value):
    label = getattr(constraint, 'label', '') or f'--{name}'
    return f'{label} must be {constraint.describe()}, got {value}'
  return ''


def _upload_rules(config: ExperimentConfig):
  """The value format's rules (`encoding.ValueFormat`), as flag errors."""
  yield (
      config.upload_rotation == 'none' or config.upload_bits < 32,
      f'--upload_rotation={config.upload_rotation} rotates quantised values:'
      ' give --upload_bits below 32',
  )
  block = config.upload_rotation_block
  yield (block & (block - 1) == 0,
         f'--upload_rotation_block must be a power of two, got {block}')
  yield (
      config.upload_bits > 2 or config.algorithm != 'scaffold',
      f'--upload_bits={config.upload_bits} quantises the model update only:'
      " scaffold's control variates are not quantised and would outweigh it",
  )


def _rules(config: ExperimentConfig):
  """(holds, message) of each rule between fields, in order."""
  yield (
      not config.error_feedback
      or config.algorithm in error_feedback.ALGORITHMS,
      f'--error_feedback serves {" and ".join(error_feedback.ALGORITHMS)},'
      f' not {config.algorithm}',
  )
  yield from _upload_rules(config)
  yield from _privacy_rules(config)
  keep_ratio = _field_of('keep_ratio').metadata['constraint']
  for ratio in parse_ratios(config.client_keep_ratios):
    yield (keep_ratio.allows(ratio),
           f'keep ratio must be {keep_ratio.describe()}, got {ratio}')
  yield from _device_rules(config)
  yield (
      config.clients_per_round <= config.num_clients,
      f'--clients_per_round={config.clients_per_round} exceeds'
      f' --num_clients={config.num_clients}',
  )
  yield from _worker_rules(config)
  yield (
      config.experiment_name not in ('', '.', '..')
      and not any(s and s in config.experiment_name
                  for s in (os.sep, os.altsep)),
      f'--experiment_name={config.experiment_name!r} must name a directory'
      ' inside --root_output_dir (not empty, ., .. or a path)',
  )
  for path in (config.root_output_dir, config.run_dir):
    yield (
        not os.path.exists(path) or os.path.isdir(path),
        f'output path {path} exists and is not a directory',
    )


def _privacy_rules(config: ExperimentConfig):
  """Server supports and DP, as flag errors."""
  dp = config.dp_noise_multiplier is not None
  server = config.upload_support == 'server'
  yield (not server or config.dynamic_pruning,
         '--upload_support=server chooses gated channels: it needs'
         ' --dynamic_pruning')
  yield (not dp or config.dp_clip is not None,
         '--dp_noise_multiplier needs --dp_clip (the L2 clip S)')
  yield (dp or config.dp_clip is None and not config.dp_adaptive_clip,
         '--dp_clip and --dp_adaptive_clip need --dp_noise_multiplier')
  yield (not dp or not config.dynamic_pruning or server,
         'DP needs every client to upload the same coordinates: a gated model'
         ' needs --upload_support=server')
  if not (dp or server):
    return
  what = 'DP' if dp else '--upload_support=server'
  yield (config.algorithm in server_support_lib.ALGORITHMS,
         f'{what} serves {" and ".join(server_support_lib.ALGORITHMS)}, not'
         f' {config.algorithm} (its uploads beyond the model update would'
         ' bypass the support, the clip and the noise)')
  yield (not dp or not config.tier_min_keep_ratio,
         'DP samples every client with probability q: --tier_min_keep_ratio'
         ' is not supported with it')
  yield (not config.error_feedback,
         f'{what} drops what a client trained off the support:'
         ' --error_feedback is not supported with it')
  yield (config.round_deadline_s is None,
         f'{what} is not supported with --round_deadline_s')
  yield (config.upload_rotation == 'none',
         f'{what} sends values through a secure sum: --upload_rotation=none')
  yield (config.upload_bits == 32 or (dp and not config.dp_adaptive_clip),
         f'--upload_bits={config.upload_bits} with {what} goes through a'
         ' secure sum bounded by the clip: it needs --dp_noise_multiplier'
         ' and --dp_clip, without --dp_adaptive_clip')
  yield (config.upload_bits == 32 or server or not config.dynamic_pruning,
         f'--upload_bits={config.upload_bits} under DP needs a server support')
  z = config.dp_noise_multiplier or 0.0
  yield (not config.dp_adaptive_clip or z < 0.1 * config.clients_per_round,
         f'--dp_adaptive_clip with --dp_noise_multiplier={z} needs'
         f' --clients_per_round above {10 * z:g} (TFF noises the clipped'
         ' count with std 0.05 per expected client)')


def _device_rules(config: ExperimentConfig):
  tiers = config.client_tiers()  # Raises ConfigError when malformed.
  yield (
      tiers is None or not config.client_keep_ratios,
      '--device_tiers replaces --client_keep_ratios (give a tier per keep'
      ' ratio, e.g. --device_tiers=0.5:1:1,1.0:1:1); set one of them',
  )
  yield (
      not config.tier_shares or tiers is not None,
      '--tier_shares needs --device_tiers',
  )
  yield (
      (tiers is not None or not config.tier_min_keep_ratio)
      and (tiers is None or any(
          config.keep_ratio_of(c) >= config.tier_min_keep_ratio
          for c in range(config.num_clients))),
      f'--tier_min_keep_ratio={config.tier_min_keep_ratio} leaves no client'
      ' (it needs --device_tiers with a tier at least that wide)',
  )
  yield (
      config.round_deadline_s is None or tiers is not None,
      '--round_deadline_s needs --device_tiers',
  )
  yield (
      config.channel_policy == 'feddp' or config.dynamic_pruning,
      f'--channel_policy={config.channel_policy} needs --dynamic_pruning',
  )
  yield (
      config.channel_policy == 'feddp' or (
          config.gate_selection == 'saliency' and not config.gate_balance),
      f'--channel_policy={config.channel_policy} keeps a fixed prefix:'
      ' --gate_selection=saliency and --gate_balance=0 only',
  )
  yield (
      not config.self_distillation or config.dynamic_pruning,
      '--self_distillation needs --dynamic_pruning (a width to distil into)',
  )
  yield (
      not config.keep_ratio_warmup_rounds or (
          config.dynamic_pruning and config.channel_policy == 'feddp'),
      '--keep_ratio_warmup_rounds serves gated models with'
      ' --channel_policy=feddp (a prefix device downloads its tier\'s'
      ' sub-model)',
  )
  yield (
      config.round_deadline_s is None or config.algorithm in (
          'fedavg', 'fedprox'),
      '--round_deadline_s serves fedavg and fedprox (FedNova and SCAFFOLD'
      ' weigh clients by their own rule)',
  )


def _worker_rules(config: ExperimentConfig):
  try:
    workers = worker_process.parse_addresses(config.workers)
  except ValueError as e:
    raise ConfigError(f'--workers: {e}') from e
  tls_files = (config.worker_ca_cert, config.worker_client_cert,
               config.worker_client_key)
  remote = [a for a in workers if not worker_process.is_local_socket(a)]
  yield (
      not remote or config.insecure_workers or all(tls_files),
      '--workers on host:port need --worker_ca_cert, --worker_client_cert and'
      ' --worker_client_key (mutual TLS), or --insecure_workers',
  )
  for path in filter(None, tls_files):
    yield os.path.isfile(path), f'no such file: {path}'


def _field_of(name: str) -> dataclasses.Field:
  return {f.name: f for f in dataclasses.fields(ExperimentConfig)}[name]
