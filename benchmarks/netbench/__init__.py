"""End-to-end network benchmark: test hosts in network namespaces, real horovodrun, per-step timing.

``benchmarks/bench_network.py`` is the command; this package holds its parts: ``hosts`` (the test
hosts and their links), ``models`` (the benchmark models), ``worker`` (what every rank runs),
``report`` (table, results file and plot).
"""
