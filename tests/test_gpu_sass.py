"""Every GPU kernel compiled to Hopper (sm_90) machine code and read back, without a GPU: PTX
from numba (NVVM), SASS from ptxas, disassembled by nvdisasm (the nvidia-cuda-nvcc and
nvidia-cuda-nvdisasm wheels of the test extra).  What a memory-bound kernel needs is checked in the
code itself: 16-byte global loads and stores in the flat kernels, a few instructions per element in
their main loop, no local memory (spills) anywhere, and warp shuffles with native atomics, not
compare-and-swap loops, in the rows kernels."""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("numba")

CHEAP_OPS = ("relu", "leaky_relu", "copy")  # ELU's exp/expm1 cost ~20 instructions an element
MAX_INSTRUCTIONS_PER_ELEMENT = 8
WIDTH = {"float16": 8, "bfloat16": 8, "float32": 4, "float64": 2}  # elements per 16 bytes


def nvidia_tool(name):
    import nvidia

    for root in nvidia.__path__:
        path = os.path.join(root, "cu13", "bin", name)
        if os.path.exists(path):
            return path
    pytest.fail(f"{name} is missing: pip install nvidia-cuda-nvcc nvidia-cuda-nvdisasm "
                "(part of the test extra)")


def disassemble(cubin):
    """(instructions, {label: index of the instruction it marks}) of a cubin's code."""
    text = subprocess.run([nvidia_tool("nvdisasm"), "-c", cubin], capture_output=True,
                          text=True, check=True).stdout
    code, labels = [], {}
    for line in text.splitlines():
        line = re.sub(r"/\*.*?\*/", "", line).strip().rstrip(" ;")
        label = re.match(r"^(\.L_x_\d+):$", line)
        if label:
            labels[label.group(1)] = len(code)
        elif line and not line.startswith(".") and not line.endswith(":"):
            code.append(line)
    return code, labels


def loops(code, labels):
    """The instructions of each loop: from a branch's target back up to the branch."""
    found = []
    for i, instruction in enumerate(code):
        target = re.search(r"BRA `\((\.L_x_\d+)\)", instruction)
        if target and labels[target.group(1)] <= i:
            found.append(code[labels[target.group(1)]:i + 1])
    return found


def analyse(name, ptx, tmp_path):
    stem = re.sub(r"\W", "_", name)
    ptx_path, cubin = tmp_path / f"{stem}.ptx", str(tmp_path / f"{stem}.cubin")
    ptx_path.write_text(ptx)
    res = subprocess.run([nvidia_tool("ptxas"), "-arch=sm_90", "-v", str(ptx_path), "-o", cubin],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    info = res.stdout + res.stderr
    code, labels = disassemble(cubin)
    report = {
        "registers": int(re.search(r"Used (\d+) registers", info).group(1)),
        "spill_bytes": sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", info)),
        "stack_bytes": int(re.search(r"(\d+) bytes stack frame", info).group(1)),
        "local_accesses": sum(bool(re.search(r"\b(LDL|STL)\b", c)) for c in code),
        "ldg128": sum("LDG.E.128" in c for c in code),
        "stg128": sum("STG.E.128" in c for c in code),
        "shuffles": sum("SHFL" in c for c in code),
        "cas": sum(bool(re.search(r"\bATOMS?\.CAS|CAST\.SPIN", c)) for c in code),
        "global_reductions": sum(bool(re.search(r"\b(REDG?|ATOMG?)\.E\.ADD", c)) for c in code),
    }
    vector_loops = [body for body in loops(code, labels) if any("STG.E.128" in c for c in body)]
    if vector_loops:
        main = max(vector_loops, key=lambda body: sum("STG.E.128" in c for c in body))
        storage = re.search(r",(\w+)", name).group(1)
        elements = sum("STG.E.128" in c for c in main) * WIDTH[storage]
        report["main_loop"] = {"instructions": len(main), "elements": elements,
                               "per_element": round(len(main) / elements, 2)}
    return report


@pytest.fixture(scope="module")
def sass(tmp_path_factory):
    """{kernel name: what its sm_90 code shows}, compiled in a process without the simulator."""
    code = "import json; from fastrelu import _gpu; print(json.dumps(_gpu.compile_ptx_all((9, 0))))"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    ptx = json.loads(res.stdout.strip().splitlines()[-1])
    tmp_path = tmp_path_factory.mktemp("sass")
    reports = {name: analyse(name, text, tmp_path) for name, text in ptx.items()}
    print(json.dumps(reports, indent=1))
    return reports


@pytest.mark.slow
def test_every_kernel_compiles_for_hopper_without_local_memory(sass):
    assert len(sass) == 63
    for name, r in sass.items():
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0 and r["local_accesses"] == 0, \
            (name, r)


@pytest.mark.slow
def test_flat_kernels_move_16_bytes_per_access_in_a_short_main_loop(sass):
    flat = {n: r for n, r in sass.items() if n.startswith("flat_") and "unaligned" not in n}
    assert len(flat) == 34
    for name, r in flat.items():
        assert r["ldg128"] > 0 and r["stg128"] > 0 and "main_loop" in r, (name, r)
        op, storage = re.search(r"\[(\w+),(\w+)", name).groups()
        if op in CHEAP_OPS and storage in ("float32", "float16"):
            assert r["main_loop"]["per_element"] <= MAX_INSTRUCTIONS_PER_ELEMENT, (name, r)
    # unaligned arrays take the same kernel one element at a time
    assert sass["flat_forward[relu,float32,unaligned]"]["ldg128"] == 0


@pytest.mark.slow
def test_rows_kernels_reduce_with_shuffles_and_native_atomics(sass):
    rows = {n: r for n, r in sass.items() if n.startswith("rows_")}
    assert len(rows) == 24
    for name, r in rows.items():
        assert r["shuffles"] >= 5 and r["cas"] == 0 and r["global_reductions"] >= 1, (name, r)
        assert r["registers"] <= 64, (name, r)  # 4 blocks of 256 threads per multiprocessor
