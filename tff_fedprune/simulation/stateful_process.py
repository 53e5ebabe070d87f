"""A learning process whose clients keep state between rounds.

A simulated client keeps nothing between rounds, so `ClientStateProcess`
keeps it for them: it wraps the TFF learning process with the table of every
client's state (`client_states.ClientStateTable`: SCAFFOLD's c_k,
error-feedback residuals), hands each round's clients their own state as
client data, and applies the changes the round returned per slot. The table
is part of the program state it saves and restores. Without per-client
state it passes the process's state through unchanged.
"""

from typing import Optional

import tensorflow_federated as tff

from tff_fedprune import client_work
from tff_fedprune.simulation import client_states


class ClientStateProcess:
  """`process` plus the per-client state `client_state_spec` describes."""

  def __init__(
      self,
      process: tff.learning.templates.LearningProcess,
      client_state_spec,
  ):
    self.process = process
    self.table: Optional[client_states.ClientStateTable] = (
        client_states.ClientStateTable(client_state_spec)
        if client_state_spec else None
    )

  def initialize(self):
    return self.process.initialize()

  def get_model_weights(self, state):
    return self.process.get_model_weights(state)

  def client_data(self, inputs) -> list:
    """The TFF client data of `inputs` (`data_source.ClientInput`s)."""
    table = self.table
    return [
        client_work.client_data(
            i.batches,
            i.keep_ratio,
            slot=slot,
            client_state=table.get(i.client_id) if table is not None else None,
            upload_seed=i.rounding_seed,
            device=i.device,
        )
        for slot, i in enumerate(inputs)
    ]

  def next(self, state, inputs) -> tff.templates.MeasuredProcessOutput:
    """One round of the clients of `inputs`; updates their states."""
    output = self.process.next(state, self.client_data(inputs))
    if self.table is not None:
      self.table.apply(
          [i.client_id for i in inputs],
          output.state.client_work[client_work.CLIENT_STATE_UPDATES],
      )
    return output

  def program_state(self, state):
    """The process state, with the client state table if there is one."""
    if self.table is None:
      return state
    return {'process': state, 'client_states': self.table.to_program_state()}

  def load_program_state(self, saved):
    """The process state of `saved`; restores the client state table."""
    if self.table is None:
      return saved
    self.table.load_program_state(saved['client_states'])
    return saved['process']
