"""Real latency on another machine (an ARM board, another x86 host) through TVM's RPC server.

The kernel is built here (ARM: cross-compiled and linked with the aarch64 cross gcc, x86:
exported natively), uploaded, loaded by the remote TVM runtime, run once and compared with the
float64 reference computed here, and only then timed with the remote ``time_evaluator`` (the
loop runs on the board; only the result travels back).

On the board (aarch64 wheels exist on PyPI)::

    pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post0
    python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090

Endpoints are ``HOST:PORT`` (a server) or ``tracker=HOST:PORT,key=KEY`` (a device pool behind
``python -m tvm.exec.rpc_tracker``; servers join it with ``--tracker HOST:PORT --key KEY``).

Example:
    >>> RpcEndpoint.parse("192.168.1.7:9090")
    RpcEndpoint(host='192.168.1.7', port=9090, key='', tracker=False)
    >>> str(RpcEndpoint.parse("tracker=10.0.0.2:9190,key=rpi5"))
    'tracker=10.0.0.2:9190,key=rpi5'
"""

from __future__ import annotations

import hashlib
import logging
import socket
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ternbench.core.errors import ConfigError

from . import _tvm, cross, measure, ops
from .measure import EvaluatorCfg, LayerLatency

if TYPE_CHECKING:
    import torch
    from ternbench.core.export import LayerExport

__all__ = ["RpcEndpoint", "measure_layer_rpc", "SERVER_HINT", "RPC_FAMILIES"]

log = logging.getLogger(__name__)

#: how to start a server, quoted in connection errors
SERVER_HINT = ("start one on the device with: pip install apache-tvm==0.27.0.post1 "
               "apache-tvm-ffi==0.1.14.post0 && python -m tvm.exec.rpc_server "
               "--host 0.0.0.0 --port {port}")
#: target families whose kernels can be shipped to an RPC server from here (CUDA kernels are
#: timed locally on a GPU machine)
RPC_FAMILIES = ("x86", "arm")


