"""Experiments on top of the library: rank sweeps, reports, plots, low-rank analysis, memory estimates."""
