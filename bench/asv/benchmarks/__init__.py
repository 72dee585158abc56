"""asv benchmarks of ternbench (see docs/asv.md); run via ``nox -s asv`` or ``asv run``."""
