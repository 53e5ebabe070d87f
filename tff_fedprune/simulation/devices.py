"""Device tiers of a heterogeneous federation and its simulated round time.

docs/design.md, section 1.4. A tier is what a class of devices can do: the
share of channels it trains and runs (its keep ratio, its capacity), its
compute speed relative to a reference device of `reference_flops_per_s`,
and its link's bandwidth in Mbps (10^6 bit/s) each way. Clients are put in
tiers by `assign_tiers`, a function of the seed only, so a resumed run and
every method of a comparison see the same devices.

A client's simulated round time is its download, its training FLOPs (what
it really computed, `compact_training`) at its tier's rate and its encoded
upload (`client_seconds`); a synchronous round lasts as long as its slowest
client. TFF has no such model; FedScale simulates the same from traces.
"""

import dataclasses
from typing import Sequence

import numpy as np

BITS_PER_BYTE = 8
BITS_PER_MEGABIT = 1e6


class TierSpecError(ValueError):
  """A --device_tiers or --tier_shares value is malformed."""


@dataclasses.dataclass(frozen=True)
class DeviceTier:
  """One class of devices."""

  keep_ratio: float  # Capacity: the share of channels it trains and runs.
  speed: float  # Compute rate over the reference device's.
  mbps: float  # Link bandwidth, 10^6 bit/s, each way.
  label: str  # The keep ratio as written (`test_accuracy_tier_<label>`).


def parse_tiers(spec: str) -> list[DeviceTier]:
  """'0.5:1:1,1.0:4:10' (keep:speed:Mbps,...) -> tiers; [] for ''."""
  tiers = []
  for item in filter(None, (s.strip() for s in spec.split(','))):
    parts = item.split(':')
    try:
      keep, speed, mbps = (float(p) for p in parts)
    except ValueError:
      raise TierSpecError(
          f'--device_tiers item {item!r} is not keep_ratio:speed:Mbps'
      ) from None
    if not 0 < keep <= 1 or speed <= 0 or mbps <= 0 or not all(
        np.isfinite([keep, speed, mbps])):
      raise TierSpecError(
          f'--device_tiers item {item!r}: keep ratio must be in (0, 1],'
          ' speed and Mbps finite and > 0')
    tiers.append(DeviceTier(keep, speed, mbps, parts[0].strip()))
  labels = [t.label for t in tiers]
  if len(set(labels)) != len(labels):
    raise TierSpecError(f'--device_tiers={spec!r} repeats a keep ratio')
  return tiers


def parse_shares(spec: str, num_tiers: int) -> list[float]:
  """'0.4,0.3,0.3' -> shares (summing to 1); equal shares for ''."""
  if not spec.strip():
    return [1.0 / num_tiers] * num_tiers
  try:
    shares = [float(s) for s in spec.split(',') if s.strip()]
  except ValueError:
    raise TierSpecError(f'--tier_shares={spec!r} is not a list of numbers'
                        ) from None
  if len(shares) != num_tiers:
    raise TierSpecError(f'--tier_shares has {len(shares)} values for'
                        f' {num_tiers} device tiers')
  if any(not np.isfinite(s) or s < 0 for s in shares) or not np.isclose(
      sum(shares), 1.0, atol=1e-6):
    raise TierSpecError(f'--tier_shares={spec!r} must be >= 0 and sum to 1')
  return shares


def assign_tiers(num_clients: int, shares: Sequence[float],
                 seed: int) -> np.ndarray:
  """Each client's tier index: round(share * N) clients per tier, seeded.

  Counts are apportioned by largest remainder (they sum to N); which
  clients fall in which tier is a permutation seeded by `seed` alone.
  """
  exact = np.asarray(shares, np.float64) * num_clients
  counts = np.floor(exact).astype(int)
  by_remainder = np.argsort(-(exact - counts), kind='stable')
  counts[by_remainder[:num_clients - counts.sum()]] += 1
  order = np.random.default_rng([seed, 0x7E125]).permutation(num_clients)
  tiers = np.empty(num_clients, np.int64)
  tiers[order] = np.repeat(np.arange(len(shares)), counts)
  return tiers


@dataclasses.dataclass(frozen=True)
class ClientTime:
  """A client's simulated seconds in a round, by phase."""

  download: float
  compute: float
  upload: float

  @property
  def total(self) -> float:
    return self.download + self.compute + self.upload


def client_seconds(tier: DeviceTier, *, train_flops: float,
                   download_bytes: float, upload_bytes: float,
                   reference_flops_per_s: float) -> ClientTime:
  """How long `tier`'s device takes for its round."""
  seconds_per_byte = BITS_PER_BYTE / (tier.mbps * BITS_PER_MEGABIT)
  return ClientTime(
      download=download_bytes * seconds_per_byte,
      compute=train_flops / (tier.speed * reference_flops_per_s),
      upload=upload_bytes * seconds_per_byte,
  )


@dataclasses.dataclass(frozen=True)
class Federation:
  """A run's devices: each client's tier and the bytes its download moves."""

  tiers: tuple  # `DeviceTier`s.
  client_tiers: np.ndarray  # Each client's index in `tiers`.
  download_bytes: tuple  # Per tier: the model (or sub-model) it receives.
  reference_flops_per_s: float

  def tier_of(self, client_id: int) -> DeviceTier:
    return self.tiers[self.client_tiers[client_id]]

  def download_of(self, client_id: int) -> int:
    return self.download_bytes[self.client_tiers[client_id]]

  def device_vector(self, client_id: int) -> np.ndarray:
    """The client's `client_work.DEVICE_FIELDS` (for a round deadline)."""
    tier = self.tier_of(client_id)
    return np.array([
        tier.speed * self.reference_flops_per_s,
        tier.mbps * BITS_PER_MEGABIT / BITS_PER_BYTE,
        self.download_of(client_id),
    ], np.float64)

  def seconds(self, client_id: int, train_flops: float,
              upload_bytes: float) -> ClientTime:
    return client_seconds(
        self.tier_of(client_id), train_flops=train_flops,
        download_bytes=self.download_of(client_id),
        upload_bytes=upload_bytes,
        reference_flops_per_s=self.reference_flops_per_s)
