"""The simulation harness: configuration, the training program, measurements.

`config` (what defines a run), `loop` (run directory, building the program's
parts, outputs), `program` (the training program: rounds, their metrics,
releases, saved state), `data_source` (client sampling and client data),
`stateful_process` and `client_states` (per-client state kept by the
driver), `devices` (device tiers, simulated round time), `evaluation` and
`flops` (what is measured each round), `reporting` (tables and plots over
run directories), and `methods` and `tier_report` (the methods a
heterogeneous federation compares, and their report).
"""
