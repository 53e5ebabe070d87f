"""The TFF runtime the project runs on: owned workers and execution contexts.

`worker_process` starts and owns TFF's `worker_binary`; `contexts` builds TFF
execution contexts on it or on remote workers; `worker` is the
`python -m tff_fedprune.worker` service; `relay.py` keeps the binary off the
network (private network namespace, Unix socket or mutual TLS in front).

The names below are loaded on first use, so that the worker service
(`worker`, `worker_process`) starts without importing TensorFlow Federated.
"""

import importlib

_EXPORTS = {
    'contexts': ('call_watched', 'create_distributed_context',
                 'create_remote_context', 'disable_default_context',
                 'local_runtime'),
    'worker_process': ('check_worker_certificate', 'is_local_socket',
                       'is_serving',
                       'open_channel', 'OwnedWorker', 'tls_client_context',
                       'parse_addresses', 'tls_credentials',
                       'wait_until_ready', 'worker_binary_path',
                       'WorkerError'),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items()
              for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
  if name not in _MODULE_OF:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module = importlib.import_module(f'{__name__}.{_MODULE_OF[name]}')
  return getattr(module, name)
