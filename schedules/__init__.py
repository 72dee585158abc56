"""ternbench.schedules."""
