"""``ternbench`` command line: ``run``, ``list``, ``report``, ``kernels``.

Example:
    $ ternbench run --methods fgq,twn,int8 --profile smoke --out runs/smoke
    $ ternbench list methods 'fg*'
    $ ternbench report runs/smoke runs/other --out runs/compare
    $ ternbench kernels --threads 1 --out runs/kernels
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


KERNELS_EPILOG = textwrap.dedent("""\
    what is measured, per layer shape x batch, interleaved round by round in one process:
      tvm_t2_vnni     ternary weights (2-bit), int8 activations: vpdpbusd (AVX512-VNNI /
                      AVX-VNNI); tvm_t2_avx2 the AVX2 vpmaddubsw kernel (timed beside it)
      tvm_t2_lut      the same as table lookups (AVX-512BW vpermw; convs)
      tvm_t2_amx      the same on AMX tdpbssd tiles, the 2-bit weights decoded to int8
                      tiles per call (AMX-INT8 CPUs; convs with 64k input channels)
      tvm_t2_*_g<N>   with FGQ group scales every N weights (--group-sizes)
      tvm_bf16_amx_g<N>  the same on AMX tdpbf16ps tiles, the codes times their scales
                      as exact bf16 pieces (AMX-BF16 CPUs; convs, 1x1 ones from 64
                      input channels); *_alt: the integer group kernel timed beside it
      tvm_tt_popc     ternary weights and ternary activations (bit-planes + popcount)
      tvm_tt_lut      the same as byte-table lookups (AVX512-VBMI vpermi2b; convs)
      tvm_tt_amx      the same on AMX tdpbssd tiles, the activation codes as int8
                      (AMX-INT8 CPUs; convs with 64k input channels)
      tvm_int8        int8 weights, int8 activations (blocked TVM GEMM, same loop nest)
      tvm_fp32        fp32 weights and activations (blocked TVM GEMM)
      torch_fp32      F.conv2d / F.linear (MKL / oneDNN)
      torch_int8      quantized Conv2d (quint8 input; oneDNN AMX where the CPU has it,
                      else fbgemm) / dynamic quantized Linear (fbgemm)
      tvm_*_generic   the portable schedules (--generic)
      tvm_metaschedule  MetaSchedule's best schedule after TRIALS trials (--metaschedule)
    Every TVM kernel is checked against a float64 reference before it is timed; a kernel that
    disagrees is reported as failed (exit status 1), never timed. The 1-thread DRAM read
    bandwidth is measured in the same run; roofline_fraction = minimum bytes (input + packed
    weights + output) / time / bandwidth (> 1: served from the caches).

    shapes: resnet18 (ImageNet 224: 7x7 stem, 3x3 at 56/28/14/7, 1x1 downsamples, fc
    512->1000), cifar (ResNet-20: 16/32/64 channels at 32/16/8, fc 64->10), gemv (linear
    4608->512: batch 1 is the GEMV, batch 64 the GEMM).

    outputs: OUT/kernels.csv (one row per shape x batch x impl: median_us, speed-ups over
    torch fp32 / int8 from the same run, GMAC/s, bytes, roofline_fraction, max_abs_err, and
    provenance: TVM / torch versions, CPU, git) and OUT/kernels.md (summary: the project's
    latency targets, README "Where the kernels stand", checked on the run's own ratios, then
    the tables).

    tuning: --tune searches each TVM kernel's tile grid first (checked, timed; results cached
    in $TERNBENCH_CACHE/tuning, default ~/.cache/ternbench/tuning, and reused by every later
    latency measurement). --metaschedule TRIALS tunes with TVM MetaSchedule (slow: minutes per
    shape; needs cloudpickle; cached too).

    environment: TVM's and torch's thread pools spin-wait and fight when calls alternate. This
    command sets TVM_THREAD_POOL_SPIN_COUNT=0 itself; with --threads > 1 also export
    OMP_WAIT_POLICY=PASSIVE before starting (torch reads it when it loads):
      OMP_WAIT_POLICY=PASSIVE ternbench kernels --threads 2 --out runs/k2
    Benchmark on a quiet machine: other load shows up as noise in the medians.

    examples:
      ternbench kernels --threads 1 --out runs/kernels
      ternbench kernels --shapes gemv,cifar --batches 1 --quick --out /tmp/k
      ternbench kernels --shapes resnet18 --layers 'resnet18.layer3.*' --batches 1,8
      ternbench kernels --shapes resnet18 --tune --tune-points 12 --out runs/k-tuned
      ternbench kernels --shapes gemv --metaschedule 64 --out runs/k-ms
      ternbench kernels --whole-model resnet18 --model-methods rtn,sttn --model-only --out runs/m
      ternbench kernels --whole-model resnet18 --model-methods twn --set twn.act_bits=8 \\
          --model-only --out runs/m-twn8        # TWN's ternary weights, 8-bit activations
      nox -s kernels -- --threads 1 --out runs/kernels
    """)


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in _csv(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {exc}") from exc
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def _choice_list(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        vals = _csv(text)
        bad = [v for v in vals if v not in choices]
        if not vals or bad:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return vals

    return parse


def _add_kernels_parser(sub: Any) -> None:
    k = sub.add_parser(
        "kernels",
        help="benchmark the TVM kernels per layer shape against torch fp32/int8",
        description="Per-layer-shape kernel benchmark: ternary TVM kernels vs torch FP32 / "
        "INT8 (fbgemm) and TVM dense GEMMs, with memory roofline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=KERNELS_EPILOG,
    )
    k.add_argument("--threads", type=_positive_int, default=1,
                   help="threads for TVM and torch (default: 1)")
    k.add_argument("--out", default="runs/kernels",
                   help="output folder for kernels.csv and kernels.md (default: runs/kernels)")
    k.add_argument("--shapes", type=_choice_list(("resnet18", "cifar", "gemv", "bitnet", "all")),
                   default=["all"], metavar="SUITES",
                   help="comma list of resnet18, cifar, gemv, bitnet (BitNet b1.58 2B "
                   "linears), all (default: all)")
    k.add_argument("--layers", type=_csv, default=None, metavar="PATTERNS",
                   help="only layers whose name matches a comma list of shell-style patterns, "
                   "e.g. 'resnet18.layer3.*,*fc' (names: see kernels.md or the layer column)")
    k.add_argument("--batches", type=_int_list, default=[1, 64], metavar="B1,B2",
                   help="batch sizes (default: 1,64)")
    k.add_argument("--act-modes", type=_choice_list(("int8", "ternary")),
                   default=["int8", "ternary"], metavar="MODES",
                   help="activation modes of the ternary kernels: int8 (t2_*), ternary "
                   "(tt_*) (default: both)")
    k.add_argument("--group-sizes", type=_int_list, default=[], metavar="N1,N2",
                   help="also time the int8-activation ternary kernel with FGQ group scales "
                   "of these sizes (rows tvm_t2_*_g<N>), e.g. 4,16,64")
    k.add_argument("--group-axis", type=_choice_list(("cin_contiguous", "flat_fanin")),
                   default=["cin_contiguous"], metavar="AXES",
                   help="with --group-sizes: the fan-in order FGQ's groups run along, "
                   "cin_contiguous (FGQ's default: N input channels of one tap) and/or "
                   "flat_fanin (rows tvm_t2_*_g<N>_flat) (default: cin_contiguous)")
    k.add_argument("--tune", action="store_true",
                   help="search each TVM kernel's tile grid first (cached across runs)")
    k.add_argument("--tune-points", type=_positive_int, default=None, metavar="N",
                   help="with --tune: at most the first N grid points per kernel and shape")
    k.add_argument("--tune-budget", type=float, default=None, metavar="SECONDS",
                   help="with --tune: stop searching a kernel's grid after this many seconds")
    k.add_argument("--metaschedule", type=int, default=0, metavar="TRIALS",
                   help="add a MetaSchedule baseline tuned with TRIALS trials (0: off; slow)")
    k.add_argument("--generic", action="store_true",
                   help="also time the portable (generic) ternary schedules")
    k.add_argument("--quick", action="store_true",
                   help="3 short rounds and a small bandwidth buffer (smoke tests, CI)")
    k.add_argument("--rounds", type=_positive_int, default=None,
                   help="interleaved timing rounds (default: 15; 3 with --quick)")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")
    k.add_argument("--whole-model", default=None, metavar="MODEL",
                   help="also time a whole ternary model end to end on x86 (resnet18 = 224 px "
                   "ImageNet shapes, resnet18-cifar, resnet20), per --model-methods, as ONE "
                   "TVM module (OUT/artifacts/MODEL-METHOD/) beside torch FP32 eager, torch "
                   "INT8 and ONNX Runtime INT8: OUT/model.csv, OUT/model_layers.csv")
    k.add_argument("--model-methods", type=_csv, default=None, metavar="METHODS",
                   help="methods for --whole-model (default: the registered whole-model "
                   "methods: rtn,sttn,fgq,twn)")
    k.add_argument("--model-only", action="store_true",
                   help="with --whole-model: skip the per-shape kernel benchmark")
    k.add_argument("--set", dest="sets", action="append", default=[],
                   metavar="METHOD.FIELD=VALUE",
                   help="with --whole-model: override a method's config field, as for `run` "
                   "(e.g. --set twn.act_bits=8: ternary weights with 8-bit activations); the "
                   "row and the artifact are labelled METHOD+FIELD=VALUE (repeatable)")
    k.add_argument("--target", choices=("x86", "cuda"), default="x86",
                   help="x86 (this CPU, default) or cuda (the visible GPU: TVM CUDA kernels vs "
                   "torch cuDNN/cuBLAS FP32 and FP16; --threads, --tune and --metaschedule "
                   "do not apply)")


def _cmd_kernels(a: argparse.Namespace) -> int:
    from . import kernels  # main() set the thread pools and capped torch to --isa
    if a.metaschedule < 0:
        print("ternbench: error: --metaschedule TRIALS must be >= 0", file=sys.stderr)
        return 2
    try:
        shapes = kernels.select_shapes(a.shapes, a.layers)
    except ValueError as exc:
        print(f"ternbench: error: {exc}", file=sys.stderr)
        return 2
    from tqdm.contrib.logging import logging_redirect_tqdm

    if a.target == "cuda":
        from .kernels_cuda import gpu_unavailable_reason, run_kernels_cuda

        why = gpu_unavailable_reason()
        if why:
            print(f"ternbench: error: --target cuda: {why}", file=sys.stderr)
            return 2
        csv = run_kernels_cuda(a.out, shapes=shapes, batches=a.batches,
                               act_modes=a.act_modes, rounds=a.rounds or 15)
        print((csv.parent / "kernels.md").read_text())
        print(f"results: {csv}")
        return 0
    if a.sets and not a.whole_model:
        print("ternbench: error: --set applies to --whole-model's methods", file=sys.stderr)
        return 2
    if a.whole_model:
        from .model_bench import (
            WHOLE_MODELS,
            model_markdown,
            whole_model_latency,
            write_model_results,
        )

        if a.whole_model not in WHOLE_MODELS:
            print(f"ternbench: error: --whole-model {a.whole_model!r}: choose from "
                  f"{', '.join(WHOLE_MODELS)}", file=sys.stderr)
            return 2
        from ternbench.methods import whole_model_methods

        model_methods = a.model_methods or whole_model_methods()
        overrides = _method_overrides(a.sets, model_methods)
        results = [whole_model_latency(a.whole_model, m, threads=a.threads,
                                       repeat=a.rounds or (3 if a.quick else 15),
                                       min_repeat_ms=5.0 if a.quick else 200.0, out=a.out,
                                       method_overrides=overrides.get(m))
                   for m in model_methods]
        mcsv, _ = write_model_results(results, a.out)
        (Path(a.out) / "model.md").write_text(model_markdown(results))
        print(model_markdown(results))
        print(f"results: {mcsv}")
        if a.model_only:
            return 0
    with logging_redirect_tqdm():
        res = kernels.run_kernels(
            a.out, threads=a.threads, shapes=shapes, batches=a.batches,
            act_modes=a.act_modes, tune=a.tune, tune_points=a.tune_points,
            tune_budget_s=a.tune_budget, metaschedule_trials=a.metaschedule,
            generic=a.generic, quick=a.quick, rounds=a.rounds,
            progress=False if a.no_progress else None, group_sizes=a.group_sizes,
            group_axes=a.group_axis)
    print(res.md_path.read_text())
    print(f"results: {res.csv_path}  summary: {res.md_path}")
    if res.failures:
        print(f"{len(res.failures)} kernel(s) failed; see the note column of {res.csv_path}",
              file=sys.stderr)
        return 1
    return 0


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
    p.add_argument("--isa", choices=("native", "amx", "avx512", "avx2", "generic"),
                   default=None,
                   help="x86 kernels for this ISA level instead of the CPU's own (e.g. "
                   "--isa avx2 on an AVX-512 machine measures the AVX2 rule set, and caps "
                   "torch's baselines to AVX2 too; --isa avx512 on an AMX CPU measures what "
                   "an AVX-512 CPU without AMX runs, torch's int8 convs kept off AMX too; "
                   "recorded in every latency row; env TERNBENCH_ISA)")
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
                   help="latency targets, comma separated (default: x86; '' for accuracy "
                   "only): x86 = this CPU, timed per layer and end to end; arm, arm-neon, "
                   "arm-sve = aarch64 cross builds, run bit-exact under qemu-user ('built and "
                   "verified') or timed on a board with --rpc; cuda = timed on a GPU, else "
                   "'built'")
    r.add_argument("--rpc", default=None, metavar="HOST:PORT",
                   help="TVM RPC server of an ARM board (or tracker=HOST:PORT,key=KEY): ARM "
                   "targets are timed there; see docs/arm.md to start the server")
    r.add_argument("--no-whole-model", dest="whole_model", action="store_false", default=None,
                   help="skip the end-to-end model latency on x86 (per-layer kernels only)")
    r.add_argument("--plain-blocks", action="store_true", default=None,
                   help="build every method on the model as named instead of the block form "
                   "its paper uses (per method: --set rtn.block=plain)")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="local executor: where training-time cells run (auto: cuda when a GPU "
                   "is visible)")
    r.add_argument("--budget", type=int, default=None, metavar="STEPS",
                   help="QAT steps (batch 128) replacing the profile's; each method runs them "
                   "times its registered budget_scale (TTQ, TTN-RE: 4)")
    r.add_argument("--allow-degraded", action="store_true", default=None,
                   help="exit 0 even when a cell collapsed (status degraded)")
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
    r.add_argument("--subset", type=_positive_int, default=None, metavar="N",
                   help="evaluate on a deterministic, class-stratified subset of N test images "
                   "(replaces the profile's count)")
    r.add_argument("--num-classes", type=_positive_int, default=None, metavar="K",
                   help="the class count you expect; checked against the data (ImageFolder: "
                   "its class folders) before anything runs")
    r.add_argument("--image-size", type=_positive_int, default=None, metavar="PX",
                   help="ImageFolder (imagenet) only: centre-crop side (default 224); smaller "
                   "is faster and needs weights trained at that size")
    r.add_argument("--wait-lock", action="store_true",
                   help="if another run is using --out, wait for it instead of exiting")
    r.add_argument("--no-report", action="store_true", help="skip report.md/report.html")
    r.add_argument("--no-progress", action="store_true",
                   help="no progress bars, and no periodic progress log lines (which replace "
                   "the bars when stderr is not a terminal)")

    ls = sub.add_parser("list", help="list methods, models, datasets, targets or profiles")
    ls.add_argument(
        "what", choices=["methods", "models", "datasets", "targets", "profiles", "ablations"]
    )
    ls.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'fg*'")

    rep = sub.add_parser("report", help="(re)build the report of one run, or compare several")
    rep.add_argument("dirs", nargs="+", help="run directories")
    rep.add_argument("--out", default=None, help="output folder (default: the single run's dir)")
    _add_kernels_parser(sub)
    return p


def _method_overrides(sets: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--set METHOD.FIELD=VALUE`` of ``kernels --whole-model``: method -> field -> value,
    each method one of ``methods`` (a ConfigError names the one that is not)."""
    from ternbench.methods import ConfigError

    from .config import parse_override

    overrides: dict[str, dict[str, Any]] = {}
    for s in sets:
        meth, fld, val = parse_override(s)
        if meth not in methods:
            raise ConfigError(f"--set {s}: {meth!r} is not one of the whole-model methods "
                              f"being run ({', '.join(methods)}); add it to --model-methods")
        overrides.setdefault(meth, {})[fld] = val
    return overrides


