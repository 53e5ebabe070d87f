"""Partitions of a labelled set into clients (iid, Dirichlet label skew, shards).

Each partition returns one int64 index array per client, sorted, disjoint,
deterministic for a given seed, every client non-empty. `dirichlet` and
`shards` follow NIID-Bench (Li et al. 2021), the code base the FedDP paper's
experiments were run on.
"""

from collections.abc import Sequence

import numpy as np

PARTITIONS = ('iid', 'dirichlet', 'shards')
_DIRICHLET_MIN_CLIENT_SIZE = 10
_DIRICHLET_MAX_TRIES = 1000


class PartitionError(ValueError):
  """A partition cannot be formed from the given data and parameters."""


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
  """Uniformly random, near-equal shares."""
  _check_clients(labels, num_clients)
  perm = np.random.default_rng(seed).permutation(len(labels))
  return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
  """Label skew: client shares of each class drawn from Dir(alpha).

  As NIID-Bench: a client already holding at least its fair share receives no
  more of the next class, and the draw is repeated until every client holds at
  least min(10, N / num_clients) examples.
  """
  _check_clients(labels, num_clients)
  if not alpha > 0:
    raise PartitionError(f'dirichlet alpha must be > 0, got {alpha}')
  rng = np.random.default_rng(seed)
  n = len(labels)
  min_size = min(_DIRICHLET_MIN_CLIENT_SIZE, n // num_clients)
  classes = np.unique(labels)
  for _ in range(_DIRICHLET_MAX_TRIES):
    shares = [[] for _ in range(num_clients)]
    for c in classes:
      idx = rng.permutation(np.flatnonzero(labels == c))
      p = rng.dirichlet(np.full(num_clients, alpha))
      sizes = np.array([sum(len(s) for s in client) for client in shares])
      p = p * (sizes < n / num_clients)
      if p.sum() == 0:
        p = np.ones(num_clients)
      cuts = (np.cumsum(p / p.sum()) * len(idx)).astype(int)[:-1]
      for client, part in zip(shares, np.split(idx, cuts)):
        client.append(part)
    result = [np.sort(np.concatenate(s)).astype(np.int64) for s in shares]
    if min(len(r) for r in result) >= max(min_size, 1):
      return result
  raise PartitionError(
      f'no Dirichlet(alpha={alpha}) partition of {n} examples gave every one of'
      f' {num_clients} clients at least {min_size} examples; use fewer clients'
      ' or a larger alpha'
  )


def shards(
    labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int
) -> list[np.ndarray]:
  """Each client holds `classes_per_client` classes, shared evenly.

  Client i always gets class i mod C first (so classes are covered when there
  are enough clients), then distinct random others; each class's examples are
  split evenly among the clients holding it.
  """
  _check_clients(labels, num_clients)
  classes = np.unique(labels)
  if not 1 <= classes_per_client <= len(classes):
    raise PartitionError(
        f'classes_per_client must be in [1, {len(classes)}], got'
        f' {classes_per_client}'
    )
  rng = np.random.default_rng(seed)
  held = []
  for i in range(num_clients):
    first = classes[i % len(classes)]
    others = rng.permutation(classes[classes != first])
    held.append([first, *others[: classes_per_client - 1]])
  shares = [[] for _ in range(num_clients)]
  for c in classes:
    holders = [i for i, h in enumerate(held) if c in h]
    if not holders:
      continue
    idx = rng.permutation(np.flatnonzero(labels == c))
    if len(idx) < len(holders):
      raise PartitionError(
          f'class {c} has {len(idx)} examples for {len(holders)} clients'
      )
    for i, part in zip(holders, np.array_split(idx, len(holders))):
      shares[i].append(part)
  return [np.sort(np.concatenate(s)).astype(np.int64) for s in shares]


def partition(
    labels: np.ndarray,
    num_clients: int,
    method: str,
    seed: int,
    dirichlet_alpha: float = 0.5,
    classes_per_client: int = 2,
) -> list[np.ndarray]:
  """Dispatches to the partition `method` (one of `PARTITIONS`)."""
  if method == 'iid':
    return iid(labels, num_clients, seed)
  if method == 'dirichlet':
    return dirichlet(labels, num_clients, dirichlet_alpha, seed)
  if method == 'shards':
    return shards(labels, num_clients, classes_per_client, seed)
  raise PartitionError(f'unknown partition {method!r}; choose from {PARTITIONS}')


def split_like(
    train_labels: np.ndarray,
    train_parts: Sequence[np.ndarray],
    test_labels: np.ndarray,
    seed: int,
) -> list[np.ndarray]:
  """Splits a test set among clients with each client's training label mix.

  Test examples of class c go to clients in proportion to how many training
  examples of c each holds, so a client's local test split measures the
  distribution it trained on (personalised evaluation).
  """
  rng = np.random.default_rng(seed)
  num_clients = len(train_parts)
  counts = label_histogram(train_labels, train_parts, int(test_labels.max()) + 1)
  shares = [[] for _ in range(num_clients)]
  for c in np.unique(test_labels):
    idx = rng.permutation(np.flatnonzero(test_labels == c))
    if c >= counts.shape[1] or counts[:, c].sum() == 0:
      continue
    p = counts[:, c] / counts[:, c].sum()
    cuts = np.round(np.cumsum(p) * len(idx)).astype(int)[:-1]
    for client, part in zip(shares, np.split(idx, cuts)):
      client.append(part)
  return [
      np.sort(np.concatenate(s)).astype(np.int64) if s else np.zeros(0, np.int64)
      for s in shares
  ]


def label_histogram(
    labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int
) -> np.ndarray:
  """Counts (num_clients, num_classes) of each class on each client."""
  return np.stack(
      [np.bincount(labels[p], minlength=num_classes) for p in parts]
  )


def _check_clients(labels: np.ndarray, num_clients: int) -> None:
  if num_clients < 1:
    raise PartitionError(f'num_clients must be >= 1, got {num_clients}')
  if num_clients > len(labels):
    raise PartitionError(
        f'{num_clients} clients cannot each get one of {len(labels)} examples'
    )
