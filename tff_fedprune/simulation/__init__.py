"""The simulation harness: configuration, the round loop, measurements.

`config` (what defines a run), `loop` (sampling, rounds, checkpoints,
outputs), `client_states` (per-client state kept by the driver), `evaluation`
and `flops` (what is measured each round) and `reporting` (tables and plots
over run directories).
"""
