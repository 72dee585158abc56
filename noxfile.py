"""nox sessions: ``tests`` (default), ``lint``, ``bench``, ``report``, ``kernels``, ``asv``.

    nox -s tests                                 # the test suite (what CI runs)
    nox -s bench -- --methods fgq,twn,int8       # the main job; arguments go to `ternbench run`
    nox -s report -- runs/latest                 # rebuild a report
    nox -s kernels -- --threads 1 --out DIR      # kernel benchmark (`ternbench kernels --help`)
    nox -s asv                                   # asv suite for HEAD~1 and HEAD (docs/asv.md)

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
#: the library's packages (mypy's targets; their docstring examples run with the tests)
LIBRARY = ("methods", "bench", "schedules", "reports", "core")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _install(session: nox.Session, extras: str = "test") -> None:
    # `-e .` so the editable finder follows this checkout; pip skips what is already installed
    session.install("-e", f".[{extras}]")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite (default tier; pass `-- -m slow` or `-- -m ''` for more), then, when no
    arguments select tests, the docstring examples of the library (seconds)."""
    _install(session, "test")
    session.run("pytest", *session.posargs)
    if not session.posargs:
        session.run("pytest", "--doctest-modules", "-p", "no:cacheprovider", *LIBRARY)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (lint) and mypy on the library."""
    _install(session, "test,lint")
    session.run("ruff", "check", ".")
    session.run("mypy", *LIBRARY)


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


@nox.session(python=PYTHON)
def kernels(session: nox.Session) -> None:
    """Kernel benchmark: `nox -s kernels -- --threads 1 --out DIR [--shapes gemv --quick]`."""
    _install(session, "test")
    # both thread pools must stop spin-waiting, and these are read when the libraries load
    env = {"TVM_THREAD_POOL_SPIN_COUNT": "0", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {k: os.environ.get(k, v) for k, v in env.items()}
    session.run("python", "-m", "ternbench.bench", "kernels", *session.posargs, env=env)


# ----------------------------------------------------------------------------------------- asv
ASV_CONF = "bench/asv/asv.conf.json"


def _git(session: nox.Session, *args: str) -> str:
    out = session.run("git", *args, external=True, silent=True)
    return str(out).strip()


def _asv_commits(session: nox.Session, specs: list[str]) -> list[str]:
    """Full SHAs, oldest first, for `A..B` ranges and single revisions (HEAD~1 HEAD default)."""
    shas: list[str] = []
    for spec in specs or ["HEAD~1", "HEAD"]:
        if ".." in spec:
            found = _git(session, "rev-list", "--reverse", "--first-parent", spec).split()
        else:
            found = [_git(session, "rev-parse", "--verify", f"{spec}^{{commit}}")]
        shas += [s for s in found if s not in shas]
    if not shas:
        session.error(f"no commits in {specs}")
    return shas


@nox.session(python=PYTHON)
def asv(session: nox.Session) -> None:
    """asv history: `nox -s asv [-- A..B | SHA...]` (default HEAD~1 HEAD), then HTML + compare.

    Every commit is installed in turn (`pip install --no-deps`, from `git archive`, so the
    checkout and git state are untouched) into this one session venv and run with
    `asv run -E existing:<python> --set-commit-hash`: no 6 GB asv env per commit. The
    benchmarks always come from this working tree (bench/asv/benchmarks). Results and HTML go
    to .asv/; the machine name is $ASV_MACHINE (default: the host name). The session fails
    when a benchmark fails on the newest commit (after publishing); failures on older commits
    are only reported.
    """
    import socket
    import tarfile
    from pathlib import Path

    from nox.command import CommandFailed

    _install(session, "asv")
    machine = os.environ.get("ASV_MACHINE") or socket.gethostname()
    conf = ("--config", ASV_CONF)
    commits = _asv_commits(session, list(session.posargs))
    python = str(Path(session.bin) / "python")
    session.run("asv", "machine", "--yes", "--machine", machine, *conf)
    tmp = Path(session.create_tmp())
    failed: list[str] = []
    try:
        for sha in commits:
            src = tmp / f"src-{sha[:12]}"
            if not src.is_dir():
                archive = tmp / f"{sha[:12]}.tar"
                session.run(
                    "git", "archive", "--format=tar", "-o", str(archive), sha, external=True
                )
                with tarfile.open(archive) as tar:
                    tar.extractall(src, filter="data")
                archive.unlink()
            session.install("--no-deps", "--force-reinstall", str(src))
            try:  # asv exits 2 when a benchmark failed; its other results are saved
                session.run(
                    "asv",
                    "run",
                    *conf,
                    "-E",
                    f"existing:{python}",
                    "--set-commit-hash",
                    sha,
                    "--machine",
                    machine,
                    "--show-stderr",
                )
            except CommandFailed:
                failed.append(sha)
    finally:
        # leave the venv on this checkout again (editable), as the other sessions expect
        session.install("--no-deps", "-e", ".")
    session.run("asv", "publish", *conf)
    if len(commits) > 1:
        session.run(
            "asv", "compare", *conf, "--machine", machine, "--split", commits[0], commits[-1]
        )
    session.log("HTML in .asv/html: view with `python -m http.server -d .asv/html`")
    if failed:
        msg = f"asv run reported failed benchmarks for {', '.join(s[:8] for s in failed)}"
        if commits[-1] in failed:
            session.error(msg)
        session.warn(msg + " (older commits: not fatal)")
