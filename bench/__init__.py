"""ternbench.bench."""
