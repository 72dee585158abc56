"""Paired A/B of one TVM kernel rule built under two settings: how the figures in
``docs/measured/ab-*.txt`` are measured, reproducible from the repository.

A setting is a module attribute the schedule code reads at build time, ``MODULE.NAME=VALUE``
(``VALUE`` a Python literal), e.g. ``ternbench.schedules.ops.compute.UNROLLED_IM2COL_MAX_K=0``
or ``ternbench.schedules.x86.AVX2_INT16_CHAIN=False``. Per layer shape, FGQ group size and
batch, the rule's kernel is built once with each variant's settings applied (the kernel cache
cleared before and after, the attributes restored), each build is checked against the layer's
reference (a mismatch raises, nothing is timed), and the two kernels and torch FP32 are timed
interleaved round by round in this process (the order rotating). Ratios are medians of per-round
ratios, so a drift of the machine between rounds cancels. A line whose variants compiled to the
same assembly says so (the setting does not reach that shape).

Run (``--b`` defaults to no setting: the code as it is)::

    python -m ternbench.bench.kernels.ab --rule x86.t2_avx512vnni --shapes cifar \
        --layers 'resnet20.conv1' --group-sizes 4,16 \
        --a ternbench.schedules.ops.compute.UNROLLED_IM2COL_MAX_K=0
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as _dt
import importlib
import logging
import statistics
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .env import _cpu_name, _git_describe, cap_torch_isa, configure_env
from .impls import _Impl, _torch_fp32_impl, _tvm_impl
from .layers import synthetic_layer
from .shapes import select_shapes

log = logging.getLogger(__name__)

#: paired rounds by default (the stored A/Bs use 15-21)
AB_ROUNDS = 15
#: seconds one sample lasts at least (calls per sample are calibrated to it)
AB_SAMPLE_S = 0.02
#: weight formats of the A/B layers (``--weights``): ternary, or the dense int8 / fp32 layers
WEIGHT_FORMATS = ("ternary", "int8", "fp32")


@dataclass(frozen=True)
class Setting:
    """``module.name = value`` applied while a variant is built.

    Example:
        >>> s = Setting.parse("ternbench.schedules.ops.compute.UNROLLED_IM2COL_MAX_K=0")
        >>> s.module, s.name, s.value
        ('ternbench.schedules.ops.compute', 'UNROLLED_IM2COL_MAX_K', 0)
    """

    module: str
    name: str
    value: Any

    @classmethod
    def parse(cls, text: str) -> Setting:
        """Parse ``MODULE.NAME=VALUE``; raises ValueError naming what is wrong."""
        target, sep, raw = text.partition("=")
        module, dot, name = target.strip().rpartition(".")
        if not sep or not dot or not name:
            raise ValueError(f"setting {text!r}: expected MODULE.NAME=VALUE, e.g. "
                             "ternbench.schedules.x86.AVX2_INT16_CHAIN=False")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"setting {text!r}: VALUE must be a Python literal "
                             f"(a number, True/False, a quoted string): {exc}") from None
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"setting {text!r}: cannot import module {module!r}: {exc}") from None
        if not hasattr(mod, name):
            raise ValueError(f"setting {text!r}: module {module!r} has no attribute {name!r}")
        return cls(module, name, value)

    def __str__(self) -> str:
        return f"{self.module}.{self.name}={self.value!r}"


@contextlib.contextmanager
def applied(settings: Sequence[Setting]) -> Iterator[None]:
    """Within the block the settings hold and the kernel cache starts empty; after it, the
    attributes are restored and the cache is emptied again (builds are cached by spec, which
    does not hold the settings)."""
    from ternbench.schedules import ops

    saved = []
    ops.clear_kernel_cache()
    try:
        for s in settings:
            mod = importlib.import_module(s.module)
            saved.append((mod, s.name, getattr(mod, s.name)))
            setattr(mod, s.name, s.value)
        yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)
        ops.clear_kernel_cache()


@dataclass(frozen=True)
class AbRow:
    """One (shape, group size, batch): medians (µs) and paired ratios."""

    shape: str
    group_size: int
    batch: int
    a_us: float
    b_us: float
    torch_fp32_us: float
    b_over_a: float  #: median of per-round B / A times
    a_x_fp32: float  #: median of per-round torch FP32 / A times
    b_x_fp32: float
    #: A and B compiled to the same assembly: the settings change nothing on this shape
    same_code: bool = False

    def line(self) -> str:
        return (f"{self.shape:30s} N={self.group_size or '-':<3} b{self.batch:<3d} "
                f"A {self.a_us:10.1f}  B {self.b_us:10.1f}  torch_fp32 {self.torch_fp32_us:10.1f}"
                f" us | B/A {self.b_over_a:.3f} | x torch fp32: A {self.a_x_fp32:.2f} "
                f"B {self.b_x_fp32:.2f}" + (" | A and B built the same code" if self.same_code
                                            else ""))


def _paired(num: list[float], den: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(num, den, strict=True))


def run_ab(rule: str, a: Sequence[Setting], b: Sequence[Setting] = (), *,
           suites: str = "all", layers: Sequence[str] | None = None,
           batches: Sequence[int] = (1, 64), act: str = "int8",
           group_sizes: Sequence[int] = (0,), rounds: int = AB_ROUNDS,
           sample_s: float = AB_SAMPLE_S, threads: int = 1,
           shapes: Sequence[Any] | None = None, weights: str = "ternary") -> list[AbRow]:
    """Time ``rule`` built under settings ``a`` against ``b`` on every selected shape it applies
    to (group size 0: one group per output channel), torch FP32 beside them. ``weights``:
    ``ternary`` layers with ``act`` activations, or the dense ``int8`` (int8 activations) or
    ``fp32`` (float activations) layers the dense rules take (one group only).

    Raises ValueError for an unknown rule; a kernel that disagrees with its reference raises
    :class:`ternbench.schedules.KernelMismatchError` before anything is timed.
    """
    import tvm
    from ternbench import schedules
    from ternbench.schedules import measure, x86

    from .benchmark import _time_group

    tinfo = schedules.target_info("x86")
    rules = {r.name: r for r in x86.rules()}
    if rule not in rules:
        import difflib

        near = difflib.get_close_matches(rule, list(rules), n=1)
        raise ValueError(f"unknown rule {rule!r}" + (f"; did you mean {near[0]!r}?" if near
                                                     else f"; choose from {sorted(rules)}"))
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if weights != "ternary":  # dense layers: their own activations, one group
        act, group_sizes = weights, (0,)
    r = rules[rule]
    dev = tvm.cpu(0)
    out = []
    for sh in shapes if shapes is not None else select_shapes(suites, layers):
        for gs in group_sizes:
            lx = synthetic_layer(sh, weights, act, group_size=gs or None)
            if not r.applies(lx, tinfo):
                log.info("%s N=%s: %s does not apply", sh.label, gs or "-", rule)
                continue
            for batch in batches:
                impls: list[_Impl] = []
                code: list[str] = []
                for tag, settings in (("A", a), ("B", b)):
                    with applied(settings):  # packing may read them too
                        # the rule list is made under the settings: its grid's first point
                        # (the default tile parameters) reads module constants
                        rv = next(x for x in x86.rules() if x.name == rule)
                        kern = rv.build(lx, batch, tinfo, None)
                        prep = measure.prepare_kernel(kern, lx, tinfo)  # raises on a mismatch
                    code.append(kern.module.inspect_source("asm"))
                    impls.append(_tvm_impl(prep, act, rule, dev, impl=tag))
                impls.append(_torch_fp32_impl(lx, batch, threads))
                _time_group(impls, threads=threads, rounds=rounds, min_s=sample_s)
                ia, ib, it = (i.samples for i in impls)  # seconds per call, per round
                row = AbRow(sh.label, gs, batch, statistics.median(ia) * 1e6,
                            statistics.median(ib) * 1e6, statistics.median(it) * 1e6,
                            _paired(ib, ia), _paired(it, ia), _paired(it, ib),
                            same_code=code[0] == code[1])
                log.info("%s", row.line())
                out.append(row)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ternbench.bench.kernels.ab",
        description="Paired A/B of one TVM kernel rule built under two settings (module "
        "attributes the schedules read), torch FP32 timed beside them, one process.",
        epilog="example: --rule x86.t2_avx2 --isa avx2 --shapes cifar --layers 'resnet20.*conv' "
        "--group-sizes 4,16 --a ternbench.schedules.x86.AVX2_INT16_CHAIN=False",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rule", required=True, help="x86 rule name, e.g. x86.t2_avx512vnni")
    p.add_argument("--a", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="a setting of variant A (repeatable)")
    p.add_argument("--b", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="a setting of variant B (repeatable; none: the code as it is)")
    p.add_argument("--shapes", default="all", help="shape suites (as for `ternbench kernels`)")
    p.add_argument("--layers", default=None, help="comma list of layer-name patterns")
    p.add_argument("--batches", default="1,64", help="batch sizes (default: 1,64)")
    p.add_argument("--act", default=None, choices=("int8", "ternary"),
                   help="activations of the ternary layer (default: int8; the dense --weights "
                   "take their own)")
    p.add_argument("--weights", default="ternary", choices=WEIGHT_FORMATS,
                   help="weights of the layer (default: ternary); int8 / fp32: the dense "
                   "layers of the int8 / fp32 rules, with int8 / float activations")
    p.add_argument("--group-sizes", default="0",
                   help="FGQ group sizes, 0 = one group per channel (default: 0)")
    p.add_argument("--rounds", type=int, default=AB_ROUNDS, help="paired rounds")
    p.add_argument("--isa", default=None, help="force the x86 rules to this ISA level")
    p.add_argument("--out", default=None, help="also write the lines to this file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        a = [Setting.parse(t) for t in args.a]
        b = [Setting.parse(t) for t in args.b]
        args.batch_list = [int(x) for x in args.batches.split(",") if x.strip()]
        args.gs_list = [int(x) for x in args.group_sizes.split(",") if x.strip()]
        if args.act is not None and args.weights != "ternary":
            raise ValueError(f"--act {args.act} applies to ternary weights; --weights "
                             f"{args.weights} layers take {args.weights} activations")
    except ValueError as exc:
        print(f"ab: error: {exc}", file=sys.stderr)
        return 2
    for note in configure_env(1):
        log.warning(note)
    from ternbench import schedules

    try:
        if args.isa:
            schedules.force_isa(args.isa)
        with cap_torch_isa(schedules.forced_isa()) as notes:  # torch beside at that level too
            for note in notes:
                log.warning(note)
            return _run(args, a, b)
    except ValueError as exc:
        print(f"ab: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, a: list[Setting], b: list[Setting]) -> int:
    """Print the header, time, print (and append to ``--out``) one line per row."""
    from ternbench import schedules

    tinfo = schedules.target_info("x86")
    head = (f"{_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')} · "
            f"{_cpu_name()} ({tinfo.mcpu}) · git {_git_describe()} · rule {args.rule} · "
            f"isa {tinfo.isa}\nA: {', '.join(map(str, a)) or 'as is'}"
            f"\nB: {', '.join(map(str, b)) or 'as is'}\n{args.rounds} paired rounds, 1 "
            "thread; B/A and x torch fp32 are medians of per-round ratios")
    print(head, flush=True)
    rows = run_ab(args.rule, a, b, suites=args.shapes,
                  layers=args.layers.split(",") if args.layers else None,
                  batches=args.batch_list, act=args.act or "int8", group_sizes=args.gs_list,
                  rounds=args.rounds, weights=args.weights)
    for row in rows:
        print(row.line(), flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write("\n".join([head, *(r.line() for r in rows)]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
