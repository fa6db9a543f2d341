"""The main job, `fastrelu bench`, runs end to end (a short sweep) and reports what it promises;
every bad option is refused on one line, with exit status 2, before anything is timed."""
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from helpers import forbid, refused
from fastrelu import _gpu_bench, _report, _step_bench, bench, experiment
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
    assert "cost over ReLU" in res.stdout and "load average" in res.stdout
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {(r["op"], r["direction"]) for r in rows} == {
        (op, d) for op in _report.OPS for d in ("fwd", "bwd") if (op, d) != ("relu_stats", "bwd")}
    assert {r["elements"] for r in rows} == {1000, 10000}
    for r in rows:
        assert r["seconds"] > 0 and r["roofline_fraction"] > 0 and r["peers"]["numpy"] > 0
        assert r["bytes"] == (2 if r["direction"] == "fwd" else 3) * r["elements"] * 4
        assert "numpy" in r["peers_allocate"]  # the recipe allocates, set against fastrelu's
        for ratio in r["ratios"].values():
            assert 0 < ratio["q1"] <= ratio["ratio"] <= ratio["q3"]
    assert report["machine"]["simd"] in ("baseline", "avx2", "avx512")
    assert {c["op"] for c in report["cost_ratios"]} == {"leaky_relu", "prelu", "elu", "relu_stats"}
    assert all("q1" in c and "unstable" in c for c in report["cost_ratios"])
    assert report["method"]["rounds"] == 2 and len(report["load_average"]["before"]) == 3


def test_stream_size_is_several_times_the_cache():
    backend = bench.cpu_backend()
    n = backend.stream_elements(4)
    llc = _report.last_level_cache_bytes()
    memory = _report.available_memory_bytes()
    assert n == 4 * (llc or 2**25) // 4 // 1000 * 1000 or n * 4 * 11 <= memory * 0.7 + 4000


def test_stream_size_held_by_memory_is_the_same_in_two_runs():
    """Where memory holds STREAM size down, the available memory moves a little from run to run;
    the size, rounded to two significant digits, does not."""
    backend = bench.cpu_backend()
    big = dataclasses.replace(backend, cache=("L3", 480 * 2**20))
    sizes = {dataclasses.replace(big, memory=("RAM", m)).stream_elements(4)
             for m in (22.80e9, 22.85e9, 22.90e9)}
    assert len(sizes) == 1
    (n,) = sizes
    limit = dataclasses.replace(big, memory=("RAM", 22.80e9)).max_elements(4)
    assert n <= limit and n >= limit * 0.9 and str(n).rstrip("0") == str(n)[:2].rstrip("0")
    # not held by memory: 4x the cache, as before
    assert dataclasses.replace(big, memory=("RAM", 1e12)).stream_elements(4) == 4 * 480 * 2**20 \
        // 4 // 1000 * 1000


def test_samples_wait_for_other_threads_to_stop_spinning():
    """A thread pool still spinning after its work (as PyTorch's OpenMP threads do) would share
    a core with the next sample: settle() waits for it, and stops waiting for a thread that
    never stops."""
    def spin(seconds):  # in NumPy's loops, which release the GIL
        a = np.ones(200_000)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            np.sqrt(a, out=a)
    short = threading.Thread(target=spin, args=(0.01,))
    short.start()
    time.sleep(0.002)
    _report.settle()
    assert not _report._running_threads()
    short.join()
    endless = threading.Thread(target=spin, args=(2.0,))
    endless.start()
    time.sleep(0.002)
    for _ in range(_report.SETTLE_TRIES):
        start = time.perf_counter()
        _report.settle()
        assert _report.SETTLE_LIMIT <= time.perf_counter() - start < 4 * _report.SETTLE_LIMIT
    start = time.perf_counter()
    _report.settle()  # not waited for again
    assert time.perf_counter() - start < _report.SETTLE_LIMIT / 2
    endless.join()


