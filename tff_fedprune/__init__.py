"""Dynamic-pruning federated learning (FedDP) on TensorFlow Federated.

The method, in the order of a round (docs/design.md): `gated_conv` (the gated
layer), `model_state` (global weights vs client-local state), `salience`
(channel-structured masks), `local_training`, `client_work` (with the
algorithm hooks of `algorithm`, `fednova`, `scaffold` and `error_feedback`),
`uplink` and `encoding` (what a client sends), `aggregation`, `finalizer` and
`learning_process` (their composition). Apart from it: `data` (sources and
partitions), `simulation` (configuration, the training program, evaluation,
FLOPs, reports), `runtime` (owned TFF workers and
contexts) and `export` (TFLite).

Importing the package imports nothing (the worker service and the
command-line programs start without TensorFlow). Importing `runtime` or
`learning_process` removes TFF's default execution context, whose
`worker_binary` would outlive Python and hold its stdout: computations then
run only inside `runtime.local_runtime()` or another installed context, and
calling one outside raises instead of starting an orphan process.
"""
