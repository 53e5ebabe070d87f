"""Tables and plots from run directories (metrics.csv, config.json).

Runs that differ only in `seed` (and output location) form one group; a
group's figures are the mean and standard deviation over its seeds; "last 5"
accuracy is the mean of a run's last 5 evaluated rounds, as are the
over-fitting gaps of runs that measured them (`--measure_overfitting`): the
global model's accuracy on the pooled training data minus its test accuracy,
and the clients' trained models' mean accuracy on their own training data
minus the global test accuracy. Each group is compared with the dense
float32 group of the same algorithm, dataset, model and partition: its upload
saving is total upload / the dense group's.

Bytes to accuracy: each run is paired with the dense float32 run of the same
setting and seed; the target is `target_accuracy` if given, else 95% of that
dense run's last-5 accuracy. A run's upload to target is its cumulative
upload at the first evaluated round whose test accuracy reaches the target;
a run that never reaches it has none (the table says how many seeds did).
"""

import csv
import dataclasses
import json
import math
import os

import numpy as np
from scipy import stats  # Installed with scikit-learn.

from tff_fedprune.simulation import config as config_lib

_IGNORED_FOR_GROUPING = (
    'seed', 'experiment_name', 'root_output_dir', 'total_rounds',
    'eval_every', 'workers', 'target_accuracy',
)
TARGET_SHARE_OF_DENSE = 0.95
_LAST_EVALUATIONS = 5
_PAIRING_FIELDS = ('algorithm', 'dataset', 'model', 'partition',
                   'dirichlet_alpha', 'num_clients', 'clients_per_round')


@dataclasses.dataclass(frozen=True)
class Run:
  """One run directory's configuration and per-round metrics."""

  path: str
  config: dict
  rows: list

  def column(self, name: str) -> np.ndarray:
    """The metric `name` per round (NaN where the run did not record it)."""
    return np.array([float(r.get(name) or 'nan') for r in self.rows])

  def figures(self) -> dict:
    accuracy = self.column('test_accuracy')
    evaluated = ~np.isnan(accuracy)
    flops = self.column('flops_ratio')
    flops = flops[~np.isnan(flops)]
    return {
        'rounds': len(self.rows),
        'final_accuracy': float(accuracy[evaluated][-1]),
        'last5_accuracy': float(
            accuracy[evaluated][-_LAST_EVALUATIONS:].mean()
        ),
        'best_accuracy': float(accuracy[evaluated].max()),
        'personal_mean': float(
            self.column('personal_accuracy_mean')[evaluated][-1]
        ),
        'personal_worst10': float(
            self.column('personal_accuracy_worst10')[evaluated][-1]
        ),
        'upload_mb': float(self.column('upload_bytes').sum() / 1e6),
        'dense_upload_mb': float(
            self.column('dense_upload_bytes').sum() / 1e6
        ),
        'bits_per_parameter': float(
            32 * self.column('upload_bytes').sum()
            / self.column('dense_upload_bytes').sum()
        ),
        'flops_ratio': float(flops[-1]) if flops.size else math.nan,
        'wall_seconds': float(self.column('round_seconds').sum()),
        'train_test_gap': self._last_gap('train_accuracy', evaluated),
        'client_test_gap': self._last_gap('local_train_accuracy', evaluated),
        'dp_epsilon': float(self.column('dp_epsilon')[-1]),
    }

  def _last_gap(self, name: str, evaluated: np.ndarray) -> float:
    """Mean of `name` minus test accuracy over the last 5 evaluations."""
    gap = (self.column(name) - self.column('test_accuracy'))[evaluated]
    return float(gap[-_LAST_EVALUATIONS:].mean())


  def upload_to_target(self, target: float):
    """(round, cumulative upload bytes) when accuracy first reaches `target`.

    None if it never does.
    """
    accuracy = self.column('test_accuracy')
    reached = np.nonzero(accuracy >= target)[0]
    if not reached.size:
      return None
    first = int(reached[0])
    return (int(self.rows[first]['round']),
            int(self.column('upload_bytes')[:first + 1].sum()))


_REQUIRED_COLUMNS = ('round', 'test_accuracy', 'upload_bytes')


def load_run(path: str, config: dict = None) -> Run:
  """Reads a run directory; raises ValueError naming what is unusable.

  `config`: the run's configuration, if the caller has it (else config.json).
  """
  try:
    if config is None:
      with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
        config = json.load(f)
    with open(os.path.join(path, 'metrics.csv'), encoding='utf-8',
              newline='') as f:
      rows = list(csv.DictReader(f))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise ValueError(f'{path} is not a run directory: {e}') from None
  except ValueError as e:
    raise ValueError(f'{path}/config.json is not JSON ({e})') from None
  if not isinstance(config, dict):
    raise ValueError(f'{path}/config.json holds no configuration')
  if not rows:
    raise ValueError(f'{path} has no completed round')
  _check_rows(path, rows)
  return Run(path, config_lib.with_defaults(config), rows)


