"""Harness behind `bench/agents_bench.py`: agents wire helpers, the webhook receiver and the
workloads. Servers, processes, statistics and the report come from `streambench`."""
