"""Error feedback (EF-SGD) for masked, quantised uploads.

docs/design.md, section 3. Client k keeps a residual e_k of what its past
uploads dropped. In a round it forms c = delta + e_k over the trainable
weights, uploads c * M (the salience mask M, values quantised by the
aggregator's `uplink.Uplink`) and keeps

    e_k <- c - decode(encode(c * M))

so masked-out coordinates (channels below the salience threshold) and
rounding errors are sent later instead of lost. The client computes the
decoded upload itself (`uplink.Uplink.round_trip`): the rounding is a
function of the values and the round's rounding seed, so it equals what the
server decodes. Moving BN statistics are not corrected.

The residual is per-client state: the driver keeps it and hands client k
only its own, as client data (`client_work`, `simulation.client_states`);
a client that is not sampled keeps its residual. It lives on the client, so
it is not counted as upload. It serves FedAvg and FedProx; FedNova rescales
and SCAFFOLD corrects the uploaded update, and neither is defined with it.
"""

import collections
import dataclasses

import tensorflow as tf
import tensorflow_federated as tff

from tff_fedprune import algorithm as algorithm_lib
from tff_fedprune import encoding
from tff_fedprune import uplink as uplink_lib

ALGORITHMS = ('fedavg', 'fedprox')


class ErrorFeedback(algorithm_lib.Algorithm):
  """Wraps FedAvg or FedProx: clients carry forward what they did not send.

  Every hook is the wrapped algorithm's, except that the client state gains
  the residual and the client's upload is corrected by it.
  """

  def __init__(self, inner: algorithm_lib.Algorithm,
               values: encoding.ValueFormat = encoding.ValueFormat()):
    if inner.name not in ALGORITHMS:
      raise ValueError(
          f'error feedback serves {" and ".join(ALGORITHMS)}, not'
          f' {inner.name}'
      )
    self.inner = inner
    self._values = values

  name = property(lambda self: self.inner.name)
  prox_mu = property(lambda self: self.inner.prox_mu)
  metric_names = property(lambda self: self.inner.metric_names)
  state_travels = property(lambda self: self.inner.state_travels)

  def server_state_spec(self, trainable_specs):
    return self.inner.server_state_spec(trainable_specs)

  def client_state_spec(self, trainable_specs):
    spec = collections.OrderedDict(residual=tuple(trainable_specs))
    spec.update(self.inner.client_state_spec(trainable_specs))
    return spec

  def gradient_correction(self, server_state, client_state):
    return self.inner.gradient_correction(
        server_state, self._inner_state(client_state)
    )

  def _inner_state(self, client_state):
    inner = collections.OrderedDict(
        (k, v) for k, v in client_state.items() if k != 'residual'
    )
    return inner or None

  def client_output(self, client):
    residual = client.client_state['residual']
    inner = self.inner.client_output(dataclasses.replace(
        client, client_state=self._inner_state(client.client_state)
    ))
    corrected = [d + e for d, e in zip(client.local.delta.trainable, residual)]
    uplink = uplink_lib.Uplink(
        [tf.TensorSpec(c.shape, c.dtype) for c in corrected], self._values
    )
    masks = list(client.local.mask.trainable)
    to_send = [c * m for c, m in zip(corrected, masks)]
    sent = uplink.round_trip(
        to_send, masks,
        client.rounding_seed if self._values.quantized else None
    )
    change = collections.OrderedDict(
        residual=tuple(c - s - e for c, s, e in zip(corrected, sent, residual))
    )
    change.update(inner.state_change or {})
    update = tff.learning.models.ModelWeights(
        tuple(to_send), inner.update.non_trainable
    )
    return dataclasses.replace(inner, update=update, state_change=change)

  def update_server_state(self, state, client_state_updates):
    return self.inner.update_server_state(state, client_state_updates)

  def aggregator(self, factory):
    return self.inner.aggregator(factory)
