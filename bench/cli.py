"""``ternbench`` command line: ``run``, ``list``, ``report``.

Example:
    $ ternbench run --methods fgq,twn,int8 --profile smoke --out runs/smoke
    $ ternbench list methods 'fg*'
    $ ternbench report runs/smoke runs/other --out runs/compare
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

log = logging.getLogger("ternbench")

EPILOG = textwrap.dedent("""\
    examples:
      ternbench run --methods fgq,twn,int8 --profile smoke --out runs/smoke
      ternbench run --methods 'fg*' --set fgq.group_size=8 --executor local
      ternbench run --dataset cifar10 --data-root ~/data --model resnet20 --ray-address HOST:6379
      ternbench run --config bench.toml --dry-run
      ternbench list methods
      ternbench report runs/smoke

    A re-run with the same --out resumes: finished cells are kept, not recomputed.
    Results: OUT/results.parquet + results.csv (tidy: one row per cell x metric), OUT/run.json,
    OUT/report.md + report.html.
    """)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    from .config import PROFILES

    p = argparse.ArgumentParser(
        prog="ternbench",
        description="Benchmark ternary neural-network methods on accuracy (Ray) and "
        "latency (TVM), and report them side by side.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser(
        "run",
        help="run a grid of methods x models x datasets x seeds",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    r.add_argument(
        "--methods",
        type=_csv,
        default=None,
        help="comma list of methods or wildcards (default: fp32,int8,twn,fgq); "
        "fp32 is added when missing, as every delta is taken against it",
    )
    r.add_argument(
        "--model",
        "--models",
        dest="models",
        type=_csv,
        default=None,
        help="comma list of models (default: resnet8)",
    )
    r.add_argument(
        "--dataset",
        "--datasets",
        dest="datasets",
        type=_csv,
        default=None,
        help="comma list of datasets (default: fashion-mnist, the embedded one)",
    )
    r.add_argument(
        "--data-root",
        default=None,
        help="folder holding the dataset (CIFAR: the folder with cifar-10-batches-py; "
        "ImageNet: the val ImageFolder)",
    )
    r.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default=None,
        help="; ".join(f"{k}: {v.description}" for k, v in PROFILES.items()),
    )
    r.add_argument(
        "--seed",
        "--seeds",
        dest="seeds",
        type=lambda s: [int(x) for x in _csv(s)],
        default=None,
        help="comma list of seeds (default: 0)",
    )
    r.add_argument("--targets", type=_csv, default=None,
                   help="latency targets (default: x86; '' for accuracy only)")
    r.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="METHOD.FIELD=VALUE",
        help="override a method's config field, e.g. --set fgq.group_size=8 (repeatable)",
    )
    r.add_argument(
        "--sweep",
        dest="sweeps",
        action="append",
        default=[],
        metavar="METHOD.FIELD=V1,V2",
        help="sweep a config field, e.g. --sweep fgq.group_size=4,16,64 (repeatable; several "
        "fields of one method run their cartesian product)",
    )
    r.add_argument(
        "--ablation",
        dest="ablations",
        action="append",
        default=[],
        metavar="NAME",
        help="add a built-in ablation sweep (see `ternbench list ablations`), e.g. fgq-group-size",
    )
    r.add_argument("--out", default=None, help="run directory (default: runs/latest)")
    r.add_argument(
        "--executor",
        choices=["ray", "local"],
        default=None,
        help="ray (default): embedded local Ray or --ray-address; local: in process",
    )
    r.add_argument(
        "--ray-address",
        default=None,
        help="join an existing Ray cluster (host:port); RAY_ADDRESS is honoured too",
    )
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray")
    r.add_argument(
        "--threads", type=int, default=None, help="threads for latency measurements (default: 1)"
    )
    r.add_argument("--weights", default=None, metavar="PATH",
                   help="your FP32 weights (.pt/.pth state dict or .safetensors) instead of the "
                   "cached baseline; read with torch.load(weights_only=True), never unpickled")
    r.add_argument("--config", default=None, help="TOML file with [run] and [methods.<name>]")
    r.add_argument("--dry-run", action="store_true", help="print the planned grid and exit")
    r.add_argument("--no-report", action="store_true", help="skip report.md/report.html")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")

    ls = sub.add_parser("list", help="list methods, models, datasets, targets or profiles")
    ls.add_argument(
        "what", choices=["methods", "models", "datasets", "targets", "profiles", "ablations"]
    )
    ls.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'fg*'")

    rep = sub.add_parser("report", help="(re)build the report of one run, or compare several")
    rep.add_argument("dirs", nargs="+", help="run directories")
    rep.add_argument("--out", default=None, help="output folder (default: the single run's dir)")
    return p


def _config_from_args(a: argparse.Namespace) -> Any:
    from ternbench.methods import ConfigError

    from .config import ABLATIONS, BenchConfig, merge_sweeps, parse_override, parse_sweep

    overrides: dict[str, dict[str, Any]] = {}
    for s in a.sets:
        meth, fld, val = parse_override(s)
        overrides.setdefault(meth, {})[fld] = val
    specs = []
    for name in a.ablations:
        if name not in ABLATIONS:
            import difflib

            close = difflib.get_close_matches(name, list(ABLATIONS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown ablation {name!r}.{hint} Available: {', '.join(ABLATIONS)}")
        specs.append(ABLATIONS[name])
    for s in a.sweeps:
        meth, fld, vals = parse_sweep(s)
        specs.append({meth: {fld: vals}})
    sweeps = merge_sweeps(*specs)
    if a.methods is not None:  # methods named only by a sweep or ablation join the run
        a.methods = list(a.methods) + [m for m in sweeps if m not in a.methods]
    cli = {
        "methods": tuple(a.methods) if a.methods is not None else None,
        "models": tuple(a.models) if a.models else None,
        "datasets": tuple(a.datasets) if a.datasets else None,
        "seeds": tuple(a.seeds) if a.seeds else None,
        "targets": tuple(a.targets) if a.targets is not None else None,
        "profile": a.profile,
        "out": a.out,
        "executor": a.executor,
        "ray_address": a.ray_address,
        "data_root": a.data_root,
        "num_cpus": a.num_cpus,
        "latency_threads": a.threads,
        "weights": a.weights,
    }
    if overrides:
        cli["overrides"] = overrides
    if sweeps:
        cli["sweeps"] = sweeps
    if a.config:
        cfg = BenchConfig.from_toml(a.config, **cli)
    else:
        cfg = BenchConfig(**{k: v for k, v in cli.items() if v is not None})
    if "fp32" not in cfg.methods:  # deltas and speed-ups are taken against fp32
        import dataclasses

        cfg = dataclasses.replace(cfg, methods=("fp32", *cfg.methods))
    return cfg


def _cmd_run(a: argparse.Namespace, argv: list[str]) -> int:
    from .runner import plan, run

    cfg = _config_from_args(a)
    if a.dry_run:
        cells = plan(cfg)
        print(
            f"{len(cells)} cells, profile {cfg.profile}, targets {','.join(cfg.targets)}, "
            f"out {cfg.out}"
        )
        for c in cells:
            print(
                f"  {c.key}  {c.method:6s} {c.model:9s} {c.dataset:14s} seed={c.seed} "
                f"{c.method_config}"
            )
        return 0
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        summary = run(
            cfg, argv=argv, progress=False if a.no_progress else None, report=not a.no_report
        )
    _print_summary(summary.frame, cfg.out)
    if summary.failed:
        print(
            f"{summary.failed} part(s) failed; see {cfg.out}/results.csv (status=failed)",
            file=sys.stderr,
        )
        return 1
    return 0


def _print_summary(df: Any, out: Path) -> None:
    """One line per method variant: top-1, bits, sparsity and model latency per target."""
    if df is None or not len(df):
        print(f"no results in {out}")
        return
    ok = df[df.status == "ok"].copy()
    sweep = [c for c in ok.columns if c.startswith("sweep.")]
    for c in sweep:  # pivot keys must not be NaN: a variant without that axis shows "-"
        ok[c] = ok[c].astype(object).where(ok[c].notna(), "-")
    index = ["method", *sweep, "model", "dataset"]
    acc = ok[(ok.target == "-") & ok.metric.isin(["top1", "effective_bits", "sparsity"])]
    lat = ok[(ok.layer == "__total__") & (ok.metric == "latency_us")]
    table = acc.pivot_table(index=index, columns="metric", values="value", aggfunc="mean")
    if len(lat):
        lt = lat.pivot_table(index=index, columns=["target", "impl"], values="value",
                             aggfunc="mean")
        lt.columns = [f"{t}:{i} us" for t, i in lt.columns]
        table = table.join(lt)
    table.index.names = [n.removeprefix("sweep.") for n in table.index.names]
    print(table.round(3).to_string())
    print(f"\nresults: {out}/results.parquet  report: {out}/report.html")


def _cmd_list(a: argparse.Namespace) -> int:
    import fnmatch

    if a.what == "methods":
        from ternbench.methods import get_method_info, list_methods

        for n in list_methods(a.pattern):
            i = get_method_info(n)
            print(f"{n:8s} {i.kind:8s} {i.paper}")
    elif a.what == "models":
        from .models import list_models

        print("\n".join(list_models(a.pattern)))
    elif a.what == "datasets":
        from .data import get_dataset_info, list_datasets

        for n in list_datasets(a.pattern):
            print(f"{n:14s} {get_dataset_info(n).description}")
    elif a.what == "targets":
        from ternbench.schedules import list_targets

        print("\n".join(t for t in list_targets() if fnmatch.fnmatch(t, a.pattern)))
    elif a.what == "ablations":
        from .config import ABLATIONS

        for k, spec in ABLATIONS.items():
            axes = "; ".join(f"{m}.{f}={','.join(map(str, v))}" for m, d in spec.items()
                             for f, v in d.items())
            print(f"{k:18s} {axes}")
    else:
        from .config import PROFILES

        for k, v in PROFILES.items():
            print(f"{k:8s} {v.description}")
    return 0


def _cmd_report(a: argparse.Namespace) -> int:
    from ternbench.reports import build_report

    out = Path(a.out) if a.out else (Path(a.dirs[0]) if len(a.dirs) == 1 else None)
    if out is None:
        print("ternbench report: comparing several runs needs --out DIR", file=sys.stderr)
        return 2
    paths = build_report([Path(d) for d in a.dirs], out)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from ternbench.methods import ConfigError, UnknownMethodError

    from .results import SchemaMismatchError

    errs: list[type[BaseException]] = [
        ConfigError,
        UnknownMethodError,
        SchemaMismatchError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
        FileExistsError,
        IsADirectoryError,
    ]
    from ternbench.reports import ResultsError

    from .cache import CheckpointError

    errs += [CheckpointError, ResultsError]
    return tuple(errs)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ternbench`` and ``python -m ternbench.bench``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(a.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if a.command is None:
        parser.print_help()
        return 2
    try:
        if a.command == "run":
            return _cmd_run(a, ["ternbench", *argv])
        if a.command == "list":
            return _cmd_list(a)
        return _cmd_report(a)
    except _user_errors() as exc:
        if a.debug:
            raise
        print(f"ternbench: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        import errno

        if a.debug or exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        print(f"ternbench: error: cannot write results ({exc.strerror}: {exc.filename or ''}); "
              "every part finished before this is kept: free space and re-run with the same "
              "--out to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "ternbench: interrupted; finished cells are kept, re-run with the same --out to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
