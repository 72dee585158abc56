"""nox sessions: ``tests`` (default), ``lint``, ``bench``, ``report``.

    nox -s tests                                 # the test suite (what CI runs)
    nox -s bench -- --methods fgq,twn,int8       # the main job; arguments go to `ternbench run`
    nox -s report -- runs/latest                 # rebuild a report

Each session has its own virtualenv (~6 GB: torch, TVM, Ray; ~2 min to create from the local
wheels) and reuses it on later runs (``reuse_venv``); point ``--envdir`` outside a fresh clone to
keep them between clones, as ``.ci/run`` does.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "virtualenv"  # pip honours the machine's local wheel folders
nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests"]

PYTHON = "3.11"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _install(session: nox.Session, extras: str = "test") -> None:
    # `-e .` so the editable finder follows this checkout; pip skips what is already installed
    session.install("-e", f".[{extras}]")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite (default tier; pass `-- -m slow` or `-- -m ''` for more)."""
    _install(session, "test")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (lint) and mypy on the library."""
    _install(session, "test,lint")
    session.run("ruff", "check", ".")
    session.run("mypy", "methods", "bench", "schedules", "reports")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The main job: `nox -s bench -- --methods fgq,twn,int8 [--profile smoke] [--out DIR]`."""
    _install(session, "test")
    session.run("python", "-m", "ternbench.bench", "run", *session.posargs)


@nox.session(python=PYTHON)
def report(session: nox.Session) -> None:
    """Rebuild reports: `nox -s report -- RUN_DIR [RUN_DIR2 --out DIR]`."""
    _install(session, "test")
    session.run("python", "-m", "ternbench.bench", "report", *(session.posargs or ["runs/latest"]))
