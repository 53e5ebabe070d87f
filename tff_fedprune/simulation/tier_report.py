"""The report of a heterogeneous federation: each method at each device tier.

docs/design.md, section 1.4. A method is a channel policy of a gated model
(feddp, heterofl, fjord) or a dense baseline (every client training the
full model, or only the clients of full-width tiers). Per method and tier,
over seeds: the last-5 test accuracy at the tier's keep ratio (a dense
model is the same model on every tier), the static export's accuracy and
LiteRT latency (`tier_exports.json`, when exported), and the tier's training
FLOPs over a dense client's (`clients.csv`). Per method: total upload,
simulated time to a target accuracy of the full-width model, and the paired
difference of FedDP's accuracy to each sub-model method with its 95%
interval (paired seeds). Then each sub-model method's accuracy at FedDP's
training FLOPs per tier (a keep ratio is not a compute level), and FedDP's
remedies (`methods.REMEDIES`) against FedDP on the same seed and rounds.
"""

import collections
import csv
import dataclasses
import json
import math
import os

import numpy as np

from tff_fedprune.simulation import devices
from tff_fedprune.simulation import evaluation
from tff_fedprune.simulation import methods
from tff_fedprune.simulation import reporting

LAST = 5  # Evaluations averaged at the end of a run.
TIER_EXPORTS = 'tier_exports.json'


def _last(values: np.ndarray) -> float:
  values = values[~np.isnan(values)]
  return float(values[-LAST:].mean()) if values.size else math.nan


def tier_accuracy(run: reporting.Run, label: str) -> float:
  """Last-5 test accuracy at tier `label` (a dense model: its only one)."""
  column = (evaluation.tier_column(label) if run.config['dynamic_pruning']
            else 'test_accuracy')
  return _last(run.column(column))


def truncated(run: reporting.Run, rounds: int) -> reporting.Run:
  """`run` as it stood after round `rounds` (training does not depend on
  the total: a shorter run's rounds are a longer one's first ones)."""
  return dataclasses.replace(
      run, rows=[r for r in run.rows if int(r['round']) <= rounds])


def time_to_target(run: reporting.Run, target: float) -> float:
  """Simulated seconds until the full-width accuracy first reaches `target`."""
  reached = np.nonzero(run.column('test_accuracy') >= target)[0]
  if not reached.size:
    return math.nan
  return float(run.column('simulated_seconds')[reached[0]])


def train_flops_ratios(run: reporting.Run) -> dict:
  """Per tier label: its training FLOPs over a dense client's on its data."""
  flops = collections.defaultdict(lambda: [0.0, 0.0])
  with open(os.path.join(run.path, 'clients.csv'), newline='') as f:
    for row in csv.DictReader(f):
      flops[row['tier']][0] += float(row['train_flops'])
      flops[row['tier']][1] += float(row['dense_train_flops'])
  return {label: trained / dense for label, (trained, dense) in flops.items()
          if dense}


def _exports(run: reporting.Run) -> dict:
  path = os.path.join(run.path, TIER_EXPORTS)
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return {e['label']: e for e in json.load(f)}


def _spread(values) -> tuple:
  values = [v for v in values if not math.isnan(v)]
  if not values:
    return math.nan, math.nan
  return float(np.mean(values)), float(np.std(values))


