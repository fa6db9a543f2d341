"""Threads, SIMD levels, fork safety, import cost, and indexing past 2^31 elements."""
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastrelu
from helpers import assert_bitwise
from fastrelu import reference


def run_python(code, env=None, timeout=120):
    full_env = dict(os.environ)
    full_env.update(env or {})
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, env=full_env, timeout=timeout)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.fixture
def threads():
    before = fastrelu.get_num_threads()
    yield
    fastrelu.set_num_threads(before)


def test_results_do_not_depend_on_thread_count(threads):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 33, 1500)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.random(33).astype(np.float32)
    results = []
    for n in (1, 2, 3):
        fastrelu.set_num_threads(n)
        assert fastrelu.get_num_threads() == n
        results.append((fastrelu.leaky_relu(x), fastrelu.elu_backward(g, x),
                        *fastrelu.prelu_backward(g, x, w)))
    for other in results[1:]:
        for a, b in zip(results[0][:3], other[:3]):
            assert_bitwise(a, b)
        np.testing.assert_allclose(results[0][3], other[3], rtol=1e-6)


def test_concurrent_calls_share_inputs_safely():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 40000)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.random(16).astype(np.float32)
    expected = reference.prelu_backward(g, x, w, 0)
    errors = []

    def work():
        try:
            for _ in range(5):
                dx, dw = fastrelu.prelu_backward(g, x, w, 0)
                assert_bitwise(dx, expected[0])
                np.testing.assert_allclose(dw, expected[1], rtol=1e-6)
                assert_bitwise(fastrelu.relu(x), reference.relu(x))
        except Exception as exc:  # reported below, in the main thread
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(8)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors, errors[0]


def test_kernels_release_the_gil():
    # a Python thread keeps counting while a long kernel runs in another thread
    x = np.random.default_rng(2).standard_normal(2**25).astype(np.float32)
    ticks = []
    done = threading.Event()

    def count():
        while not done.is_set():
            ticks.append(1)

    counter = threading.Thread(target=count)
    counter.start()
    try:
        for _ in range(5):
            before = len(ticks)
            fastrelu.elu(x)
            if len(ticks) > before:
                break
    finally:
        done.set()
        counter.join()
    assert len(ticks) > before


def test_thread_count_from_the_environment():
    code = "import fastrelu; print(fastrelu.get_num_threads())"
    assert run_python(code, {"FASTRELU_NUM_THREADS": "3"}) == "3"
    assert run_python(code, {"OMP_NUM_THREADS": "1", "FASTRELU_NUM_THREADS": ""}) == "1"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "FASTRELU_NUM_THREADS": "zero"})
    assert res.returncode != 0 and "FASTRELU_NUM_THREADS must be a positive integer" in res.stderr


def test_threadpoolctl_limits_are_obeyed(threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    fastrelu.relu(np.zeros(1))  # the OpenMP runtime is loaded with the extension
    default = fastrelu.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1):
        assert fastrelu.get_num_threads() == 1
    assert fastrelu.get_num_threads() == default
    fastrelu.set_num_threads(5)
    with threadpoolctl.threadpool_limits(limits=1):
        assert fastrelu.get_num_threads() == 1
    assert fastrelu.get_num_threads() == 5


def test_fork_after_threaded_kernel_does_not_hang():
    code = """
        import multiprocessing as mp
        import numpy as np
        import fastrelu

        def child(_):
            x = np.linspace(-1, 1, 1 << 20, dtype=np.float32)
            return float(fastrelu.relu(x).sum())

        if __name__ == "__main__":
            fastrelu.set_num_threads(2)
            x = np.linspace(-1, 1, 1 << 20, dtype=np.float32)
            expected = float(fastrelu.relu(x).sum())  # starts the worker threads in the parent
            with mp.get_context("fork").Pool(2) as pool:
                results = pool.map(child, range(4))
            assert results == [expected] * 4, (results, expected)
            print("ok")
    """
    assert run_python(code, timeout=60) == "ok"


# Defines worker_threads() in a child process: fastrelu's pool threads (named "fastrelu"), or with
# status=True their /proc status fields.
WORKER_THREADS = """
import os
def worker_threads(status=False):
    found = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/status") as f:
            fields = dict(line.rstrip("\\n").split(":\\t", 1) for line in f if ":\\t" in line)
        if fields["Name"] == "fastrelu":
            found.append(fields)
    return found if status else len(found)
"""