def test_baselines_compute_the_same_thing():
    d = _report.Data(10_000, np.float32, bench.cpu_backend())
    fast, ref = _report.fastrelu_impls(d), _report.recipe_impls(d)
    for key in [("leaky_relu", "fwd"), ("elu", "bwd"), ("prelu", "fwd")]:
        result = fast[key]()
        np.testing.assert_allclose(result, ref[key](), rtol=1e-6)


# ---- bad options --------------------------------------------------------------------------------

@pytest.fixture
def no_work(monkeypatch):
    forbid(monkeypatch, (bench, "run"), (bench, "run_contention"), (_gpu_bench, "run"),
           (_report, "measure"), (_report, "Data"))


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
    (["--dtypes", "int32"], "int32 is not float16, bfloat16, float32 or float64"),
    (["--dtypes", "bool"], "bool is not float16, bfloat16, float32 or float64"),
    (["--dtypes", "complex64"], "complex64 is not float16, bfloat16"),
    (["--dtypes", "float128"], "float128 is not float16, bfloat16"),
    (["--dtypes", "float33"], "float33 is not float16, bfloat16"),
    (["--dtypes", "float32,f4"], "f4 is float32 again"),
    (["--dtypes", ""], "--dtypes: empty list"),
    (["--threads", "0"], "argument --threads: 0 is not positive"),
    (["--threads", "-2"], "argument --threads: -2 is not positive"),
    (["--threads", "two"], "argument --threads: 'two' is not a whole number"),
    (["--threads", "100000"], "--threads 100000: more than the"),
    (["--repeats", "0"], "argument --repeats: 0 is not positive"),
    (["--repeats", "2.5"], "argument --repeats: '2.5' is not a whole number"),
    (["--device", "tpu"], "argument --device: invalid choice"),
    (["--dtypes", "bfloat16,bfloat16"], "dtype bfloat16 given twice"),
    (["--contention", "--ops", "relu"], "--contention times leaky_relu on float32"),
    (["--contention", "--dtypes", "float64"], "--dtypes does not apply"),
    (["--contention", "--quick"], "--contention: --quick does not apply"),
    (["--contention", "--threads", "1"], "--contention compares several threads with one"),
    (["--contention", "--sizes", "1e5,100000"], "the same size twice"),
    (["--contention", "--sizes", "0"], "0 is not a positive whole number"),
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


def test_bfloat16_without_ml_dtypes_is_refused(capsys, no_work, monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    err = refused(capsys, ["bench", "--dtypes", "float32,bfloat16"])
    assert "bfloat16 needs ml_dtypes" in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_paths_that_permissions_allow_but_cannot_be_written_are_refused(capsys, no_work,
                                                                       tmp_path):
    """/proc refuses new files even to root; the check leaves no file behind, and a symbolic
    link (even a dangling one) as it was."""
    for option in ("--json", "--plot"):
        assert "not writable" in refused(capsys, ["bench", option, "/proc/fastrelu-r.json"])
        assert "not writable" in refused(capsys, ["experiment", option, "/proc/r.json"])
    kept = tmp_path / "kept.json"
    kept.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "target.json")
    for path in (kept, link):
        with pytest.raises(SystemExit):
            main(["bench", "--json", str(path), "--plot", str(path)])  # refused: the same file
    assert kept.read_text() == "old" and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json", "link.json"]


