"""The TFF runtime the project runs on: owned workers and execution contexts.

`worker_process` starts and owns TFF's `worker_binary`; `contexts` builds TFF
execution contexts on it or on remote workers; `worker` is the
`python -m tff_fedprune.worker` service; `relay.py` keeps the binary off the
network (private network namespace, Unix socket or mutual TLS in front).
"""

from tff_fedprune.runtime.contexts import call_watched
from tff_fedprune.runtime.contexts import create_distributed_context
from tff_fedprune.runtime.contexts import create_remote_context
from tff_fedprune.runtime.contexts import disable_default_context
from tff_fedprune.runtime.contexts import local_runtime
from tff_fedprune.runtime.worker_process import is_serving
from tff_fedprune.runtime.worker_process import open_channel
from tff_fedprune.runtime.worker_process import OwnedWorker
from tff_fedprune.runtime.worker_process import parse_addresses
from tff_fedprune.runtime.worker_process import tls_credentials
from tff_fedprune.runtime.worker_process import wait_until_ready
from tff_fedprune.runtime.worker_process import worker_binary_path
from tff_fedprune.runtime.worker_process import WorkerError
