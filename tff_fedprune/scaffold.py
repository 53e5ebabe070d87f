"""SCAFFOLD (Karimireddy et al., 2020) with salience-masked control variates.

The server holds the control variate c and broadcasts it; the driver holds
each client's c_k and hands client k only its own, as client data. The local
gradient is corrected by c - c_k on kept channels (`local_training`). After
training, by option II of the paper,

    c_k+ = c_k - c + delta / (a_k lr)

where a_k is FedNova's effective step count (K without momentum: with
momentum m the K steps move the weights by lr * a_k mean gradients, and
dividing by K would overstate the gradient up to 1 / (1 - m) times; SCAFFOLD
diverged that way at m = 0.9). The change dc_k = c_k+ - c_k is applied only
where the salience mask kept the weight; it is encoded and counted as upload,
returned to the driver by the client's slot, and the server sets
c <- c + (1 / N) sum_k dc_k over the N clients of the federation.
"""

import collections

import tensorflow as tf

from tff_fedprune import client_work
from tff_fedprune import encoding
from tff_fedprune import fednova


class Scaffold(client_work.Algorithm):
  """Control variates c (server, broadcast) and c_k (per client)."""

  name = 'scaffold'
  metric_names = ('control_upload_bytes',)

  def __init__(self, num_clients: int, learning_rate: float, momentum: float):
    if num_clients < 1:
      raise ValueError('scaffold needs num_clients >= 1 for its variates')
    self.num_clients = num_clients
    self.learning_rate = learning_rate
    self.momentum = momentum

  def server_state_spec(self, trainable_specs):
    return collections.OrderedDict(c=tuple(trainable_specs))

  def client_state_spec(self, trainable_specs):
    return collections.OrderedDict(c_k=tuple(trainable_specs))

  def correction(self, server_state, client_state):
    return tuple(
        a - b for a, b in zip(server_state['c'], client_state['c_k'])
    )

  def finish(self, *, update, delta, mask, steps, server_state, client_state,
             rounding_seed):
    del client_state, rounding_seed
    k_lr = (
        fednova.normalizer(tf.maximum(steps, 1), self.momentum)
        * self.learning_rate
    )
    control_delta = tuple(
        m * (d / k_lr - ci)
        for m, d, ci in zip(mask.trainable, delta.trainable, server_state['c'])
    )
    upload = tf.add_n([
        encoding.encoded_bytes(encoding.TensorCodec(cd.shape).encode(cd, m))
        for cd, m in zip(control_delta, mask.trainable)
    ])
    return (
        update,
        {},
        collections.OrderedDict(c_k=control_delta),
        {'control_upload_bytes': upload},
    )

  def update_server_state(self, state, client_state_updates):
    return collections.OrderedDict(
        c=tuple(
            c + tf.reduce_sum(d, axis=0) / self.num_clients
            for c, d in zip(state['c'], client_state_updates['c_k'])
        )
    )