def _check_rows(path: str, rows: list) -> None:
  """Every row has the required columns, with numbers; some round evaluated."""
  where = os.path.join(path, 'metrics.csv')
  missing = [c for c in _REQUIRED_COLUMNS if c not in rows[0]]
  if missing:
    raise ValueError(f'{where} lacks the columns {missing}')
  for line, row in enumerate(rows, 2):
    for key, value in row.items():
      try:
        float(value or 'nan')
      except (TypeError, ValueError):
        raise ValueError(
            f'{where} line {line}: {key}={value!r} is not a number'
        ) from None
  if all(math.isnan(float(r['test_accuracy'] or 'nan')) for r in rows):
    raise ValueError(f'{where} has no evaluated round')


def _group_key(config: dict) -> tuple:
  return tuple(sorted(
      (k, v) for k, v in config.items() if k not in _IGNORED_FOR_GROUPING
  ))


def _label(config: dict) -> str:
  label = config.get('algorithm', 'fedavg')
  if config.get('dynamic_pruning'):
    ratios = config.get('client_keep_ratios') or config.get('keep_ratio')
    label += f' gated keep {ratios}'
    if config.get('salience_threshold'):
      label += f' tau {config["salience_threshold"]}'
    if config.get('gate_input', 'sigmoid') != 'sigmoid':
      label += f' gate {config["gate_input"]}'
    if config.get('gated_bn', 'masked') != 'masked':
      label += f' BN {config["gated_bn"]}'
    if config.get('gate_selection', 'saliency') != 'saliency':
      label += f' select {config["gate_selection"]}'
    if config.get('gate_balance', 0.0):
      label += f' balance {config["gate_balance"]:g}'
    if not config.get('gate_stem', True):
      label += ' stem dense'
    if config.get('aggregation', 'count_aware') != 'count_aware':
      label += f' {config["aggregation"]} mean'
  else:
    label += ' dense'
  if config.get('upload_support', 'client') != 'client':
    label += f' {config["upload_support"]} support'
  if config.get('dp_noise_multiplier') is not None:
    label += (f' DP z {config["dp_noise_multiplier"]:g}'
              f' clip {config["dp_clip"]:g}')
    if config.get('dp_adaptive_clip'):
      label += ' adaptive'
  if config.get('upload_bits', 32) != 32:
    label += f' {config["upload_bits"]}-bit'
  if config.get('upload_rotation', 'none') != 'none':
    label += f' {config["upload_rotation"]}'
  if config.get('error_feedback'):
    label += ' EF'
  return label


def _is_dense_reference(config: dict, of: dict) -> bool:
  """Whether `config` is the dense float32 counterpart of the run `of`."""
  return (not config.get('dynamic_pruning')
          and config.get('upload_bits', 32) == 32
          and all(config.get(k) == of.get(k) for k in _PAIRING_FIELDS))


def summarize(runs: list[Run], target_accuracy=None) -> list[dict]:
  """One row per group: mean and std of each figure over seeds.

  A group holds each seed once (two runs of one configuration and seed are
  an error); labels that would repeat name what differs. Upload vs dense
  compares the rounds both groups completed. `target_accuracy`: the accuracy
  for bytes to target (default: 95% of the paired dense run's last-5
  accuracy).
  """
  groups = {}
  for run in runs:
    groups.setdefault(_group_key(run.config), []).append(run)
  table = []
  for members in groups.values():
    _check_distinct_seeds(members)
    figures = [r.figures() for r in members]
    row = {'label': _label(members[0].config), 'config': members[0].config,
           'seeds': sorted(r.config.get('seed') for r in members),
           'runs': members}
    for name in figures[0]:
      values = np.array([f[name] for f in figures])
      row[name] = float(values.mean())
      row[f'{name}_std'] = float(values.std())
    row.update(_to_target(members, runs, target_accuracy))
    table.append(row)
  _disambiguate_labels(table)
  for row in table:
    dense = [other for other in table
             if _is_dense_reference(other['config'], row['config'])]
    row['upload_vs_dense'] = (
        _upload_ratio(row['runs'], dense[0]['runs']) if dense else math.nan
    )
  for row in table:
    del row['runs']
  return sorted(table, key=lambda r: r['label'])


def _check_distinct_seeds(members: list[Run]) -> None:
  seen = {}
  for run in members:
    seed = run.config.get('seed')
    if seed in seen:
      raise ValueError(
          f'{seen[seed]} and {run.path} are the same configuration and seed'
          f' {seed}; give one of them'
      )
    seen[seed] = run.path