def summarize(runs: list, target: float) -> dict:
  """Per method: seeds, per-tier figures and the method's totals."""
  by_method = collections.defaultdict(list)
  for run in runs:
    by_method[methods.method_of(run.config)].append(run)
  labels = [t.label for t in _tiers(runs[0])]
  table = {}
  for method, members in by_method.items():
    members.sort(key=lambda r: r.config['seed'])
    ratios = [train_flops_ratios(r) for r in members]
    exported = [_exports(r) for r in members]
    tiers = {}
    for label in labels:
      exports = [e.get(label, {}) for e in exported]
      tiers[label] = dict(
          accuracy=_spread([tier_accuracy(r, label) for r in members]),
          export_accuracy=_spread(
              [e.get('export_accuracy', math.nan) for e in exports]),
          latency_ms=_spread([e.get('latency_ms', math.nan) for e in exports]),
          latency_vs_dense=_spread(
              [e.get('latency_ms', math.nan) / e['dense_latency_ms']
               if e else math.nan for e in exports]),
          train_flops=_spread([r.get(label, math.nan) for r in ratios]),
      )
    table[method] = dict(
        seeds=[r.config['seed'] for r in members], tiers=tiers,
        upload_mb=_spread([r.column('upload_bytes').sum() / 1e6
                           for r in members]),
        time_to_target=_spread([time_to_target(r, target) for r in members]),
        per_seed={label: {r.config['seed']: tier_accuracy(r, label)
                          for r in members} for label in labels},
        per_seed_export={label: {
            r.config['seed']: e[label]['export_accuracy']
            for r, e in zip(members, exported) if label in e}
                         for label in labels},
    )
  return table


def _tiers(run: reporting.Run):
  return devices.parse_tiers(run.config['device_tiers'])


def _pm(pair, scale=1.0, fmt='.1f') -> str:
  mean, std = pair
  if math.isnan(mean):
    return '-'
  return f'{mean * scale:{fmt}} ± {std * scale:{fmt}}'


METHOD_ORDER = ('feddp', 'feddp_trained_bn', 'heterofl', 'fjord', 'dense',
                'dense_full_tier')


def at_flops(tiers: dict, flops: float) -> tuple:
  """(accuracy, FLOPs it costs) a device with a training budget of `flops`
  gets from a method whose `tiers` (summarize's) cost what they cost: the
  best accuracy of the tiers costing at most that, linearly interpolated
  between tiers; the most costly tier's if all cost less, nan if all cost
  more."""
  points = sorted((t['train_flops'][0], t['accuracy'][0])
                  for t in tiers.values()
                  if not math.isnan(t['train_flops'][0] + t['accuracy'][0]))
  if not points or flops < points[0][0]:
    return math.nan, math.nan
  costs = [c for c, _ in points]
  best = np.maximum.accumulate([a for _, a in points])
  if flops >= costs[-1]:
    return float(best[-1]), costs[-1]
  return float(np.interp(flops, costs, best)), flops


def summarize_remedies(remedies: list, feddp: list, target: float) -> list:
  """Per remedy run and tier: its last-5 accuracy, FedDP's on the same
  seed over the same rounds, the tier's training FLOPs and the simulated
  time to `target`."""
  rows = []
  baseline = {r.config['seed']: r for r in feddp}
  for run in sorted(remedies, key=lambda r: methods.method_of(r.config)):
    seed, rounds = run.config['seed'], int(run.rows[-1]['round'])
    if seed not in baseline:
      continue
    same = truncated(baseline[seed], rounds)
    ratios = train_flops_ratios(run)
    for tier in _tiers(run):
      rows.append(dict(
          remedy=methods.method_of(run.config), seed=seed, rounds=rounds,
          tier=tier.label, accuracy=tier_accuracy(run, tier.label),
          feddp_accuracy=tier_accuracy(same, tier.label),
          train_flops=ratios.get(tier.label, math.nan),
          time_to_target=time_to_target(run, target),
          feddp_time_to_target=time_to_target(same, target)))
  return rows


def _paired(table: dict, other: str, key: str, label: str) -> tuple:
  """(paired seeds, 'mean ± 95% half-width' in points) of FedDP minus
  `other` in `table[...][key][label]`."""
  mine, theirs = table['feddp'][key][label], table[other][key][label]
  seeds = sorted(set(mine) & set(theirs))
  if not seeds:
    return 0, '-'
  mean, half = reporting.paired_interval([mine[s] - theirs[s] for s in seeds])
  interval = '' if math.isnan(half) else f' ± {100 * half:.1f}'
  return len(seeds), f'{100 * mean:+.1f}{interval}'


