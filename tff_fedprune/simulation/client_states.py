"""Per-client state kept by the driver (SCAFFOLD's c_k), saved with the run.

A simulated client keeps nothing between rounds, so the driver does it for
them: the table holds the state of every client that has taken part (clients
never sampled hold zeros, which are not stored), hands client k only its own
(`get`, passed as client data), and applies the changes the round returned
per slot (`apply`, from the client work's `CLIENT_STATE_UPDATES`). Memory
grows with the clients that have taken part, never inside the TFF process,
whose broadcast stays O(model).
"""

import numpy as np
import tensorflow as tf


class ClientStateTable:
  """The states of the clients, by client id, shaped like `spec`."""

  def __init__(self, spec):
    self._spec = spec
    self._states: dict[int, list[np.ndarray]] = {}

  def _zeros(self) -> list[np.ndarray]:
    return [np.zeros(s.shape, s.dtype.as_numpy_dtype)
            for s in tf.nest.flatten(self._spec)]

  def get(self, client_id: int):
    """Client `client_id`'s state (zeros before it first took part)."""
    flat = self._states.get(client_id) or self._zeros()
    return tf.nest.pack_sequence_as(self._spec, flat)

  def apply(self, client_ids, updates) -> None:
    """Adds row `slot` of each update to the state of `client_ids[slot]`."""
    rows = [np.asarray(u) for u in tf.nest.flatten(updates)]
    for slot, client_id in enumerate(client_ids):
      current = self._states.get(client_id) or self._zeros()
      self._states[client_id] = [c + r[slot] for c, r in zip(current, rows)]

  def to_program_state(self) -> dict:
    """The table as arrays for `tff.program` state managers."""
    ids = sorted(self._states)
    flat = [
        np.stack([self._states[i][j] for i in ids])
        if ids else np.zeros((0,) + z.shape, z.dtype)
        for j, z in enumerate(self._zeros())
    ]
    return {'client_ids': np.array(ids, np.int64), 'states': flat}

  def load_program_state(self, value) -> None:
    ids = [int(i) for i in np.asarray(value['client_ids'])]
    stacked = [np.asarray(s) for s in value['states']]
    self._states = {
        client_id: [s[row] for s in stacked]
        for row, client_id in enumerate(ids)
    }