def _disambiguate_labels(table: list[dict]) -> None:
  """Appends `field=value` of the fields that differ to repeated labels."""
  by_label = {}
  for row in table:
    by_label.setdefault(row['label'], []).append(row)
  for rows in by_label.values():
    if len(rows) < 2:
      continue
    keys = sorted({k for r in rows for k in r['config']}
                  - set(_IGNORED_FOR_GROUPING))
    differing = [k for k in keys
                 if len({repr(r['config'].get(k)) for r in rows}) > 1]
    for row in rows:
      row['label'] += ' ' + ' '.join(
          f'{k}={row["config"].get(k)}' for k in differing)


def _upload_ratio(runs: list[Run], dense_runs: list[Run]) -> float:
  """Mean upload of `runs` / that of `dense_runs`, over their common rounds."""
  rounds = min(len(r.rows) for r in runs + dense_runs)
  upload = lambda group: np.mean(
      [r.column('upload_bytes')[:rounds].sum() for r in group])
  return float(upload(runs) / upload(dense_runs))


def _to_target(members: list[Run], runs: list[Run], target_accuracy) -> dict:
  """A group's bytes to target, alone and against its paired dense runs."""
  reached_mb, ratios, with_target = [], [], 0
  for run in members:
    dense = [
        other for other in runs
        if _is_dense_reference(other.config, run.config)
        and other.config.get('seed') == run.config.get('seed')
    ]
    target = target_accuracy
    if target is None and dense:
      target = TARGET_SHARE_OF_DENSE * dense[0].figures()['last5_accuracy']
    if target is None:
      continue
    with_target += 1
    mine = run.upload_to_target(target)
    if mine is None:
      continue
    reached_mb.append(mine[1] / 1e6)
    theirs = dense[0].upload_to_target(target) if dense else None
    if theirs is not None:
      ratios.append(mine[1] / theirs[1])
  return {
      'target_runs': with_target,
      'target_reached': len(reached_mb),
      'upload_to_target_mb': (
          float(np.mean(reached_mb)) if reached_mb else math.nan
      ),
      'upload_to_target_mb_std': (
          float(np.std(reached_mb)) if reached_mb else math.nan
      ),
      'upload_to_target_vs_dense': (
          float(np.mean(ratios)) if ratios else math.nan
      ),
  }


def paired_interval(differences) -> tuple:
  """(mean, 95% t-interval half-width) of paired per-seed differences."""
  d = np.asarray(differences, np.float64)
  if len(d) < 2:
    return float(d.mean()) if len(d) else math.nan, math.nan
  half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
  return float(d.mean()), float(half)


def paired_against(runs: list[Run], reference_label: str) -> list[dict]:
  """Each group of `runs` against the group labelled `reference_label`.

  Per group of the reference's algorithm (the reference and dense groups
  aside): the label, the paired seeds, its last-5 accuracy minus the
  reference run's of the same seed (mean and 95% t half-width, points),
  and `summarize`'s upload vs dense, bits per parameter, bytes to target vs
  dense and seeds that reached the target.
  """
  last5 = {}
  for run in runs:
    last5.setdefault(_group_key(run.config), {})[run.config.get('seed')] = (
        run.figures()['last5_accuracy'])
  table = summarize(runs)
  reference = [r for r in table if r['label'] == reference_label]
  if not reference:
    raise ValueError(f'no runs labelled {reference_label!r}')
  theirs = last5[_group_key(reference[0]['config'])]
  rows = []
  for row in table:
    config = row['config']
    if (row is reference[0] or not config.get('dynamic_pruning')
        or config.get('algorithm') != reference[0]['config'].get('algorithm')):
      continue
    mine = last5[_group_key(config)]
    seeds = sorted(set(mine) & set(theirs))
    mean, half = paired_interval([mine[s] - theirs[s] for s in seeds])
    rows.append(dict(
        label=row['label'], seeds=len(seeds), difference=100 * mean,
        half_width=100 * half, upload_vs_dense=row['upload_vs_dense'],
        bits_per_parameter=row['bits_per_parameter'],
        to_target_vs_dense=row['upload_to_target_vs_dense'],
        reached=f"{row['target_reached']}/{row['target_runs']}"))
  return rows


def paired_markdown(rows: list[dict], reference: str) -> str:
  """`paired_against`'s rows as a markdown table."""
  lines = [
      f'| run | paired seeds | last-5 acc - {reference} (pt, 95%)'
      ' | upload vs dense | bits per parameter | to target vs dense'
      ' | reached target |',
      '| --- | --- | --- | --- | --- | --- | --- |',
  ]
  for r in rows:
    interval = ('' if math.isnan(r['half_width'])
                else f" ± {r['half_width']:.2f}")
    lines.append(
        f"| {r['label']} | {r['seeds']} | {r['difference']:+.2f}{interval}"
        f" | {r['upload_vs_dense']:.3f} | {r['bits_per_parameter']:.2f}"
        f" | {r['to_target_vs_dense']:.3f} | {r['reached']} |")
  return '\n'.join(lines) + '\n'