def _config_from_args(a: argparse.Namespace) -> Any:
    from ternbench.methods import ConfigError, ablations, reference_method

    from .config import BenchConfig, merge_sweeps, parse_override, parse_sweep

    overrides: dict[str, dict[str, Any]] = {}
    for s in a.sets:
        meth, fld, val = parse_override(s)
        overrides.setdefault(meth, {})[fld] = val
    specs = []
    known = ablations() if a.ablations else {}
    for name in a.ablations:
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown ablation {name!r}.{hint} Available: {', '.join(known)}")
        specs.append(known[name])
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
        "rpc": a.rpc,
        "whole_model": a.whole_model,
        "subset": a.subset,
        "num_classes": a.num_classes,
        "image_size": a.image_size,
        "plain_blocks": a.plain_blocks,
        "device": a.device,
        "budget": a.budget,
        "allow_degraded": a.allow_degraded,
    }
    if overrides:
        cli["overrides"] = overrides
    if sweeps:
        cli["sweeps"] = sweeps
    if a.config:
        cfg = BenchConfig.from_toml(a.config, **cli)
    else:
        cfg = BenchConfig(**{k: v for k, v in cli.items() if v is not None})
    ref = reference_method()
    if ref is not None and ref not in cfg.methods:  # deltas and speed-ups are taken against it
        import dataclasses

        cfg = dataclasses.replace(cfg, methods=(ref, *cfg.methods))
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
            cfg, argv=argv, progress=False if a.no_progress else None, report=not a.no_report,
            wait_lock=a.wait_lock,
        )
    _print_summary(summary.frame, cfg.out, report=not a.no_report)
    if summary.degraded:
        red, end = ("\033[31m", "\033[0m") if sys.stdout.isatty() else ("", "")
        for why in summary.degraded:
            print(f"{red}DEGRADED {why}{end}")
        if not cfg.allow_degraded:
            print(f"{len(summary.degraded)} cell(s) degraded (collapsed accuracy); pass "
                  "--allow-degraded to exit 0 anyway", file=sys.stderr)
            return 1
    if summary.failed:
        print(
            f"{summary.failed} part(s) failed; see {cfg.out}/results.csv (status=failed)",
            file=sys.stderr,
        )
        return 1
    return 0


