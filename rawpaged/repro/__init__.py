"""The PagedAttention paper reproduced without PyTorch: `rawpaged repro all --out DIR`.

specs.py (model specs, hardware profiles) -> costmodel.py (step time) -> executor/simulated.py (the
simulator: real scheduler and KV managers, a cost-model clock) -> workloads.py (request streams) ->
driver.py (replay on a clock, record) -> runner.py (points, process pool) -> experiments.py (the
paper's figures, simulated) and real.py (small-scale real runs, validation, calibration) ->
report.py / explain.py / plots.py (REPORT.md, CSVs, PNGs) -> cli.py (`rawpaged repro`).
docs/repro.md says what each experiment draws, runs and compares.
"""
