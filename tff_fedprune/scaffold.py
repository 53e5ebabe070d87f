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

from tff_fedprune import algorithm
from tff_fedprune import fednova
from tff_fedprune import uplink


class Scaffold(algorithm.Algorithm):
  """Control variates c (server, broadcast) and c_k (per client)."""

  name = 'scaffold'
  metric_names = ('control_upload_bytes',)
  state_travels = True  # c goes down with the model, dc_k comes back.

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

  def gradient_correction(self, server_state, client_state):
    return tuple(
        a - b for a, b in zip(server_state['c'], client_state['c_k'])
    )

  def client_output(self, client):
    local = client.local
    k_lr = (
        fednova.normalizer(tf.maximum(local.steps, 1), self.momentum)
        * self.learning_rate
    )
    masks = local.mask.trainable
    control_delta = tuple(
        m * (d / k_lr - ci)
        for m, d, ci in zip(masks, local.delta.trainable,
                            client.server_state['c'])
    )
    specs = [tf.TensorSpec(cd.shape, cd.dtype) for cd in control_delta]
    return algorithm.ClientOutput(
        client.update,
        state_change=collections.OrderedDict(c_k=control_delta),
        metrics={'control_upload_bytes': uplink.Uplink(specs).upload_bytes(
            control_delta, masks)},
    )

  def update_server_state(self, state, client_state_updates):
    return collections.OrderedDict(
        c=tuple(
            c + tf.reduce_sum(d, axis=0) / self.num_clients
            for c, d in zip(state['c'], client_state_updates['c_k'])
        )
    )