def _matched_flops_lines(table: dict) -> list:
  lines = ['', '| FedDP tier | FedDP train FLOPs vs dense | FedDP % |'
           ' heterofl % at those FLOPs | fjord % at those FLOPs |',
           '|' + ' --- |' * 5]
  for label, tier in table['feddp']['tiers'].items():
    flops = tier['train_flops'][0]
    cells = []
    for other in ('heterofl', 'fjord'):
      accuracy, cost = (at_flops(table[other]['tiers'], flops)
                        if other in table else (math.nan, math.nan))
      cell = '-' if math.isnan(accuracy) else f'{100 * accuracy:.1f}'
      if not math.isnan(cost) and cost < flops:
        cell += f' (at {cost:.2f})'
      cells.append(cell)
    lines.append(f'| {label} | {flops:.2f} | {100 * tier["accuracy"][0]:.1f} |'
                 f' {cells[0]} | {cells[1]} |')
  return lines


def _remedy_lines(rows: list, target: float) -> list:
  lines = ['', '| remedy | seed | rounds | tier | accuracy % (last 5) |'
           ' FedDP %, same seed and rounds | difference, points |'
           f' train FLOPs vs dense | simulated s to {target:.0%} (FedDP) |',
           '|' + ' --- |' * 9]
  seconds = lambda s: '-' if math.isnan(s) else f'{s:.0f}'
  for row in rows:
    lines.append(
        f'| {row["remedy"]} | {row["seed"]} | {row["rounds"]} | {row["tier"]} |'
        f' {100 * row["accuracy"]:.1f} | {100 * row["feddp_accuracy"]:.1f} |'
        f' {100 * (row["accuracy"] - row["feddp_accuracy"]):+.1f} |'
        f' {row["train_flops"]:.2f} | {seconds(row["time_to_target"])}'
        f' ({seconds(row["feddp_time_to_target"])}) |')
  return lines


def markdown(table: dict, target: float, remedies: tuple = ()) -> str:
  """The report: one row per method and tier, the paired differences, the
  accuracy at matched training FLOPs and, given `summarize_remedies` rows,
  FedDP's remedies."""
  methods = [m for m in METHOD_ORDER if m in table]
  lines = [
      '| method | seeds | tier | accuracy % (last 5) | final static export % |'
      ' export ms (LiteRT) | vs dense export | train FLOPs vs dense |'
      f' upload MB | simulated s to {target:.0%} |',
      '|' + ' --- |' * 10,
  ]
  for method in methods:
    row = table[method]
    for label, tier in row['tiers'].items():
      lines.append(
          f'| {method} | {len(row["seeds"])} | {label} |'
          f' {_pm(tier["accuracy"], 100)} | {_pm(tier["export_accuracy"], 100)}'
          f' | {_pm(tier["latency_ms"], 1, ".3f")} |'
          f' {_pm(tier["latency_vs_dense"], 1, ".2f")} |'
          f' {_pm(tier["train_flops"], 1, ".2f")} |'
          f' {_pm(row["upload_mb"], 1, ".1f")} |'
          f' {_pm(row["time_to_target"], 1, ".0f")} |')
  if 'feddp' in table:
    lines += ['', '| FedDP minus | tier | paired seeds | difference, points'
              ' (95% interval) | final static exports, same |',
              '| --- | --- | --- | --- | --- |']
    for other in ('heterofl', 'fjord', 'dense', 'feddp_trained_bn'):
      if other not in table:
        continue
      for label in table['feddp']['per_seed']:
        seeds, dynamic = _paired(table, other, 'per_seed', label)
        if seeds:
          exported = _paired(table, other, 'per_seed_export', label)[1]
          lines.append(f'| {other} | {label} | {seeds} | {dynamic} |'
                       f' {exported} |')
    lines += _matched_flops_lines(table)
  if remedies:
    lines += _remedy_lines(remedies, target)
  return '\n'.join(lines) + '\n'
