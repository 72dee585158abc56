"""TVM RPC timing: endpoint parsing, clear connection errors, and a real round trip through a
local ``python -m tvm.exec.rpc_server`` (target x86: the server runs on this machine)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from ternbench.methods import ConfigError
from ternbench.schedules import _tvm, measure
from ternbench.schedules.measure import KernelMismatchError
from ternbench.schedules.rpc import RpcEndpoint, measure_layer_rpc
from test_schedules import EV, make_layer


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def rpc_server(tmp_path_factory):
    """A TVM RPC server on 127.0.0.1 in its own process group, stopped by its id."""
    pytest.importorskip("tvm")
    if not _tvm.is_x86_host():
        pytest.skip("the local RPC round trip uses the x86 target")
    port = _free_port()
    env = dict(os.environ, TVM_NUM_THREADS="2")
    log_path = tmp_path_factory.mktemp("rpc") / "rpc_server.log"
    log = open(log_path, "wb")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port",
         str(port), "--port-end", str(port + 1)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def stop() -> None:
        # the server runs its listener in a child (tvm's popen worker): end the process
        # group this fixture created (its id is the server's pid), then reap the server
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()

    deadline = time.monotonic() + 90  # `import tvm` takes several seconds on a busy machine
    try:
        while True:
            if proc.poll() is not None:
                err = log_path.read_text(errors="replace")
                pytest.fail(f"rpc_server exited with {proc.returncode}: {err[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("rpc_server did not listen within 90 s")
                time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        stop()


# ----------------------------------------------------------------------------- endpoints


def test_endpoint_parsing():
    assert RpcEndpoint.parse(" 10.1.2.3:9090 ") == RpcEndpoint("10.1.2.3", 9090)
    assert RpcEndpoint.parse("board.local:1") == RpcEndpoint("board.local", 1)
    assert RpcEndpoint.parse("[::1]:9090") == RpcEndpoint("::1", 9090)
    tr = RpcEndpoint.parse("tracker=10.0.0.2:9190,key=rpi5")
    assert tr == RpcEndpoint("10.0.0.2", 9190, key="rpi5", tracker=True)
    assert RpcEndpoint.parse("key=rpi5, tracker=h:9190") == tr.__class__("h", 9190, "rpi5", True)
    for ep in ("10.1.2.3:9090", "[::1]:9090", "tracker=10.0.0.2:9190,key=rpi5"):
        assert str(RpcEndpoint.parse(ep)) == ep


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("", "empty"),
        ("board", "no port"),
        (":9090", "host"),
        ("board:http", "port"),
        ("board:0", "port"),
        ("board:70000", "port"),
        ("[::1]9090", "IPV6"),
        ("tracker=h:9190", "key"),
        ("tracker=h:9190,key=", "key"),
        ("key=rpi5", "tracker"),
        ("tracker=h:x,key=k", "port"),
        ("tracker=h:1,key=k,prio=2", "prio"),
        ("tracker=h:1,tracker=h:2,key=k", "twice"),
        ("tracker=h:1,key", "NAME=VALUE"),
    ],
)
def test_bad_endpoints_name_the_field(text, field):
    with pytest.raises(ConfigError, match=field):
        RpcEndpoint.parse(text)
    assert issubclass(ConfigError, ValueError)


def _needs_cross_gcc() -> None:
    """The ARM paths cross-link the kernel before they reach the board."""
    from ternbench.schedules import cross

    if shutil.which(cross.CROSS_CC) is None:
        pytest.skip(f"{cross.CROSS_CC} missing (apt-get install gcc-aarch64-linux-gnu; "
                    ".ci/run and the README's set-up install it)")


@pytest.mark.tvm
def test_connection_refused_is_clear():
    pytest.importorskip("tvm")
    _needs_cross_gcc()
    port = _free_port()  # nothing listens there
    lx = make_layer(name="nowhere")
    with pytest.raises(ConnectionError) as exc:
        measure_layer_rpc(lx, endpoint=f"127.0.0.1:{port}", target="arm", ev=EV)
    msg = str(exc.value)
    assert f"127.0.0.1:{port}" in msg and "tvm.exec.rpc_server" in msg and "refused" in msg
    with pytest.raises(ConnectionError, match="RPC tracker"):
        RpcEndpoint.parse(f"tracker=127.0.0.1:{port},key=rpi").connect(timeout_s=2)


def test_rpc_rejects_cuda():
    with pytest.raises(ValueError, match="RPC"):
        measure_layer_rpc(make_layer(), endpoint="127.0.0.1:9", target="cuda", ev=EV)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.tvm
@pytest.mark.timeout(180)  # a stuck session fails here, not after 10 min
@pytest.mark.parametrize(
    ("label", "kw", "batch"),
    [
        ("rpc_conv", dict(op="conv2d", out=16, cin=8, hw=(6, 6), stride=2), 2),
        ("rpc_tt", dict(op="linear", out=12, cin=72, gs=16, act="ternary"), 1),
    ],
)
def test_measure_over_rpc(rpc_server, label, kw, batch):
    lx = make_layer(**kw, name=label)
    lat = measure_layer_rpc(lx, endpoint=rpc_server, target="x86", batch=batch, ev=EV,
                            threads=1)
    local = measure.measure_layer(lx, batch=batch, ev=EV)
    assert lat.impl == local.impl and lat.target == "x86" and lat.target_str == local.target_str
    assert lat.threads == 1 and lat.batch == batch
    assert (lat.M, lat.K, lat.N) == (local.M, local.K, local.N)
    assert len(lat.raw_us) == EV.repeat and all(r > 0 for r in lat.raw_us)
    assert min(lat.raw_us) <= lat.median_us <= max(lat.raw_us)
    assert np.isfinite(lat.max_abs_err) and lat.max_abs_err == local.max_abs_err


@pytest.mark.tvm
@pytest.mark.timeout(180)  # a stuck session fails here, not after 10 min
def test_rpc_checks_before_timing(rpc_server, monkeypatch):
    lx = make_layer(out=16, cin=32, name="bad_rpc")
    real = measure.reference_output
    monkeypatch.setattr(measure, "reference_output", lambda lx_, a: real(lx_, a) * 1.001)
    with pytest.raises(KernelMismatchError, match="bad_rpc"):
        measure_layer_rpc(lx, endpoint=rpc_server, target="x86", ev=EV)


@pytest.mark.tvm
@pytest.mark.timeout(180)  # a stuck session fails here, not after 10 min
def test_rpc_session_reuse(rpc_server):
    sess = RpcEndpoint.parse(rpc_server).connect()
    lats = [measure_layer_rpc(make_layer(out=8 * i, cin=32, name=f"l{i}"), endpoint=rpc_server,
                              target="x86", ev=EV, session=sess) for i in (1, 2)]
    assert [lat.N for lat in lats] == [8, 16]


@pytest.mark.tvm
@pytest.mark.timeout(180)
def test_arm_kernel_on_an_x86_server_is_a_clear_error(rpc_server):
    """The ARM path up to the board: build, cross-link, upload; the x86 server cannot load it."""
    _needs_cross_gcc()
    with pytest.raises(RuntimeError, match="could not load the kernel built for arm "):
        measure_layer_rpc(make_layer(name="arm_on_x86"), endpoint=rpc_server, target="arm",
                          ev=EV)
