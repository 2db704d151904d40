"""Side-by-side benchmark of green workers (see docs/benchmarks.rst)."""
