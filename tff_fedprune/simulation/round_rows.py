"""Per-round tables of many rows: `clients.csv` and `layers.csv`.

`metrics.csv` has one row a round (TFF's `CSVFileReleaseManager`); these
have one row per client or per gated layer of each round. `RoundRowsCsv` is
a `tff.program.ReleaseManager` of a round's rows: releasing round r
replaces every row of round r or later (a resumed run replays the round
that crashed), and the file is rewritten atomically (`files`), so a crash
leaves the previous version.
"""

import csv
import dataclasses
import io
import os

import tensorflow_federated as tff

from tff_fedprune import files


@dataclasses.dataclass(frozen=True)
class ClientRow:
  """One client's round in `clients.csv`."""

  round: int
  client: int
  keep_ratio: float
  train_flops: float  # Local training, forward + backward (+ pre-pass).
  dense_train_flops: float  # A dense client's on the same data.
  upload_bytes: int  # Its encoded update and any other upload.
  download_bytes: int = 0  # The model (a prefix policy's: its sub-model).
  tier: str = ''  # Its device tier's label ('' without --device_tiers).
  simulated_seconds: float = float('nan')  # Download, training and upload.


@dataclasses.dataclass(frozen=True)
class LayerRow:
  """One gated layer's round in `layers.csv`."""

  round: int
  layer: str
  computed_share: float  # Mean over training samples of |U| / C.


def columns(row_type) -> list[str]:
  return [f.name for f in dataclasses.fields(row_type)]


class RoundRowsCsv(tff.program.ReleaseManager):
  """Releases a round's rows (dataclasses of `row_type`) to a CSV file."""

  def __init__(self, path: str, row_type):
    self.path = path
    self.columns = columns(row_type)

  async def release(self, value, key) -> None:
    """`value`: the rows of round `key`; earlier rounds' rows are kept."""
    kept = [r for r in self.read() if int(r['round']) < int(key)]
    out = io.StringIO()
    writer = csv.DictWriter(out, self.columns, lineterminator='\n')
    writer.writeheader()
    writer.writerows(kept)
    writer.writerows(dataclasses.asdict(r) for r in value)
    files.write_atomically(self.path, out.getvalue().encode())

  def read(self) -> list[dict]:
    """The rows written so far (strings, by column)."""
    if not os.path.exists(self.path):
      return []
    with open(self.path, newline='') as f:
      return list(csv.DictReader(f))
