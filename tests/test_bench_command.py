"""The main job, `fastrelu bench`, runs end to end (a short sweep) and reports what it promises."""
import json
import subprocess
import sys

import numpy as np

from fastrelu import bench


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
        (op, d) for op in bench.OPS for d in ("fwd", "bwd") if (op, d) != ("relu_stats", "bwd")}
    assert {r["elements"] for r in rows} == {1000, 10000}
    for r in rows:
        assert r["seconds"] > 0 and r["roofline_fraction"] > 0 and r["peers"]["numpy"] > 0
        assert r["bytes"] == (2 if r["direction"] == "fwd" else 3) * r["elements"] * 4
    assert report["machine"]["simd"] in ("baseline", "avx2", "avx512")
    assert {c["op"] for c in report["cost_ratios"]} == {"leaky_relu", "prelu", "elu", "relu_stats"}


def test_bad_options_are_reported():
    res = subprocess.run([sys.executable, "-m", "fastrelu", "bench", "--ops", "gelu"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "unknown op" in res.stderr
    res = subprocess.run([sys.executable, "-m", "fastrelu", "bench", "--sizes", "1234"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "multiples of 1000" in res.stderr


def test_stream_size_is_several_times_the_cache():
    n = bench.stream_elements(4)
    llc = bench.last_level_cache_bytes()
    assert n >= 2**26 // 1000 * 1000 or n * 4 * 11 <= bench.available_memory_bytes()
    if llc and n * 4 < 4 * llc:
        # only when memory, not the rule, limited it
        assert n * 4 * 11 <= bench.available_memory_bytes() * 0.7 + 4000


def test_baselines_compute_the_same_thing():
    d = bench.Data(10_000, np.float32)
    fast, ref = bench.fastrelu_impls(d), bench.numpy_impls(d)
    for key in [("leaky_relu", "fwd"), ("elu", "bwd"), ("prelu", "fwd")]:
        result = fast[key]()
        np.testing.assert_allclose(result, ref[key](), rtol=1e-6)
