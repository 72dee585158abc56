"""Checking CUDA schedules without a GPU: serial emulation on the host CPU with per-thread
register poisoning, and the static checks serial execution cannot see (package docstring)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import _tvm
from ..ops import Params, Rule, gemm_compute, pack_weight_args
from .schedules import _require

if TYPE_CHECKING:
    from ternbench.core.export import LayerExport

    from ..graph import GraphModule


def serial_equivalent(mod: Any, interleave: bool = False) -> Any:
    """``mod`` with every thread-bound loop made serial: the same blocks and buffers in the
    order one thread after the other would run them, buildable for the host CPU.

    A scheduled TensorIR module's value is that of its blocks run in loop order; thread binding
    (a cross-thread reduction included: a reduction loop bound to a thread axis) only changes
    who runs an iteration. So this module computes what the GPU kernel must compute, provided
    no thread reads another thread's registers (:func:`poison_thread_storage`), no block uses a
    buffer across kernels (:func:`schedule_errors`) and no two threads write one element.

    ``interleave`` runs the even-numbered threads of each (even-sized, spatial) thread loop
    before the odd ones, so that of two neighbouring threads writing the same element, the
    other one writes last in half of the pairs: a write race then shows in one order or the
    other. (A plain reversal would need negative-stride bindings, which TVM's buffer region
    analysis mishandles.)
    """
    tvm = _require()
    import tvm_ffi

    tirx = tvm.tirx
    reduce_vars: list[Any] = []  # loop vars that feed a reduction iter var of some block

    def note(realize: Any) -> None:
        for iv, value in zip(realize.block.iter_vars, realize.iter_values, strict=True):
            if iv.iter_type == tirx.IterVar.CommReduce:
                tvm_ffi.structural_walk(value, [(tirx.Var, reduce_vars.append)])

    tvm_ffi.structural_walk(mod, [(tvm.s_tir.SBlockRealize, note)])

    def serial(loop: Any) -> Any:
        if loop.kind != tirx.ForKind.THREAD_BINDING:
            return loop
        ext = int(loop.extent) if isinstance(loop.extent, tirx.IntImm) else 0
        # a reduction loop keeps its order: a block's init runs at the first value of its
        # reduction vars (a reordered cross-thread reduction would re-init midway)
        if (not interleave or ext < 4 or ext % 2
                or any(loop.loop_var.same_as(v) for v in reduce_vars)):
            return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL,
                            loop.body, None, loop.annotations, loop.step, loop.span)
        var = loop.loop_var
        odd = tirx.Var(f"{var.name}_odd", var.ty)
        half = tirx.Var(f"{var.name}_half", var.ty)
        body = tvm_ffi.structural_map(
            loop.body, [(tirx.Var, lambda v: loop.min + half * 2 + odd if v.same_as(var) else v)])
        inner = tirx.For(half, 0, ext // 2, tirx.ForKind.SERIAL, body)
        return tirx.For(odd, 0, 2, tirx.ForKind.SERIAL, inner)

    return tvm_ffi.structural_map(mod, [(tirx.For, serial)])


def _poison_value(tirx: Any, dtype: str) -> Any:
    if dtype.startswith("float"):
        return tirx.const(float("nan"), dtype)
    return tirx.const(0x55 if dtype.endswith("int8") else 0x2AAAAAAA, dtype)


def poison_thread_storage(mod: Any) -> Any:
    """Place the ``local`` / ``shared`` buffers of a :func:`serial_equivalent` module where
    the GPU lowering would (TVM's own allocation-placement and compaction passes), and fill
    each with garbage (NaN, ``0x2AAAAAAA``) where it is allocated.

    A register buffer allocated under the (serialised) thread loops then starts as garbage in
    every thread, as on a GPU, instead of holding what the previous thread left there: a
    schedule whose thread reads registers it did not write (e.g. a compute_at region wider
    than the thread's own tile) produces garbage in emulation too.
    """
    tvm = _require()
    import tvm_ffi

    tirx, s_tir = tvm.tirx, tvm.s_tir
    placement = tvm.ir.transform.Sequential([
        s_tir.transform.CanonicalizeLoop(),
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(),
    ])
    with tvm.target.Target({"kind": "llvm"}):
        mod = placement(mod)

    def fill(block: Any) -> Any:
        bufs = [b for b in block.alloc_buffers if str(b.scope()) in ("local", "shared")]
        if not bufs:
            return block
        fills = []
        for buf in bufs:
            idx = [tirx.Var(f"poison{d}", "int32") for d in range(len(buf.shape))]
            stmt = tirx.BufferStore(buf, _poison_value(tirx, str(buf.dtype)), idx)
            for var, ext in reversed(list(zip(idx, buf.shape, strict=True))):
                stmt = tirx.For(var, 0, ext, tirx.ForKind.SERIAL, stmt)
            fills.append(stmt)
        return s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint,
                            tirx.SeqStmt([*fills, block.body]), block.init, block.alloc_buffers,
                            block.match_buffers, block.annotations)

    return tvm_ffi.structural_map(mod, [(s_tir.SBlock, fill)])


def schedule_errors(func: Any) -> list[str]:
    """GPU errors of a scheduled PrimFunc that serial emulation cannot see; ``[]`` when none.

    Every block must run under a ``threadIdx`` binding (else it is host code that would touch
    device memory). All blocks touching a ``local`` or ``shared`` buffer must be in one kernel
    (one root-level thread loop nest), and for a ``local`` buffer run on the same threads (the
    same ``threadIdx`` tags with the same extents), except for the thread axes a block reduces
    over: a cross-thread reduction reads the other threads' partial sums by design, and its
    result is then every thread's. Loops are compared by tag and extent, not by how they map
    iterations to threads. TVM compiles such errors without complaint.
    """
    tvm = _require()
    import tvm_ffi

    tirx, s_tir = tvm.tirx, tvm.s_tir
    stack: list[Any] = []  # enclosing thread-bound loops, outermost first
    uses: dict[str, list[tuple[str, list[Any], list[Any]]]] = {}
    scopes: dict[str, str] = {}
    host: list[str] = []

    def tag(loop: Any) -> str:
        return str(loop.thread_binding.thread_tag)

    def on_for(loop: Any, visitor: Any) -> None:
        bound = loop.kind == tirx.ForKind.THREAD_BINDING
        if bound:
            stack.append(loop)
        visitor.default_visit(loop)
        if bound:
            stack.pop()

    def on_realize(realize: Any, visitor: Any) -> None:
        blk = realize.block
        if blk.name_hint != "root" and not any(tag(lp).startswith("threadIdx") for lp in stack):
            host.append(blk.name_hint)
        red_vars: list[Any] = []
        for iv, value in zip(blk.iter_vars, realize.iter_values, strict=True):
            if iv.iter_type == tirx.IterVar.CommReduce:
                tvm_ffi.structural_walk(value, [(tirx.Var, red_vars.append)])
        for region in [*blk.reads, *blk.writes]:
            buf = region.source
            scope = str(buf.scope())
            if scope in ("local", "shared"):
                scopes[str(buf.name)] = scope
                uses.setdefault(str(buf.name), []).append((blk.name_hint, list(stack), red_vars))
        visitor.default_visit(realize)

    tvm_ffi.structural_visit(func, [(tirx.For, on_for), (s_tir.SBlockRealize, on_realize)])

    def threads(loops: list[Any], red_vars: list[Any], kinds: tuple[str, ...]
                ) -> tuple[set[tuple[str, int]], set[str]]:
        """((tag, extent) of the loops that identify the thread, tags reduced over)."""
        ls = [lp for lp in loops if tag(lp).startswith(kinds)]
        reduced = {tag(lp) for lp in ls if any(lp.loop_var.same_as(v) for v in red_vars)}
        return {(tag(lp), int(lp.extent)) for lp in ls if tag(lp) not in reduced}, reduced

    errors = [f"block {b!r} is not bound to GPU threads" for b in host]
    for name, accesses in uses.items():
        kinds = ("blockIdx",) if scopes[name] == "shared" else ("blockIdx", "threadIdx")
        first, loops0, red0 = accesses[0]
        own0, reduced0 = threads(loops0, red0, kinds)
        for blk, loops, red in accesses[1:]:
            # one kernel per root-level thread loop nest: within it, loops bound to the same
            # tag with the same extent are the same threads
            if not (loops and loops0 and loops[0].same_as(loops0[0])):
                errors.append(f"{scopes[name]} buffer {name}: blocks {first!r} and {blk!r} are "
                              "in different kernels")
                continue
            own, reduced = threads(loops, red, kinds)
            bad = sorted({t for t, _ in own0 ^ own} - reduced0 - reduced)
            if bad:
                errors.append(f"{scopes[name]} buffer {name}: blocks {first!r} and {blk!r} run "
                              f"on different {', '.join(bad)} threads")
    return errors


def emulate_layer(lx: LayerExport, batch: int = 1, rule: Rule | None = None,
                  params: Params | None = None) -> tuple[str, float]:
    """Check the CUDA schedule of ``lx`` without a GPU: :func:`schedule_errors`, then the
    :func:`serial_equivalent` with :func:`poison_thread_storage`, run on the host CPU with the
    threads in both orders, against :func:`.measure.reference_output`.

    Returns ``(rule name, max |err|)``; raises :class:`.measure.KernelMismatchError` when a
    run is off by more than the kernel's tolerance or the schedule has a GPU error.

    Example:
        >>> # emulate_layer(lx, batch=1)  ->  ("cuda.t2_gemv", 3.1e-06)
    """
    from .. import measure

    tvm = _require()
    tinfo = _tvm.target_info("cuda")
    if rule is None:
        rule = measure.select_rule(lx, tinfo)
    spec = rule.plan(lx, batch, tinfo, dict(rule.default_params if params is None else params))
    mod = rule.schedule(gemm_compute(spec), spec)
    errors = schedule_errors(mod["main"])
    if errors:
        raise measure.KernelMismatchError(f"{lx.name}: {rule.name}: " + "; ".join(errors))
    a = measure.kernel_input(lx, spec)
    ref = measure.reference_output(lx, a)
    dev = tvm.cpu(0)
    args = [tvm.runtime.tensor(v, dev) for v in (a, *pack_weight_args(spec, lx))]
    err = 0.0
    for interleave in (False, True):  # a write race shows in one order or the other
        host = poison_thread_storage(serial_equivalent(mod, interleave=interleave))
        exe = tvm.compile(host, target=tvm.target.Target({"kind": "llvm"}))
        out = tvm.runtime.empty((spec.M, spec.N), "float32", dev)
        exe.jit()["main"](*args, out)
        what = f"{rule.name} (serial CPU emulation{', interleaved' if interleave else ''})"
        err = max(err, measure._check(lx.name, what, out.numpy(), ref, measure._rtol(spec)))
    return rule.name, err


def emulate_graph(gm: GraphModule, x: Any) -> Any:
    """Logits of a whole model built for CUDA (:func:`.graph.build_graph` with
    ``target="cuda"``), computed without a GPU: every kernel and stage of its Relax ``main``
    made :func:`serial_equivalent` with :func:`poison_thread_storage` and :func:`schedule_errors`
    checked, compiled for the host CPU and run by the Relax VM, sample batch after batch.

    ``x`` is ``[n * batch, C, H, W]`` float32. Raises :class:`.measure.KernelMismatchError`
    when a stage or kernel has a GPU schedule error.
    """
    import numpy as np

    from .. import measure

    tvm = _require()
    funcs = {}
    for gv, f in gm.mod.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc):
            errors = schedule_errors(f)
            if errors:
                raise measure.KernelMismatchError(f"{gv.name_hint}: " + "; ".join(errors))
            f = poison_thread_storage(tvm.IRModule({"main": f}))["main"]
            f = f.without_attr("target") if "target" in f.attrs else f
        funcs[gv] = f
    host = serial_equivalent(tvm.IRModule(funcs))
    vm = tvm.relax.VirtualMachine(tvm.compile(host, target=tvm.target.Target({"kind": "llvm"})),
                                  tvm.cpu(0))
    params = [tvm.runtime.tensor(np.ascontiguousarray(a)) for _n, a in gm.params]
    xs = np.ascontiguousarray(np.asarray(x, np.float32))
    b = gm.batch
    if xs.shape[0] % b or xs.shape[1:] != tuple(gm.input_shape[1:]):
        raise ValueError(f"input {xs.shape} is not whole batches of {gm.input_shape}")
    return np.concatenate([vm["main"](tvm.runtime.tensor(xs[i:i + b]), *params).numpy()
                           for i in range(0, len(xs), b)])