def test_workers_are_started_as_needed_and_no_more():
    # the pool grows to the thread count of the largest call: set_num_threads(1) starts none,
    # 3 threads start two workers beside the caller, and calls below the serial threshold none
    code = """
        import numpy as np, fastrelu
        x = -np.ones(1 << 20, np.float32)
        fastrelu.set_num_threads(1)
        fastrelu.relu(x)
        one = worker_threads()
        fastrelu.set_num_threads(3)
        fastrelu.relu(x[:1000])
        small = worker_threads()
        fastrelu.leaky_relu(x, 0.5)
        three = worker_threads()
        fastrelu.leaky_relu(x, 0.5)
        again = worker_threads()
        print(one, small, three, again)
    """
    assert run_python(WORKER_THREADS + textwrap.dedent(code), {"OMP_NUM_THREADS": "1"}) == "0 0 2 2"


def test_the_pool_starts_afresh_in_a_forked_child_even_mid_call():
    # a fork while another thread is inside a threaded kernel: the child's pool (whose lock that
    # thread held) must work, on threads of its own, and compute correctly
    code = """
        import os, threading, numpy as np, fastrelu
        fastrelu.set_num_threads(2)
        x = np.linspace(-1, 1, 1 << 22, dtype=np.float32)
        expected = fastrelu.leaky_relu(x, 0.25)
        stop = threading.Event()
        def busy():
            while not stop.is_set():
                fastrelu.leaky_relu(x, 0.25)
        t = threading.Thread(target=busy)
        t.start()
        statuses = []
        for _ in range(20):
            pid = os.fork()
            if pid == 0:
                before = worker_threads()
                ok = np.array_equal(fastrelu.leaky_relu(x, 0.25), expected)
                os._exit(0 if ok and before == 0 and worker_threads() == 1 else 1)
            statuses.append(os.waitpid(pid, 0)[1])
        stop.set()
        t.join()
        print(statuses == [0] * 20)
    """
    assert run_python(WORKER_THREADS + textwrap.dedent(code), timeout=120) == "True"