def markdown_table(table: list[dict]) -> str:
  """The summary as a markdown table (mean ± std over seeds)."""
  pm = lambda r, k, scale=1.0, fmt='.2f': (
      f'{r[k] * scale:{fmt}} ± {r[k + "_std"] * scale:{fmt}}')
  lines = [
      '| run | seeds | final acc % | last-5 acc % | best acc %'
      ' | client acc % (mean) | client acc % (worst 10%) | upload MB'
      ' | upload vs dense | bits per parameter | MB to target'
      ' | to target vs dense | reached target | FLOPs ratio | wall s |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |'
      ' --- | --- | --- | --- |',
  ]
  overfitting = any(not math.isnan(r['train_test_gap']) for r in table)
  if overfitting:
    lines[0] += ' train - test (pt) | client train - test (pt) |'
    lines[1] += ' --- | --- |'
  private = any(not math.isnan(r['dp_epsilon']) for r in table)
  if private:
    lines[0] += ' epsilon (delta 1/clients) |'
    lines[1] += ' --- |'
  for r in table:
    to_target = (
        pm(r, 'upload_to_target_mb') if r['target_reached'] else 'never'
    ) if r['target_runs'] else 'n/a'
    reached = (f"{r['target_reached']}/{r['target_runs']}"
               if r['target_runs'] else 'n/a')
    lines.append(
        f"| {r['label']} | {len(r['seeds'])} | {pm(r, 'final_accuracy', 100)}"
        f" | {pm(r, 'last5_accuracy', 100)}"
        f" | {pm(r, 'best_accuracy', 100)} | {pm(r, 'personal_mean', 100)}"
        f" | {pm(r, 'personal_worst10', 100)} | {pm(r, 'upload_mb')}"
        f" | {r['upload_vs_dense']:.3f}"
        f" | {r['bits_per_parameter']:.2f} | {to_target}"
        f" | {r['upload_to_target_vs_dense']:.3f}"
        f" | {reached}"
        f" | {pm(r, 'flops_ratio', fmt='.3f')}"
        f" | {r['wall_seconds']:.0f} |"
    )
    if overfitting:
      lines[-1] += (
          f" {pm(r, 'train_test_gap', 100)}"
          f" | {pm(r, 'client_test_gap', 100)} |"
      )
    if private:
      lines[-1] += f" {r['dp_epsilon']:.2f} |"
  return '\n'.join(lines) + '\n'


def plot_runs(runs: list[Run], out_dir: str,
              colour_by: str = 'algorithm') -> list[str]:
  """Writes the comparison plots as PNG files; returns their paths.

  One colour per algorithm (or per group label, `colour_by='label'`); gated
  runs solid, dense runs dashed. Rounds without a value (not evaluated, or
  dense FLOPs) are left out of a line.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  panels = [
      ('accuracy_vs_round.png', 'Test accuracy vs round', 'round',
       'test accuracy', lambda r: (r.column('round'),
                                   r.column('test_accuracy'))),
      ('accuracy_vs_upload.png', 'Test accuracy vs cumulative upload',
       'cumulative upload (MB)', 'test accuracy',
       lambda r: (np.cumsum(r.column('upload_bytes')) / 1e6,
                  r.column('test_accuracy'))),
      ('density_vs_round.png', 'Update density vs round', 'round',
       'kept share of coordinates', lambda r: (r.column('round'),
                                               r.column('update_density'))),
      ('flops_vs_round.png', 'Inference FLOPs ratio vs round', 'round',
       'dynamic / dense FLOPs', lambda r: (r.column('round'),
                                           r.column('flops_ratio'))),
      ('gate_jaccard_vs_round.png',
       'Gate dynamics: kept channel sets of two test images (1 = static)',
       'round', 'mean pairwise Jaccard (mean over gated layers)',
       lambda r: (r.column('round'), r.column('gate_jaccard'))),
  ]
  key = ((lambda r: r.config.get('algorithm', 'fedavg'))
         if colour_by == 'algorithm' else (lambda r: _label(r.config)))
  keys = sorted({key(r) for r in runs})
  colors = plt.get_cmap('tab10' if len(keys) <= 10 else 'tab20')
  paths = []
  for name, title, xlabel, ylabel, series in panels:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
      x, y = series(run)
      evaluated = ~np.isnan(y)
      label = f"{_label(run.config)} (seed {run.config.get('seed')})"
      ax.plot(
          x[evaluated], y[evaluated], label=label,
          color=colors(keys.index(key(run)) % colors.N),
          linestyle='-' if run.config.get('dynamic_pruning') else '--',
      )
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2 if len(runs) > 8 else 1)
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths
