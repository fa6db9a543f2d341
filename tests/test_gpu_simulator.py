"""Where there is no GPU (CI): the GPU test file under numba's CUDA simulator (tests/test_gpu_sass.py
compiles every kernel for a Hopper GPU: the simulator runs kernels as Python, without type
checks)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")


@pytest.mark.slow
def test_gpu_tests_pass_under_the_simulator():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.join(os.path.dirname(__file__), "test_gpu.py")],
                         capture_output=True, text=True, env=env, timeout=900)
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in summary and " failed" not in summary, summary


def test_import_fastrelu_does_not_import_numba():
    code = "import sys, fastrelu; fastrelu.relu([1.0]); print('numba' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.stdout.strip() == "False"


def test_info_reports_the_gpu_backend_without_loading_it():
    code = ("import json, sys, fastrelu; print(json.dumps(fastrelu.info()['gpu'])); "
            "print('numba' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    state, loaded = res.stdout.strip().splitlines()
    assert json.loads(state)["loaded"] is False and loaded == "False"