@dataclass(frozen=True)
class RpcEndpoint:
    """Where the TVM RPC server is: a server (``HOST:PORT``) or a tracker plus a device key
    (``tracker=HOST:PORT,key=KEY``)."""

    host: str
    port: int
    key: str = ""
    tracker: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip():
            raise ConfigError(f"rpc endpoint: host must be a non-empty name or address, "
                              f"got {self.host!r}")
        if any(c.isspace() or c in ",=" for c in self.host):
            raise ConfigError(f"rpc endpoint: host {self.host!r} contains a space, ',' or '='")
        if isinstance(self.port, bool) or not isinstance(self.port, int) \
                or not 1 <= self.port <= 65535:
            raise ConfigError(f"rpc endpoint: port must be an integer in 1..65535, "
                              f"got {self.port!r}")
        if self.tracker and not self.key:
            raise ConfigError("rpc endpoint: key is required with a tracker "
                              "(tracker=HOST:PORT,key=KEY)")
        if any(c.isspace() or c in ",=" for c in self.key):
            raise ConfigError(f"rpc endpoint: key {self.key!r} contains a space, ',' or '='")

    @classmethod
    def parse(cls, text: str) -> RpcEndpoint:
        """Parse ``HOST:PORT`` or ``tracker=HOST:PORT,key=KEY`` (IPv6 hosts in brackets:
        ``[::1]:9090``). Errors name the field that is wrong."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError("rpc endpoint is empty; expected HOST:PORT or "
                              "tracker=HOST:PORT,key=KEY")
        text = text.strip()
        if "=" not in text:
            host, port = _host_port(text, "endpoint")
            return cls(host, port)
        fields: dict[str, str] = {}
        for part in text.split(","):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep:
                raise ConfigError(f"rpc endpoint: field {part.strip()!r} is not NAME=VALUE "
                                  "(expected tracker=HOST:PORT,key=KEY)")
            if name not in ("tracker", "key"):
                raise ConfigError(f"rpc endpoint: unknown field {name!r} (known: tracker, key)")
            if name in fields:
                raise ConfigError(f"rpc endpoint: field {name!r} given twice")
            fields[name] = value.strip()
        if "tracker" not in fields:
            raise ConfigError("rpc endpoint: tracker is missing (tracker=HOST:PORT,key=KEY)")
        if not fields.get("key"):
            raise ConfigError("rpc endpoint: key is missing or empty (tracker=HOST:PORT,key=KEY)")
        host, port = _host_port(fields["tracker"], "tracker")
        return cls(host, port, key=fields["key"], tracker=True)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.tracker:
            return f"tracker={host}:{self.port},key={self.key}"
        return f"{host}:{self.port}"

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def connect(self, *, timeout_s: float = 10.0, wait_s: float = 300.0) -> Any:
        """Open an RPC session (``tvm.rpc.RPCSession``).

        ``timeout_s`` bounds the TCP connect; ``wait_s`` bounds how long a tracker may keep the
        request queued while every device of ``key`` is busy. Raises ConnectionError that names
        the address and says how to start a server.
        """
        tvm = _tvm.require_tvm()
        what = "RPC tracker" if self.tracker else "TVM RPC server"
        hint = ("start one with: python -m tvm.exec.rpc_tracker --host 0.0.0.0 "
                f"--port {self.port}, and servers with --tracker {self.address} --key {self.key}"
                if self.tracker else SERVER_HINT.format(port=self.port))
        try:  # a plain TCP connect first: fails in timeout_s instead of TVM's long retries
            with socket.create_connection((self.host, self.port), timeout=timeout_s):
                pass
        except OSError as exc:
            raise ConnectionError(f"cannot reach the {what} at {self.address}: {exc}; "
                                  f"{hint}") from exc
        try:
            if not self.tracker:
                return tvm.rpc.connect(self.host, self.port)
            tracker = tvm.rpc.connect_tracker(self.host, self.port)
            sock = getattr(tracker, "_sock", None)
            if sock is not None:  # the request blocks until a device is free: bound it
                sock.settimeout(wait_s)
            return tracker.request(self.key, priority=1, session_timeout=0, max_retry=1)
        except Exception as exc:  # TVM raises its own error types for protocol failures
            raise ConnectionError(f"RPC session with the {what} at {self.address} failed: "
                                  f"{_first_line(exc)}; {hint}") from exc


def _host_port(text: str, field: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[V6]:PORT``) -> (host, port); errors name ``field``'s parts."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"rpc endpoint: {field} {text!r} is not [IPV6]:PORT")
        port_s = rest[1:]
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep:
            raise ConfigError(f"rpc endpoint: {field} {text!r} has no port (expected HOST:PORT)")
    if not host:
        raise ConfigError(f"rpc endpoint: host is empty in {field} {text!r}")
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"rpc endpoint: port {port_s!r} in {field} {text!r} is not an "
                          "integer") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"rpc endpoint: port must be in 1..65535, got {port} in {field}")
    return host, port


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def _export(kern: ops.Kernel, tinfo: _tvm.TargetInfo, path: Path) -> Path:
    if tinfo.family == "arm":
        return cross.export_arm(kern, path)
    kern.export(path)  # the host's own compiler: an x86 server runs the same ABI
    return path


def _remote_threads(sess: Any, threads: int | None) -> int:
    """Set the remote pool size (``runtime.config_threadpool``, when the server has it) and
    return the count in use there (0 when the server does not say)."""
    if threads is not None:
        try:
            sess.get_function("runtime.config_threadpool")(0, int(threads))
        except Exception as exc:  # an older/minimal runtime without the function
            log.warning("remote runtime has no runtime.config_threadpool (%s); "
                        "using its default thread count", _first_line(exc))
    try:
        return int(sess.get_function("runtime.NumThreads")())
    except Exception:
        return int(threads or 0)


def _run_remote(session: Any, ep: RpcEndpoint, what: str, blob: bytes, host_args: list[Any],
                out_shape: tuple[int, int], check: Callable[[np.ndarray], float],
                ev: EvaluatorCfg, threads: int | None) -> tuple[tuple[float, ...], int, float]:
    """Upload, load, run once, ``check`` the output, then time: ``(raw_us, threads, err)``.
    Opens (and closes, when this frame ends) a session of its own unless one is given."""
    tvm = _tvm.require_tvm()
    sess = session if session is not None else ep.connect()
    # content-addressed name: kernels of one session never overwrite each other
    remote_name = f"tb_{hashlib.sha256(blob).hexdigest()[:16]}.so"
    rmod = dev = args = out = timer = None  # remote handles: each one keeps the session open
    try:
        sess.upload(bytearray(blob), target=remote_name)
        try:
            rmod = sess.load_module(remote_name)
        except Exception as exc:  # TVM's RPCError: typically a library for another CPU
            raise RuntimeError(f"the RPC server at {ep.address} could not load the kernel "
                               f"built for {what}: {_first_line(exc)} (the server must run "
                               "on a CPU of that target)") from exc
        dev = sess.cpu(0)
        args = [tvm.runtime.tensor(v, dev) for v in host_args]
        out = tvm.runtime.empty(out_shape, "float32", dev)
        used = _remote_threads(sess, threads)
        rmod["main"](*args, out)  # also warms the board's caches before timing
        err = check(out.numpy())
        timer = rmod.time_evaluator("main", dev, number=ev.number, repeat=ev.repeat,
                                    min_repeat_ms=ev.min_repeat_ms)
        raw = tuple(float(r) * 1e6 for r in timer(*args, out).results)
    finally:
        try:
            sess.remove(remote_name)
        except Exception as exc:  # the server's temp folder goes with the session anyway
            log.debug("could not remove %s on %s: %s", remote_name, ep, exc)
        # drop the handles now: a traceback that outlives this call (a failed check) holds
        # this frame, and must not keep a session of ours open
        del rmod, dev, args, out, timer, sess
    return raw, used, err


def measure_layer_rpc(lx: LayerExport, *, endpoint: str | RpcEndpoint, target: str,
                      batch: int = 1, ev: EvaluatorCfg = EvaluatorCfg(),  # noqa: B008
                      x: torch.Tensor | None = None, threads: int | None = None,
                      params: ops.Params | None = None, session: Any = None) -> LayerLatency:
    """Build the kernel of ``lx`` for ``target``, run it on the RPC server, check it, time it.

    ``target`` is an ARM target (``arm``, ``arm-neon``, ``arm-sve``: cross-compiled) or
    ``x86`` (this host's CPU model: the server must run the same instruction set).
    ``threads`` sets the remote pool size (default: the server's own). ``session`` reuses an
    open session (from :meth:`RpcEndpoint.connect`) across layers. The output is compared with
    :func:`.measure.reference_output` before timing (:class:`.measure.KernelMismatchError`).
    Raises ConnectionError when the server cannot be reached.

    Example (with a board at 192.168.1.7 running the RPC server)::

        lat = measure_layer_rpc(lx, endpoint="192.168.1.7:9090", target="arm", threads=4)
    """
    ep = endpoint if isinstance(endpoint, RpcEndpoint) else RpcEndpoint.parse(endpoint)
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    tinfo = _tvm.target_info(target)
    if tinfo.family not in RPC_FAMILIES:
        raise ValueError(f"target {target!r} cannot be timed over RPC from here (families "
                         f"{list(RPC_FAMILIES)}); time CUDA kernels on a GPU machine")
    kern = measure.build_layer(lx, batch, target, params)
    spec = kern.spec
    a = measure.kernel_input(lx, spec, x)
    host_args = [a, *kern.pack(lx)]
    ref = measure.reference_output(lx, a)
    with tempfile.TemporaryDirectory(prefix="tb-rpc-") as tmp:
        blob = _export(kern, tinfo, Path(tmp) / "kernel.so").read_bytes()
    # TVM's compile path keeps frames alive through inspect.stack() records (this one
    # included), so the session must not be a local of this frame: it would stay open,
    # and the server, which serves one session at a time, would never take the next one
    what = f"{target} ({tinfo.description})"
    raw, used, err = _run_remote(session, ep, what, blob, host_args, (spec.M, spec.N),
                                 lambda y: measure._check(lx.name, f"{kern.impl} on {ep}", y,
                                                          ref, measure._rtol(spec)),
                                 ev, threads)
    log.debug("%s %s %s on %s: %.1f us", lx.name, kern.impl, spec.shape_key, ep,
              statistics.median(raw))
    return LayerLatency(
        layer=lx.name, impl=kern.impl, target=target, median_us=float(statistics.median(raw)),
        raw_us=raw, threads=used, batch=batch, M=spec.M, K=spec.K, N=spec.N,
        max_abs_err=err, target_str=kern.target_str)