def _print_summary(df: Any, out: Path, report: bool = True) -> None:
    """One line per method variant: top-1, bits, sparsity and model latency per target."""
    if df is None or not len(df):
        print(f"no results in {out}")
        return
    ok = df[df.status.isin(["ok", "degraded"])].copy()
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
    model = ok[(ok.layer == "__model__") & (ok.metric == "latency_us")]
    if len(model):  # the whole deployed model end to end
        mt = model.pivot_table(index=index, columns=["target", "impl"], values="value",
                               aggfunc="mean")
        mt.columns = [f"{t}:model {i} us" for t, i in mt.columns]
        table = table.join(mt)
    dep = ok[(ok.layer == "__model__") & (ok.metric == "top1_deployed")]
    if len(dep):  # the artifact's own accuracy, beside the fake-quant top1
        table = table.join(dep.pivot_table(index=index, values="value", aggfunc="mean")
                           .rename(columns={"value": "top1_deployed"}))
    status = ok[(ok.layer == "__total__") & (ok.metric == "kernel_status")]
    if len(status):  # targets built / verified but not timed here
        st = status.assign(s=status.unit.str.split(" (", regex=False).str[0]).pivot_table(
            index=index, columns="target", values="s", aggfunc="first")
        st.columns = [f"{t}" for t in st.columns]
        table = table.join(st)
    bad = ok[ok.status.eq("degraded") & ok.metric.eq("top1")]
    if len(bad):  # collapsed cells, flagged beside their numbers
        flag = bad.pivot_table(index=index, values="error", aggfunc="first")
        table = table.join(flag.rename(columns={"error": "degraded"}))
        table["degraded"] = table["degraded"].where(table["degraded"].notna(), "")
    table.index.names = [n.removeprefix("sweep.") for n in table.index.names]
    print(table.round(3).to_string())
    where = f"\nresults: {out}/results.parquet"
    if report and (Path(out) / "report.html").is_file():
        where += f"  report: {out}/report.html"
    print(where)


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
        from ternbench.methods import ablations

        for k, spec in ablations().items():
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
    from ternbench.reports.tables import results_file

    for d in a.dirs:
        print(f"results read from: {results_file(Path(d))}")
    from ternbench.methods import list_methods

    paths = build_report([Path(d) for d in a.dirs], out, registry=list_methods())
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
    from .data import DatasetFormatError
    from .executor import RayStartError
    from .runner import RunLockedError

    errs += [CheckpointError, ResultsError, DatasetFormatError, RayStartError, RunLockedError]
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
    if a.command == "kernels":  # the thread pools, before --isa's feature query imports tvm
        from . import kernels

        for note in kernels.configure_env(a.threads):
            log.warning(note)
    try:
        if a.isa is not None:
            from ternbench import schedules

            try:
                schedules.force_isa(a.isa)
            except ValueError as exc:
                print(f"ternbench: error: --isa: {exc}", file=sys.stderr)
                return 2
        from ternbench.schedules import forced_isa

        from .kernels.env import cap_torch_isa

        # torch's baselines at the forced level too (in this process and in the Ray workers
        # it starts, which inherit the variables)
        with cap_torch_isa(forced_isa()) as notes:
            for note in notes:
                log.warning(note)
            if a.command == "run":
                return _cmd_run(a, ["ternbench", *argv])
            if a.command == "list":
                return _cmd_list(a)
            if a.command == "kernels":
                return _cmd_kernels(a)
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
