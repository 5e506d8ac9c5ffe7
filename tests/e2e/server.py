"""The real-server launcher, shared with the benchmarks (bench/launch.py)."""

from bench.launch import Server, free_port

__all__ = ["Server", "free_port"]
