#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and numba-cuda, CuPy and/or PyTorch installed: builds fastrelu in
# place, runs the GPU tests for real (CuPy/PyTorch interop, streams, large arrays included) and the
# GPU benchmark report, and writes both to OUTDIR (default bench/results).
#   bash bench/run_gpu.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
mkdir -p "$out"
python3 -m pip install --no-build-isolation --no-deps -e . >/dev/null
python3 -c "import fastrelu, json; print(json.dumps(fastrelu.info(), indent=1))" | tee "$out/gpu-info.json"
python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.txt"
device=$(python3 -c "from numba import cuda; d = cuda.get_current_device(); n = d.name; print((n.decode() if isinstance(n, bytes) else n).replace(' ', '-').lower())")
python3 -m fastrelu bench --device cuda --json "$out/gpu-$device.json" | tee "$out/gpu-$device.txt"
# the host cost of a call: with stand-ins for the driver (as measured without a GPU), then real
python3 bench/gpu_host_path.py | tee "$out/gpu-host-path-$device.txt"
python3 bench/gpu_host_path.py --real | tee -a "$out/gpu-host-path-$device.txt"