def test_pipes_and_devices_are_taken_and_a_failed_write_is_one_line(capsys, tmp_path):
    """A FIFO, /dev/stdout or /dev/null is written as it is (the check opens none of them, so a
    FIFO without a reader does not block it); a write that fails at the end of the run is one
    line on stderr, exit status 1."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _report.check_writable("--json", str(fifo))
    _report.check_writable("--json", "/dev/stdout")
    with pytest.raises(SystemExit) as exit_:
        _report.write_json("/dev/full", {"a": 1})
    assert exit_.value.code == "fastrelu: could not write /dev/full: No space left on device"
    _report.write_json("/dev/null", {"a": 1})
    assert "wrote /dev/null" in capsys.readouterr().out


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
    assert "--contention shares CPU cores" in refused(
        capsys, ["bench", "--device", "cuda", "--contention"])
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
                              memory=("GPU memory", 2 * 10**7))
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


# ---- how figures are measured -------------------------------------------------------------------

def fake_clock(costs):
    """A timer for measure(): each implementation's call 'takes' the seconds `costs` gives for
    the how-many-th call it is, without running anything."""
    counts = {}

    def timer(fn, calls=1):
        counts[fn] = counts.get(fn, 0) + 1
        return costs(fn, counts[fn])

    return timer


def test_ratios_are_medians_of_per_round_ratios_and_outliers_do_not_lead():
    a, b = (lambda: None), (lambda: None)
    # b is twice a; every 5th sample of a is hit by a burst of load 10x long
    timer = fake_clock(lambda fn, k: 2e-3 if fn is b else (1e-2 if k % 5 == 0 else 1e-3))
    timing = _report.Timing(rounds=11, min_rounds=3, min_time=0.0, budget=10.0, timer=timer)
    m = _report.measure({"a": a, "b": b}, {"a/b": ("a", "b")}, timing)
    assert m.rounds == 11
    assert m.ratios["a/b"]["ratio"] == pytest.approx(0.5)
    assert m.ratios["a/b"]["q1"] <= 0.5 <= m.ratios["a/b"]["q3"]


def test_unstable_groups_are_measured_again_and_marked():
    a, b = (lambda: None), (lambda: None)
    noisy = fake_clock(lambda fn, k: 1e-3 * (1 + k % 3 if fn is a else 1))  # a/b from 1 to 3
    timing = _report.Timing(rounds=6, min_rounds=6, min_time=0.0, budget=10.0, timer=noisy)
    m = _report.measure({"a": a, "b": b}, {"a/b": ("a", "b")}, timing)
    assert m.attempts == 1 + math.ceil(_report.EXTRA_ROUNDS / 6) and m.ratios["a/b"]["unstable"]
    steady = fake_clock(lambda fn, k: 1e-3)
    timing = dataclasses.replace(timing, timer=steady)
    m = _report.measure({"a": a, "b": b}, {"a/b": ("a", "b")}, timing)
    assert m.attempts == 1 and not m.ratios["a/b"]["unstable"]


def test_passes_spread_each_groups_rounds_over_the_sweep():
    """Three passes over two groups: each pass a third of every group's rounds, the groups in
    order, then in reverse, then in order; ratios over all the rounds of a group."""
    log = []
    a, b, c, d = (lambda: None), (lambda: None), (lambda: None), (lambda: None)
    names = {a: "a", b: "b", c: "c", d: "d"}

    def timer(fn, calls=1):
        log.append(names[fn])
        return {"a": 1e-3, "b": 2e-3, "c": 3e-3, "d": 1e-3}[names[fn]]

    timing = _report.Timing(rounds=6, min_rounds=6, min_time=0.0, budget=10.0, timer=timer)
    first, second = _report.measure_groups([({"a": a, "b": b}, {"a/b": ("a", "b")}),
                                            ({"c": c, "d": d}, {"c/d": ("c", "d")})],
                                           timing, passes=3)
    assert (first.rounds, first.attempts, second.rounds, second.attempts) == (6, 3, 6, 3)
    assert first.ratios["a/b"]["ratio"] == pytest.approx(0.5)
    assert second.ratios["c/d"]["ratio"] == pytest.approx(3.0)
    # calibration (the first pass only), then 2 rounds of 2 samples a group and pass
    timed = [name for name in log if name in "ab"]
    assert len(timed) == 2 + 3 * 4
    passes = "".join("x" if name in "ab" else "y" for name in log)
    assert passes == "xx" + "xxxx" + "yy" + "yyyy" + "yyyy" + "xxxx" + "xxxx" + "yyyy"


def test_sample_order_alternates_across_passes_of_one_round():
    """A round a pass: the group's order still alternates from round to round, so that drift
    within a round cancels over pairs of rounds."""
    log = []
    a, b = (lambda: None), (lambda: None)

    def timer(fn, calls=1):
        log.append("a" if fn is a else "b")
        return 1e-3

    timing = _report.Timing(rounds=4, min_rounds=4, min_time=0.0, budget=10.0, timer=timer)
    (m,) = _report.measure_groups([({"a": a, "b": b}, {"a/b": ("a", "b")})], timing, passes=4)
    assert m.rounds == 4 and "".join(log[2:]) == "ab" "ba" "ab" "ba"


def test_no_more_passes_than_rounds():
    timing = _report.Timing(rounds=2, min_rounds=1, min_time=0.0, budget=10.0,
                            timer=lambda fn, calls=1: 1e-3)
    (m,) = _report.measure_groups([({"a": lambda: None}, {})], timing, passes=15)
    assert (m.rounds, m.attempts) == (2, 2)


def test_sizes_that_fit_together_are_measured_together():
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    per_element = _report.LIVE_ARRAYS / _report.MEMORY_SHARE
    roomy = types.SimpleNamespace(memory=("memory", 10**6 * 4 * per_element))
    sizes = [(1000, f32), (10**5, f32), (800_000, f32), (500_000, f64)]
    assert _report.memory_batches(sizes, roomy) == [sizes[:3], sizes[3:]]
    unknown = types.SimpleNamespace(memory=("memory", None))
    assert _report.memory_batches(sizes, unknown) == [[s] for s in sizes]


def test_slow_groups_get_fewer_rounds():
    def slow(fn, calls=1):
        time.sleep(0.01)
        return 0.01

    timing = _report.Timing(rounds=15, min_rounds=3, min_time=0.0, budget=0.05, timer=slow)
    assert 3 <= _report.measure({"a": lambda: None}, {}, timing).rounds < 15


def test_peers_are_set_against_fastrelu_of_the_same_kind():
    pytest.importorskip("torch")  # part of the test extra
    d = _report.Data(1000, np.float32, bench.cpu_backend())
    impls = _report.implementations(d, _report.OPS, ["torch"])
    groups = dict(pair for _, pairs in _report.row_groups(impls, "prelu", "fwd", "numpy")
                  for pair in pairs.items())
    assert groups["numpy"] == (("numpy", "prelu", "fwd"), ("fastrelu-alloc", "prelu", "fwd"))
    assert groups["torch"] == (("torch", "prelu", "fwd"), ("fastrelu-alloc", "prelu", "fwd"))
    assert groups["relu"] == (("fastrelu", "prelu", "fwd"), ("fastrelu", "relu", "fwd"))
    assert groups["copy"] == (("copy", "copy", "fwd"), ("fastrelu", "prelu", "fwd"))
    leaky = dict(pair for _, pairs in _report.row_groups(impls, "leaky_relu", "fwd", "numpy")
                 for pair in pairs.items())
    assert leaky["torch"][1] == ("fastrelu", "leaky_relu", "fwd")


def test_the_copy_moves_the_ops_bytes_through_the_same_buffers():
    d = _report.Data(1000, np.float32, bench.cpu_backend())
    copies = _report.copy_impls(d)
    copies[("copy", "fwd")]()
    np.testing.assert_array_equal(d.out, d.x)
    copies[("copy", "bwd")]()
    assert d.copy_dst.size == 1500 and np.shares_memory(d.copy_dst, d.out)


def test_value_cases():
    rng = np.random.default_rng(0)
    tiny = np.finfo(np.float32).tiny
    assert (_report.input_values("positive", 100, np.dtype(np.float32), rng) >= 0).all()
    assert (_report.input_values("negative", 100, np.dtype(np.float32), rng) <= 0).all()
    sub = _report.input_values("subnormal", 100, np.dtype(np.float32), rng)
    assert (sub <= -tiny).all() and (np.abs(sub * np.float32(0.25)) < tiny).all()


# ---- what the full report adds ------------------------------------------------------------------

FAST = _report.Timing(rounds=1, min_rounds=1, min_time=0.0, budget=0.0)


def test_value_sweep_layouts_and_training_steps(monkeypatch):
    monkeypatch.setattr(bench, "VALUE_SWEEP_SIZE", 1000)
    progress = _report.Progress(100, stream=open(os.devnull, "w"))
    values = bench.value_sweep(("relu", "leaky_relu"), np.dtype(np.float32),
                               bench.cpu_backend(), FAST, progress)
    assert {(r["op"], r["case"]) for r in values["rows"]} == {
        (op, case) for op in ("relu", "leaky_relu") for case in _report.VALUE_CASES}
    assert {s["op"] for s in values["subnormal"]["slowdowns"]} == {"leaky_relu"}
    assert isinstance(values["subnormal"]["penalty"], bool)
    layouts = bench.layout_comparison([2 * 64 * 16 * 16], bench.cpu_backend(), FAST, progress)
    assert layouts[0]["shape"] == (2, 64, 16, 16)
    assert set(layouts[0]["ratios"]) == {f"{op} {d}" for op in bench.LAYOUT_OPS
                                         for d in ("fwd", "bwd")}
    (mlp,) = _step_bench.training_steps({}, FAST)
    assert set(mlp["seconds"]) == set(experiment.ACTIVATIONS)
    assert set(mlp["ratios"]) == set(experiment.ACTIVATIONS) - {"relu"}


def test_cnn_steps_train():
    torch = pytest.importorskip("torch")
    steps = _step_bench.cnn_steps()
    assert set(steps) == {"relu", "leaky_relu", "prelu", "elu", "prelu, leaky_relu"}
    weights = [p.detach().clone() for p in steps["prelu"].__defaults__[0].parameters()]
    steps["prelu"]()
    after = list(steps["prelu"].__defaults__[0].parameters())
    assert all(not torch.equal(w, p) for w, p in zip(weights, after))


def test_channels_last_data_is_a_permuted_dense_buffer():
    d = bench.layout_data((2, 64, 16, 16), channels_last=True)
    assert d.x.shape == (2, 64, 16, 16) and d.x.strides[1] == 4
    assert d.x.transpose(0, 2, 3, 1).flags.c_contiguous


def test_bfloat16_report(tmp_path):
    pytest.importorskip("ml_dtypes")
    out = tmp_path / "r.json"
    assert main(["bench", "--quick", "--sizes", "1000", "--dtypes", "bfloat16", "--repeats", "1",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["dtype"] for r in rows} == {"bfloat16"}
    assert all(r["bytes"] == (2 if r["direction"] == "fwd" else 3) * 1000 * 2 for r in rows)
    assert all("numexpr" not in r["peers"] for r in rows)  # numexpr has no bfloat16


def test_busy_core_is_killed_on_an_exception():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    with pytest.raises(KeyboardInterrupt):
        with bench.busy_core():
            spinner = live_children()
            assert spinner
            raise KeyboardInterrupt
    assert not set(live_children()) & set(spinner)


def live_children():
    """The pids of this process's live (not zombie) children, from /proc."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            pids.append(int(pid))
    return pids


@pytest.mark.slow
def test_contention_report(tmp_path, capsys):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    out = tmp_path / "c.json"
    assert main(["bench", "--contention", "--sizes", "1e5", "--threads", "2", "--repeats", "2",
                 "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["contention"]
    assert {"fastrelu 2 threads", "fastrelu 1 thread"} <= set(result["variants"])
    assert all(v["p90"] >= v["median"] > 0 for v in result["variants"].values())
    assert "p90 / 1-thread median" in capsys.readouterr().out
