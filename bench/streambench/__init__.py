"""Harness behind `bench/streams_bench.py`: servers, load, workloads and the report."""
