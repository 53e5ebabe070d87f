"""Error feedback (EF-SGD) for masked, quantised uploads.

docs/design.md, section 3. Client k keeps a residual e_k of what its past
uploads dropped. In a round it forms c = delta + e_k over the trainable
weights, uploads c * M (the salience mask M, values quantised by the
aggregator's `encoding.TensorCodec`) and keeps

    e_k <- c - decode(encode(c * M))

so masked-out coordinates (channels below the salience threshold) and
rounding errors are sent later instead of lost. The client computes the
decoded upload itself: the rounding is a function of the values and the
round's rounding seed, so it equals what the server decodes. Moving BN
statistics are not corrected.

The residual is per-client state: the driver keeps it and hands client k
only its own, as client data (`client_work`, `simulation.client_states`);
a client that is not sampled keeps its residual. It lives on the client, so
it is not counted as upload. It serves FedAvg and FedProx; FedNova rescales
and SCAFFOLD corrects the uploaded update, and neither is defined with it.
"""

import collections

import tensorflow as tf
import tensorflow_federated as tff

from tff_fedprune import client_work
from tff_fedprune import encoding

ALGORITHMS = ('fedavg', 'fedprox')


class ErrorFeedback(client_work.Algorithm):
  """FedAvg or FedProx whose clients carry forward what they did not send."""

  def __init__(self, inner: client_work.Algorithm, upload_bits: int = 32):
    if inner.name not in ALGORITHMS:
      raise ValueError(
          f'error feedback serves {" and ".join(ALGORITHMS)}, not'
          f' {inner.name}'
      )
    encoding.check_upload_bits(upload_bits)
    self.name = inner.name
    self.prox_mu = inner.prox_mu
    self._bits = upload_bits

  def client_state_spec(self, trainable_specs):
    return collections.OrderedDict(residual=tuple(trainable_specs))

  def finish(self, *, update, delta, mask, steps, server_state, client_state,
             rounding_seed):
    del steps, server_state
    residual = client_state['residual']
    # The aggregator seeds tensor i of the flattened update (trainable first).
    seeds = encoding.tensor_seeds(
        rounding_seed if self._bits < 32 else None, len(residual)
    )
    corrected = [d + e for d, e in zip(delta.trainable, residual)]
    to_send, change = [], []
    for c, m, e, seed in zip(corrected, mask.trainable, residual, seeds):
      codec = encoding.TensorCodec(c.shape, self._bits)
      masked = c * m
      sent, _ = codec.decode(codec.encode(masked, m, seed))
      to_send.append(masked)
      change.append(c - sent - e)
    update = tff.learning.models.ModelWeights(
        tuple(to_send), update.non_trainable
    )
    return update, {}, collections.OrderedDict(residual=tuple(change)), {}
