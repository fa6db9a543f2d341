"""The main job, `fastrelu bench`, runs end to end (a short sweep) and reports what it promises;
every bad option is refused on one line, with exit status 2, before anything is timed."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import forbid, refused
from fastrelu import _gpu_bench, _report, bench
from fastrelu.__main__ import main


def test_quick_report_runs_and_writes_json(tmp_path):
    out = tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, "-m", "fastrelu", "bench", "--quick", "--sizes", "1e3,1e4",
         "--repeats", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "x copy" in res.stdout and "vs numpy" in res.stdout
    assert "cost over ReLU" in res.stdout
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {(r["op"], r["direction"]) for r in rows} == {
        (op, d) for op in _report.OPS for d in ("fwd", "bwd") if (op, d) != ("relu_stats", "bwd")}
    assert {r["elements"] for r in rows} == {1000, 10000}
    for r in rows:
        assert r["seconds"] > 0 and r["roofline_fraction"] > 0 and r["peers"]["numpy"] > 0
        assert r["bytes"] == (2 if r["direction"] == "fwd" else 3) * r["elements"] * 4
    assert report["machine"]["simd"] in ("baseline", "avx2", "avx512")
    assert {c["op"] for c in report["cost_ratios"]} == {"leaky_relu", "prelu", "elu", "relu_stats"}


def test_stream_size_is_several_times_the_cache():
    backend = bench.cpu_backend()
    n = backend.stream_elements(4)
    llc = _report.last_level_cache_bytes()
    memory = _report.available_memory_bytes()
    assert n >= 2**26 // 1000 * 1000 or n * 4 * 11 <= memory
    if llc and n * 4 < 4 * llc:
        # only when memory, not the rule, limited it
        assert n * 4 * 11 <= memory * 0.7 + 4000


def test_baselines_compute_the_same_thing():
    d = _report.Data(10_000, np.float32, bench.cpu_backend())
    fast, ref = _report.fastrelu_impls(d), _report.recipe_impls(d)
    for key in [("leaky_relu", "fwd"), ("elu", "bwd"), ("prelu", "fwd")]:
        result = fast[key]()
        np.testing.assert_allclose(result, ref[key](), rtol=1e-6)


# ---- bad options --------------------------------------------------------------------------------

@pytest.fixture
def no_work(monkeypatch):
    forbid(monkeypatch, (bench, "run"), (_gpu_bench, "run"), (_report, "time_side_by_side"),
           (_report, "Data"))


@pytest.mark.parametrize("args, message", [
    (["--sizes", "0"], "0 is not a positive whole number"),
    (["--sizes", "-5"], "-5 is not a positive whole number"),
    (["--sizes", "1e400"], "1e400 is not a positive whole number"),
    (["--sizes", "nan"], "nan is not a positive whole number"),
    (["--sizes", "inf"], "inf is not a positive whole number"),
    (["--sizes", "2.5e2"], "2.5e2 is not a multiple of 100"),
    (["--sizes", "1000.5"], "1000.5 is not a positive whole number"),
    (["--sizes", "many"], "'many' is neither a number of elements nor 'stream'"),
    (["--sizes", "1e3,,1e5"], "empty entry in '1e3,,1e5'"),
    (["--sizes", ""], "--sizes: empty list"),
    (["--sizes", "1e3,1e3"], "size 1e3 given twice"),
    (["--sizes", "1e3,1000"], "1e3 and 1000 are the same size"),
    (["--sizes", "1e20"], "1e20 elements of float32 do not fit"),
    (["--sizes", "1234"], "1234 is not a multiple of 100, which prelu and relu_stats need"),
    (["--sizes", "1234", "--ops", "relu,prelu"], "1234 is not a multiple of 100, which prelu"),
    (["--ops", "gelu"], "unknown op 'gelu'; choose from relu, leaky_relu"),
    (["--ops", "relu,,elu"], "--ops: empty entry"),
    (["--ops", "relu,relu"], "op relu given twice"),
    (["--ops", ""], "--ops: empty list"),
    (["--dtypes", "int32"], "int32 is not float16, float32 or float64"),
    (["--dtypes", "bool"], "bool is not float16, float32 or float64"),
    (["--dtypes", "complex64"], "complex64 is not float16, float32 or float64"),
    (["--dtypes", "float128"], "float128 is not float16, float32 or float64"),
    (["--dtypes", "float33"], "float33 is not float16, float32 or float64"),
    (["--dtypes", "float32,f4"], "f4 is float32 again"),
    (["--dtypes", ""], "--dtypes: empty list"),
    (["--threads", "0"], "argument --threads: 0 is not positive"),
    (["--threads", "-2"], "argument --threads: -2 is not positive"),
    (["--threads", "two"], "argument --threads: 'two' is not a whole number"),
    (["--threads", "100000"], "--threads 100000: more than the"),
    (["--repeats", "0"], "argument --repeats: 0 is not positive"),
    (["--repeats", "2.5"], "argument --repeats: '2.5' is not a whole number"),
    (["--device", "tpu"], "argument --device: invalid choice"),
    (["--unknown"], "unrecognized arguments: --unknown"),
])
def test_bad_options_are_refused_before_any_work(capsys, no_work, tmp_path, args, message):
    out = tmp_path / "report.json"
    err = refused(capsys, ["bench", *args, "--json", str(out)])
    assert message in err
    assert not out.exists()


def test_bad_output_paths_are_refused_before_any_work(capsys, no_work, tmp_path):
    assert "folder" in refused(capsys, ["bench", "--json", str(tmp_path / "no" / "r.json")])
    assert "is a folder, not a file" in refused(capsys, ["bench", "--json", str(tmp_path)])
    assert "empty path" in refused(capsys, ["bench", "--plot", ""])
    same = str(tmp_path / "r")
    assert "name the same file" in refused(capsys, ["bench", "--json", same, "--plot", same])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_is_refused(capsys, no_work, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "not writable" in refused(capsys, ["bench", "--json", str(locked / "r.json")])


def test_plot_without_matplotlib_is_refused_up_front(capsys, no_work, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    out = tmp_path / "r.png"
    assert "--plot needs matplotlib" in refused(capsys, ["bench", "--plot", str(out)])
    assert not out.exists()


def test_gpu_report_options_are_checked(capsys, no_work, monkeypatch):
    assert "--threads sets CPU threads" in refused(
        capsys, ["bench", "--device", "cuda", "--threads", "2"])
    assert "1234 is not a multiple of 100" in refused(
        capsys, ["bench", "--device", "cuda", "--sizes", "1234"])
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert "CuPy is required for --device cuda" in refused(capsys, ["bench", "--device", "cuda"])


def test_no_traceback_reaches_the_terminal(tmp_path):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    for args in (["--sizes", "1e400"], ["--dtypes", "int32"], ["--threads", "0"],
                 ["--json", str(tmp_path / "no" / "r.json")], ["--device", "cuda"]):
        res = subprocess.run([sys.executable, "-m", "fastrelu", "bench", *args],
                             capture_output=True, text=True, timeout=60, env=env)
        assert res.returncode == 2 and res.stdout == "", (args, res.stderr)
        assert res.stderr.count("\n") == 1 and "fastrelu bench: error: " in res.stderr, res.stderr
    if importlib.util.find_spec("cupy") is None:
        assert "CuPy is required for --device cuda" in res.stderr


def test_faults_in_the_checks_keep_their_traceback(monkeypatch):
    def fault(args):
        raise ValueError("a fault, not a bad option")

    monkeypatch.setattr(bench, "prepare", fault)
    with pytest.raises(ValueError, match="a fault"):
        main(["bench"])


# ---- what good options give ---------------------------------------------------------------------

def test_any_size_without_prelu_and_every_dtype(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "--sizes", "1234,5", "--ops", "relu,elu", "--dtypes",
                 "float32,float64", "--repeats", "1", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["elements"], r["dtype"], r["op"]) for r in rows} == {
        (n, dt, op) for n in (1234, 5) for dt in ("float32", "float64") for op in ("relu", "elu")}
    assert "float64, 1,234 elements" in capsys.readouterr().out


def stand_in_gpu(monkeypatch):
    """The GPU report's backend with NumPy arrays, the CPU clock and a small memory: the report
    runs as it would on a GPU, but for where the arrays live and what times them."""
    backend = _report.Backend(xp=np, copy=lambda src, dst: np.copyto(dst, src),
                              timer=_report.timed, torch_device="cpu", cache=("L2 cache", 2**16),
                              memory=("GPU memory", 2 * 10**7), first_call_compiles=True)
    state = {"device": "stand-in", "numba": "-"}
    monkeypatch.setattr(_gpu_bench, "cuda_backend", lambda: (backend, state, {}))
    return backend


def test_gpu_report_takes_every_option(tmp_path, capsys, monkeypatch):
    backend = stand_in_gpu(monkeypatch)
    out = tmp_path / "r.json"
    assert main(["bench", "--device", "cuda", "--sizes", "150,stream", "--ops",
                 "relu,leaky_relu", "--dtypes", "float16,float32", "--repeats", "1", "--quick",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    stream = {dt: backend.stream_elements(np.dtype(dt).itemsize) for dt in ("float16", "float32")}
    assert 0 < stream["float32"] < 2**26  # held to the stand-in's memory
    assert {(r["elements"], r["dtype"], r["op"]) for r in report["rows"]} == {
        (n, dt, op) for dt in stream for n in (150, stream[dt]) for op in ("relu", "leaky_relu")}
    assert all(r["peers"]["numpy"] > 0 for r in report["rows"])
    text = capsys.readouterr().out
    assert "fastrelu GPU on stand-in" in text and "launch overhead" in text
    assert "--threads" in refused(capsys, ["bench", "--device", "cuda", "--threads", "1"])


def test_gpu_report_plots(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    stand_in_gpu(monkeypatch)
    out = tmp_path / "r.png"
    assert main(["bench", "--device", "cuda", "--sizes", "100,1000", "--ops", "relu",
                 "--repeats", "1", "--quick", "--plot", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
