"""Run a ternbench artifact with the TVM runtime alone: python run_artifact.py ARTIFACT [X.npy]"""
import ctypes
import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np
import tvm

root = Path(sys.argv[1])
manifest = json.loads((root / "manifest.json").read_text())
for name, digest in manifest["files"].items():  # refuse a modified artifact
    if hashlib.sha256((root / name).read_bytes()).hexdigest() != digest:
        sys.exit(f"{root / name}: sha256 does not match the manifest; refusing to load it")
# AMX kernels (t2_amx, tt_amx: built on CPUs with AMX-INT8) need the tile state, which Linux hands
# out per process on request: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), Linux >= 5.16
if platform.machine() == "x86_64" and "amx_tile" in Path("/proc/cpuinfo").read_text():
    ctypes.CDLL(None).syscall(158, 0x1023, 18)
dev = tvm.cpu()
vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(root / "model.so")), dev)
with np.load(root / "params.npz", allow_pickle=False) as z:
    params = [tvm.runtime.tensor(z[k], dev) for k in manifest["params"]["order"]]
# x: the normalised batch, (image - mean) / std per channel, NCHW float32 of input.shape
x = np.load(sys.argv[2]) if len(sys.argv) > 2 else np.zeros(manifest["input"]["shape"])
logits = vm["main"](tvm.runtime.tensor(x.astype(np.float32), dev), *params).numpy()
print(json.dumps({"top1": logits.argmax(1).tolist(), "logits": logits.tolist()}))
