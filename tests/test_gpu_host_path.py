"""bench/gpu_host_path.py runs the GPU backend's real launch path without a GPU (stand-ins for
the driver) and reports every op."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")
SCRIPT = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_host_path.py")


def test_host_path_runs_on_stand_ins_for_every_op():
    res = subprocess.run([sys.executable, SCRIPT, "--calls", "20"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]]
            for line in res.stdout.splitlines()[2:]}
    assert set(rows) == {"relu", "leaky_relu", "relu_backward", "prelu", "prelu_backward",
                         "relu+stats"}
    for total, *parts in rows.values():
        assert total > 0 and all(p > 0 for p in parts)
