"""Dynamic-pruning federated learning (FedDP) on TensorFlow Federated.

Importing the package replaces TFF's default execution context, whose worker
process outlives Python, with none: computations run inside
`tff_fedprune.runtime.local_runtime()` or another installed context.
"""

from tff_fedprune import runtime as _runtime  # pylint: disable=unused-import
