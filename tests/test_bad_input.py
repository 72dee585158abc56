"""Bad input, table-driven: every case gets one clear error line naming the input, a non-zero
exit, no traceback, and leaves an existing run directory untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from ternbench.bench.cli import main
from ternbench.bench.results import ResultStore, make_row

R = ["run", "--profile", "smoke", "--executor", "local", "--no-report", "--no-progress"]

# (id, argv, words the error must contain); OUT is replaced by the existing run directory
CASES: list[tuple[str, list[str], list[str]]] = [
    ("unknown-method", [*R, "--methods", "fgqq"], ["fgqq", "Did you mean 'fgq'"]),
    ("empty-methods", [*R, "--methods", ""], ["methods", "non-empty"]),
    ("unknown-model", [*R, "--model", "resnet9"], ["resnet9", "resnet8"]),
    ("unknown-dataset", [*R, "--dataset", "cifar11"], ["cifar11", "cifar10"]),
    ("unknown-profile", [*R, "--profile", "smok"], ["smok", "choose from"]),
    ("negative-seed", [*R, "--seed", "-1"], ["seeds", "-1"]),
    ("non-int-seed", [*R, "--seed", "abc"], ["abc"]),
    ("unknown-target", [*R, "--targets", "riscv"], ["target", "riscv", "x86, arm"]),
    ("misspelt-target", [*R, "--targets", "x86,cdua"], ["Did you mean 'cuda'"]),
    ("rpc-without-arm", [*R, "--rpc", "10.0.0.2:9090"], ["rpc", "ARM target"]),
    ("zero-threads", [*R, "--threads", "0"], ["latency_threads", "positive"]),
    ("zero-cpus", [*R, "--num-cpus", "0"], ["num_cpus", "positive"]),
    ("group-size-0", [*R, "--methods", "fgq", "--set", "fgq.group_size=0"], ["group_size", "0"]),
    ("group-size-text", [*R, "--methods", "fgq", "--set", "fgq.group_size=abc"],
     ["group_size", "abc"]),
    ("set-without-method", [*R, "--set", "group_size=4"], ["METHOD.FIELD=VALUE"]),
    ("set-unknown-field", [*R, "--methods", "fgq", "--set", "fgq.groupsize=4"],
     ["groupsize", "Did you mean 'group_size'"]),
    ("set-bad-solver", [*R, "--methods", "fgq", "--set", "fgq.solver=magic"], ["solver", "magic"]),
    ("set-bad-act-bits", [*R, "--methods", "fgq", "--set", "fgq.act_bits=3"], ["act_bits", "3"]),
    ("set-method-not-run", [*R, "--methods", "fgq", "--set", "twn.ratio=0.5"],
     ["overrides", "twn"]),
    ("negative-ratio", [*R, "--methods", "twn", "--set", "twn.ratio=-1"], ["ratio", "-1"]),
    ("negative-tolerance", [*R, "--methods", "trn", "--set", "trn.tolerance=-0.1"], ["tolerance"]),
    ("negative-budget", [*R, "--methods", "trn", "--set", "trn.budget=-1"], ["budget"]),
    ("bad-fraction", [*R, "--methods", "trn", "--set", "trn.active_fraction=2"],
     ["active_fraction"]),
    ("bad-t-ex", [*R, "--methods", "ttn_re", "--set", "ttn_re.t_ex=3"], ["t_ex", "3"]),
    ("negative-lr", [*R, "--methods", "sttn", "--set", "sttn.lr=-1"], ["lr", "-1"]),
    ("sweep-bad-value", [*R, "--sweep", "fgq.group_size=4,0"], ["group_size", "0"]),
    ("sweep-empty-value", [*R, "--sweep", "fgq.group_size=4,,8"], ["empty value"]),
    ("sweep-without-method", [*R, "--sweep", "group_size=4"], ["METHOD.FIELD=V1,V2"]),
    ("unknown-ablation", [*R, "--ablation", "fgq-sizes"], ["fgq-sizes", "fgq-group-size"]),
    ("missing-config", [*R, "--config", "CFG/missing.toml"], ["missing.toml", "does not exist"]),
    ("broken-toml", [*R, "--config", "CFG/broken.toml"], ["broken.toml", "not valid TOML"]),
    ("toml-unknown-key", [*R, "--config", "CFG/key.toml"], ["method", "Did you mean 'methods'"]),
    ("toml-unknown-table", [*R, "--config", "CFG/table.toml"], ["unknown table", "[sweep.<name>]"]),
    ("toml-wrong-type", [*R, "--config", "CFG/type.toml"], ["seeds", "a list"]),
    ("cifar-missing-root", [*R, "--dataset", "cifar10", "--data-root", "CFG/nowhere"],
     ["cifar-10-batches-py", "nowhere"]),
    ("imagenet-empty-root", [*R, "--dataset", "imagenet", "--model", "resnet18",
                             "--data-root", "CFG/empty"], ["no class folders", "--data-root"]),
    ("out-is-a-file", [*R, "--out", "CFG/file.txt"], ["file.txt"]),
    ("out-other-schema", [*R, "--out", "CFG/oldrun"], ["schema version", "new --out"]),
    ("report-no-results", ["report", "CFG/empty"], ["no results.parquet"]),
    ("weights-missing", [*R, "--weights", "CFG/none.pt"], ["none.pt", "does not exist"]),
    ("weights-evil-pickle", [*R, "--weights", "CFG/evil.pt"], ["refused", "weights_only"]),
    ("weights-wrong-model", [*R, "--weights", "CFG/small.pt"], ["does not fit", "resnet8"]),
    ("weights-two-models", [*R, "--weights", "CFG/small.pt", "--model", "resnet8,resnet20"],
     ["weights", "single"]),
    # issue 14
    ("group-size-bool", [*R, "--methods", "fgq", "--set", "fgq.group_size=true"],
     ["group_size", "integer", "True"]),
    ("duplicate-seeds", [*R, "--seeds", "0,0"], ["seeds", "distinct", "seed 0"]),
    ("rpc-no-port", [*R, "--targets", "arm", "--rpc", "notahost"], ["--rpc", "notahost", "port"]),
    ("rpc-unresolvable", [*R, "--targets", "arm", "--rpc", "notahost.invalid:9090"],
     ["notahost.invalid", "does not resolve"]),
    ("weights-nan", [*R, "--weights", "CFG/nan.pt"], ["nan.pt", "NaN/Inf", "conv1.weight"]),
    ("weights-inf-safetensors", [*R, "--weights", "CFG/inf.safetensors"],
     ["inf.safetensors", "NaN/Inf"]),
    ("cifar-truncated", [*R, "--dataset", "cifar10", "--data-root", "CFG/cifar-trunc"],
     ["data_batch_3", "truncated"]),
    ("cifar-wrong-shape", [*R, "--dataset", "cifar10", "--data-root", "CFG/cifar-shape"],
     ["test_batch", "'data'", "3072"]),
    ("cifar-no-labels", [*R, "--dataset", "cifar10", "--data-root", "CFG/cifar-nolabels"],
     ["data_batch_1", "'labels'"]),
    ("fashion-truncated", [*R, "--data-root", "CFG/fashion-trunc"],
     ["t10k-images-idx3-ubyte.gz", "truncated"]),
    ("imagenet-no-train-no-weights", [*R, "--dataset", "imagenet", "--model", "resnet18",
                                      "--data-root", "CFG/inet-val"],
     ["train/", "--weights"]),
    ("imagenet-num-classes", [*R, "--dataset", "imagenet", "--model", "resnet18", "--data-root",
                              "CFG/inet-val", "--weights", "CFG/small.pt", "--num-classes", "1000"],
     ["--num-classes 1000", "3 classes"]),
    ("imagenet-train-val-differ", [*R, "--dataset", "imagenet", "--model", "resnet18",
                                   "--data-root", "CFG/inet-mixed"], ["train", "same classes"]),
    ("image-size-not-imagenet", [*R, "--image-size", "64"], ["image_size", "imagenet"]),
    ("subset-zero", [*R, "--subset", "0"], ["must be >= 1"]),
    ("out-locked", [*R, "LOCK"], ["in use by another ternbench run", "PID"]),
]


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Path]:
    """An existing run directory with results, and a folder of bad config files."""
    out = tmp_path / "run"
    store = ResultStore(out)
    store.open_session(["ternbench"], {"x": 1})
    store.write_part("k", "accuracy", [make_row({"cell_key": "k", "method": "fp32"},
                                                metric="top1", value=90.0, unit="%")])
    store.consolidate()
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "broken.toml").write_text("[run\nmethods = 1\n")
    (cfg / "key.toml").write_text('[run]\nmethod = "fgq"\n')
    (cfg / "table.toml").write_text('[runs]\nmethods = "fgq"\n')
    (cfg / "type.toml").write_text("[run]\nseeds = 3\n")
    (cfg / "empty").mkdir()
    (cfg / "file.txt").write_text("not a run")
    import pickle

    import torch

    class Evil:
        def __reduce__(self):  # would create a file if it were ever unpickled
            return (open, (str(tmp_path / "PWNED"), "w"))

    (cfg / "evil.pt").write_bytes(pickle.dumps({"weight": Evil()}))
    torch.save({"conv.weight": torch.zeros(2, 2)}, cfg / "small.pt")
    _issue14_inputs(cfg)
    old = cfg / "oldrun"
    old.mkdir()
    (old / "run.json").write_text(json.dumps({"schema_version": 0, "run_id": "x"}))
    return out, cfg


def _issue14_inputs(cfg: Path) -> None:
    """Weights with NaN/Inf, broken CIFAR pickles, a truncated IDX, small ImageFolder trees."""
    import gzip
    import pickle
    import shutil

    import numpy as np
    import torch
    from safetensors.torch import save_file
    from ternbench.bench.models import create_model

    state = create_model("resnet8", in_chans=1, num_classes=10).state_dict()
    state["conv1.weight"] = state["conv1.weight"].clone()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, cfg / "nan.pt")
    state["conv1.weight"][0, 0, 0, 0] = float("inf")
    save_file({k: v.contiguous() for k, v in state.items()}, str(cfg / "inf.safetensors"))

    def cifar(name: str, broken: str) -> None:
        folder = cfg / name / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            entry = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
            if broken == "shape" and f == "test_batch":
                entry[b"data"] = np.zeros((4, 32, 32), np.uint8)
            if broken == "labels" and f == "data_batch_1":
                del entry[b"labels"]
            blob = pickle.dumps(entry, protocol=2)
            (folder / f).write_bytes(blob[:40] if broken == "trunc" and f == "data_batch_3"
                                     else blob)

    cifar("cifar-trunc", "trunc")
    cifar("cifar-shape", "shape")
    cifar("cifar-nolabels", "labels")
    fm = cfg / "fashion-trunc"
    fm.mkdir()
    src = Path("/usr/share/datasets/fashion-mnist")
    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-labels-idx1-ubyte.gz"):
        if (src / f).is_file():
            shutil.copyfile(src / f, fm / f)
        else:  # still a valid IDX file (the truncated one is what the case is about)
            (fm / f).write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 0])))
    (fm / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28]) + bytes(900))[:60])
    from PIL import Image

    trees = (("inet-val", {"val": "abc"}), ("inet-mixed", {"val": "ab", "train": "abd"}))
    for tree, splits in trees:
        for split, classes in splits.items():
            for c in classes:
                d = cfg / tree / split / c
                d.mkdir(parents=True)
                Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "x.png")


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(argv, words, world, capsys) -> None:
    out, cfg = world
    before = _digest(out)
    argv = [a.replace("CFG", str(cfg)) for a in argv]
    holder = None
    if "LOCK" in argv:  # another run holds --out's lock
        from test_trust import hold_lock

        argv.remove("LOCK")
        holder = hold_lock(out)
        before = _digest(out)
    if "--out" not in argv and argv[0] == "run":
        argv += ["--out", str(out)]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    err = capsys.readouterr().err
    assert code not in (0, None), err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("usage:", "  "))]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert _digest(out) == before  # the existing results are untouched
    assert not (out.parent / "PWNED").exists()  # and no payload ran


def test_table_has_at_least_30_cases() -> None:
    assert len(CASES) >= 30


def test_debug_shows_the_traceback() -> None:
    from ternbench.methods import UnknownMethodError

    with pytest.raises(UnknownMethodError):
        main(["--debug", "run", "--methods", "fgqq", "--dry-run"])
