"""The simulation harness: configuration, the training program, measurements.

`config` (what defines a run), `loop` (run directory, building the program's
parts, outputs), `program` (the training program: rounds, their metrics,
releases, saved state), `data_source` (client sampling and client data),
`stateful_process` and `client_states` (per-client state kept by the
driver), `evaluation` and `flops` (what is measured each round) and
`reporting` (tables and plots over run directories).
"""
