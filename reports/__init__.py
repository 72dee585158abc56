"""ternbench.reports."""