def test_sums_do_not_depend_on_which_thread_ran_what(threads):
    # partial sums are per chunk and added in chunk order, so a call gives the same bits whether
    # its chunks ran on the pool or (the pool being busy with another call) all on its caller
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4000, 100)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.random(100).astype(np.float32)
    fastrelu.set_num_threads(2)
    expected = fastrelu.prelu_backward(g, x, w, 1)[1]
    counts = fastrelu.relu(x, stats=True)[1]
    results = []

    def work():
        for _ in range(20):
            results.append((fastrelu.prelu_backward(g, x, w, 1)[1],
                            fastrelu.relu(x, stats=True)[1]))

    workers = [threading.Thread(target=work) for _ in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert len(results) == 80
    for dw, c in results:
        assert_bitwise(dw, expected)
        np.testing.assert_array_equal(c.positive, counts.positive)


def test_worker_threads_leave_signals_to_the_interpreter():
    code = """
        import numpy as np, fastrelu
        fastrelu.set_num_threads(2)
        fastrelu.relu(np.ones(1 << 20, np.float32))
        masks = [int(status["SigBlk"], 16) for status in worker_threads(status=True)]
        print([bool(mask & (1 << 1)) for mask in masks])  # SIGINT is signal 2
    """
    assert run_python(WORKER_THREADS + textwrap.dedent(code)) == "[True]"


SIMD_CHECK = """
    import json
    import numpy as np
    import fastrelu
    from fastrelu import reference
    ok = True
    rng = np.random.default_rng(0)
    for dt in (np.float16, np.float32, np.float64):
        for n in (5, 15, 17, 63, 1000, 70001):
            x = (rng.standard_normal(n) * 3).astype(dt)
            x[:4] = [np.nan, -0.0, np.inf, -np.inf]
            g = rng.standard_normal(n).astype(dt)
            pairs = [
                (fastrelu.relu(x), reference.relu(x)),
                (fastrelu.leaky_relu(x, 0.2), reference.leaky_relu(x, 0.2)),
                (fastrelu.relu_backward(g, x), reference.relu_backward(g, x)),
                (fastrelu.leaky_relu_backward(g, x, 0.2), reference.leaky_relu_backward(g, x, 0.2)),
            ]
            x2 = x[: n // 5 * 5].reshape(-1, 5)
            w = np.linspace(-1, 1, 5).astype(dt)
            pairs.append((fastrelu.prelu(x2, w, -1), reference.prelu(x2, w, -1)))
            pairs.append((fastrelu.prelu_backward(g[: x2.size].reshape(x2.shape), x2, w, -1)[0],
                          reference.prelu_backward(g[: x2.size].reshape(x2.shape), x2, w, -1)[0]))
            for a, b in pairs:
                nan = np.isnan(b)
                ok &= bool((np.isnan(a) == nan).all()) and a.tobytes() == np.where(nan, a, b).tobytes()
            e, re = fastrelu.elu(x), reference.elu(x)
            ok &= bool(np.allclose(e, re, rtol=4e-3 if dt == np.float16 else 1e-6, equal_nan=True))
    import hashlib
    digest = hashlib.sha256()
    for dt in (np.float16, np.float32, np.float64):
        x = np.linspace(-120, 5, 100_003).astype(dt)
        digest.update(fastrelu.elu(x, 0.7).tobytes())
        digest.update(fastrelu.elu_backward(np.ones_like(x), x, 0.7).tobytes())
    print(json.dumps({"simd": fastrelu.info()["simd"], "ok": ok, "elu": digest.hexdigest()}))
"""


@pytest.mark.slow
def test_every_simd_level():
    """Each level agrees with the reference, and all give bit-identical ELU results (the same
    IEEE operations in the same order, with no fused multiply-add)."""
    supported = ["baseline"] + [lvl for lvl in ("avx2", "avx512") if lvl in _cpu_levels()]
    digests = set()
    for level in ["baseline", "avx2", "avx512"]:
        result = json.loads(run_python(SIMD_CHECK, {"FASTRELU_SIMD": level}))
        assert result["ok"], level
        assert result["simd"] == (level if level in supported else supported[-1])
        digests.add(result["elu"])
    assert len(digests) == 1


def _cpu_levels():
    flags = open("/proc/cpuinfo").read().split()
    levels = []
    if {"avx2", "fma", "f16c"} <= set(flags):
        levels.append("avx2")
        if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= set(flags):
            levels.append("avx512")
    return levels


def test_bad_simd_setting():
    res = subprocess.run([sys.executable, "-c", "import fastrelu"], capture_output=True,
                         text=True, env={**os.environ, "FASTRELU_SIMD": "sse9"})
    assert res.returncode != 0 and "FASTRELU_SIMD must be one of" in res.stderr


def test_import_is_light():
    code = """
        import sys, time
        t = time.perf_counter()
        import fastrelu
        elapsed = time.perf_counter() - t
        heavy = [m for m in ("numba", "torch", "matplotlib", "cupy", "scipy") if m in sys.modules]
        print(heavy, elapsed)
    """
    heavy, elapsed = run_python(code).rsplit(" ", 1)
    assert heavy == "[]"


def test_info_reports_the_machine():
    info = fastrelu.info()
    assert info["simd"] in ("baseline", "avx2", "avx512")
    assert info["threads"] == fastrelu.get_num_threads() >= 1
    assert info["fastrelu"] == fastrelu.__version__
    assert "available" in info["gpu"]
    out = subprocess.run([sys.executable, "-m", "fastrelu", "info"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "simd" in out.stdout


def _free_memory_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


@pytest.mark.slow
@pytest.mark.skipif(_free_memory_gib() < 14, reason="needs about 12 GiB of free memory")
def test_more_than_2_to_the_31_elements():
    n = 2**31 + 1000
    x = np.zeros(n, np.float16)  # 4 GiB, in place
    x[-3:] = [-2.0, 3.0, -0.5]
    x[2**31 - 1: 2**31 + 1] = [-4.0, 5.0]
    fastrelu.leaky_relu(x, 0.5, out=x)
    assert x[-3:].tolist() == [-1.0, 3.0, -0.25]
    assert x[2**31 - 1: 2**31 + 1].tolist() == [-2.0, 5.0]
    _, dw = fastrelu.prelu_backward(x, x, np.float16(0.5))
    # x * grad with grad = x over the elements not > 0: (-1)^2 + (-0.25)^2 + (-2)^2
    assert dw == np.float16(5.0625)
    del x


def test_openmp_thread_limit_is_obeyed_and_covers_every_element():
    # OMP_THREAD_LIMIT=1 caps the threads although two are asked for: no part of the data may be
    # skipped
    code = """
        import numpy as np, fastrelu
        fastrelu.set_num_threads(2)
        x = -np.ones(1 << 20, np.float32)
        y = fastrelu.relu(x)
        dx, dw = fastrelu.prelu_backward(np.ones_like(x), x, np.float32(0.5))
        print(int((y == 0).sum()), float(dw))
    """
    out = run_python(code, {"OMP_THREAD_LIMIT": "1"})
    assert out == f"{1 << 20} {-float(1 << 20)}"


def test_thread_counts_are_capped_and_never_crash():
    code = """
        import os, warnings, numpy as np, fastrelu
        cap = fastrelu.info()["thread_cap"]
        assert cap == min(4 * os.cpu_count(), cap) and cap >= 1, cap
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fastrelu.set_num_threads(10**6)
        assert any("at most" in str(w.message) for w in caught), caught
        x = -np.ones(1 << 21, np.float32)
        y = fastrelu.relu(x)
        dx, dw = fastrelu.prelu_backward(np.ones_like(x), x, np.float32(0.5))
        print(fastrelu.get_num_threads() == cap, int((y == 0).sum()), float(dw))
    """
    assert run_python(code) == f"True {1 << 21} {-float(1 << 21)}"


@pytest.mark.parametrize("env", [{"OMP_NUM_THREADS": "100000"},
                                 {"FASTRELU_NUM_THREADS": str(10**30)},
                                 {"FASTRELU_NUM_THREADS": "9" * 5000}])
def test_absurd_thread_counts_from_the_environment_are_capped(env):
    code = """
        import numpy as np, fastrelu
        x = -np.ones(1 << 21, np.float32)
        y = fastrelu.leaky_relu(x, 0.5)
        print(fastrelu.get_num_threads() <= fastrelu.info()["thread_cap"], float(y.sum()))
    """
    full_env = {**os.environ, **env}
    res = subprocess.run([sys.executable, "-W", "always", "-c", textwrap.dedent(code)],
                         capture_output=True, text=True, env=full_env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", str(-float(1 << 20))]
    assert "Traceback" not in res.stderr and "OverflowError" not in res.stderr
    if "FASTRELU_NUM_THREADS" in env or "FASTRELU_NUM_THREADS" not in full_env:
        assert f"{next(iter(env))} asked for" in res.stderr


@pytest.mark.parametrize("value", ["1e5", "-3", "0", "two", "3.0"])
def test_malformed_thread_count_in_the_environment_is_a_clear_error(value):
    res = subprocess.run([sys.executable, "-c", "import fastrelu"], capture_output=True,
                         text=True, env={**os.environ, "FASTRELU_NUM_THREADS": value})
    assert res.returncode != 0
    assert "FASTRELU_NUM_THREADS must be a positive integer" in res.stderr.splitlines()[-1]


def test_threadpoolctl_limit_equal_to_the_default_overrides_set_num_threads():
    pytest.importorskip("threadpoolctl")
    code = """
        import threading, numpy as np, fastrelu, threadpoolctl
        fastrelu.relu(np.zeros(1))
        default = fastrelu.get_num_threads()
        fastrelu.set_num_threads(1)
        with threadpoolctl.threadpool_limits(limits=default, user_api="openmp"):
            inside = fastrelu.get_num_threads()
        after = fastrelu.get_num_threads()
        seen = []  # another thread follows set_num_threads too
        t = threading.Thread(target=lambda: seen.append(fastrelu.get_num_threads()))
        t.start(); t.join()
        print(default, inside, after, seen[0])
    """
    assert run_python(code, {"OMP_NUM_THREADS": "3"}) == "3 3 1 1"


def test_a_clone_without_its_compiled_extension_says_what_to_do(tmp_path):
    import shutil

    package = os.path.dirname(fastrelu.__file__)
    shutil.copytree(package, tmp_path / "fastrelu",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    # -S: without site-packages, as a regular (not editable) install sees the clone's tree
    res = subprocess.run([sys.executable, "-S", "-c", "import fastrelu"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=60)
    assert res.returncode != 0
    message = res.stderr.strip().splitlines()[-1]
    assert "compiled extension (fastrelu._cpu) for this Python is missing" in message
    assert "pip install -e ." in message and "circular import" not in message
