"""PyTorch report: fastrelu.torch modules against torch.nn's, forward + backward through autograd,
and a small CNN's training step.

    fastrelu bench --torch [--quick] [--threads N] [--repeats N] [--json PATH]
    python -m fastrelu._torch_bench [--quick] [--sections crossover,ops,cnn] [--threads N]
                                    [--rounds N] [--json PATH]

Every comparison runs interleaved: the native and the converted module are timed in alternating
slices of about 10 ms (at least 3 calls; which goes first alternates too), each slice the median
of its calls, and the figure reported is the median of the per-slice ratios with their
interquartile range, so that load and drift on a shared machine hit both sides alike.
"""
import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

import fastrelu
from fastrelu import torch as frt
from fastrelu._report import UsageError, check_outputs, check_threads, cpu_model, write_json
from fastrelu.bench import cpu_backend

# (N, C, H, W) with 64 channels, from 10^3 elements to the STREAM size (2^26 float32 elements,
# 4x a 32 MiB last-level cache, at least)
SHAPES = [(1, 64, 4, 4), (2, 64, 8, 8), (2, 64, 28, 28), (16, 64, 32, 32), (64, 64, 32, 32)]
QUICK_SHAPES = SHAPES[:4]
OPS = ("relu", "leaky_relu", "elu", "prelu")
# crossover search: float32 contiguous (N, 64, ...) sizes, 1 element to 2^22
CROSSOVER_SIZES = [1, 64, 256, 1024, 4096, 16384, 65536, 262144, 1 << 20, 1 << 22]


def stream_shape():
    n = cpu_backend().stream_elements(4)
    return (max(1, n // (64 * 32 * 32)), 64, 32, 32)


def torch_module(op, channels, dtype):
    if op == "prelu":
        return nn.PReLU(channels, dtype=dtype)
    return {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU}[op]()


def step_fn(module, x, grad):
    """One forward + backward through autograd: the input's and parameters' gradients."""
    wrt = [x] + list(module.parameters())

    def step():
        torch.autograd.grad(module(x), wrt, grad)
    return step


def time_calls(fn, seconds):
    """Seconds per call of fn: the median of the calls that fit in about `seconds` (at least 3),
    so that a call stalled by another process's time slice does not count."""
    fn()
    times, end = [], time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < end:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


SLICE = 0.01  # seconds a side is timed before the other: shorter than the machine's drifts


def interleaved(native, fast, rounds, seconds):
    """(median native s/call, median fast s/call, median of the per-slice native/fast ratios, the
    quartiles of those ratios).  Each of `rounds` rounds gives each side `seconds`, in slices of
    about SLICE seconds (at least 3 calls each) that alternate between the sides, the first side
    alternating too: the machine's speed moves over seconds, and a slice of one side always
    has one of the other beside it."""
    once = max(time_calls(native, 0.0), time_calls(fast, 0.0))
    slices = rounds * max(1, min(round(seconds / SLICE), int(seconds / (3 * once))))
    window = rounds * seconds / slices
    t_native, t_fast, ratios = [], [], []
    for r in range(slices):
        if r % 2:
            b, a = time_calls(fast, window), time_calls(native, window)
        else:
            a, b = time_calls(native, window), time_calls(fast, window)
        t_native.append(a)
        t_fast.append(b)
        ratios.append(a / b)
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return statistics.median(t_native), statistics.median(t_fast), median, (q1, q3)


def op_case(op, shape, dtype, channels_last, rounds, seconds):
    native = torch_module(op, shape[1], dtype)
    converted = frt.convert(torch_module(op, shape[1], dtype))
    x = torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn_like(x)
    try:
        step_fn(converted, x, grad)()
    except (TypeError, ImportError) as exc:  # a dtype this build of the kernels refuses
        return {"error": f"{type(exc).__name__}: {exc}"}
    tn, tf, ratio, spread = interleaved(step_fn(native, x, grad), step_fn(converted, x, grad),
                                        rounds, seconds)
    return {"native_s": tn, "fastrelu_s": tf, "speedup": ratio, "speedup_iqr": spread}


def forced(op):
    """A context in which every size goes to fastrelu's kernels."""
    class Forced:
        def __enter__(self):
            self.saved = frt.CROSSOVER["cpu"][op]
            frt.CROSSOVER["cpu"][op] = 0

        def __exit__(self, *exc):
            frt.CROSSOVER["cpu"][op] = self.saved
    return Forced()


def crossover(rounds, seconds, out):
    """For each op, native/fastrelu forward + backward at each size with fastrelu forced on, and
    the smallest size from which fastrelu is at least as fast at every larger size."""
    results = {}
    for op in OPS:
        rows = []
        with forced(op):
            for n in CROSSOVER_SIZES:
                shape = (1, 1) if n == 1 else (max(1, n // 4096), 64, min(n // 64, 64))
                r = op_case(op, shape, torch.float32, False, rounds, seconds)
                r["elements"] = n
                rows.append(r)
                out(f"  {op:<10} {n:>8} elements: native {r['native_s'] * 1e6:9.1f} us, "
                    f"fastrelu {r['fastrelu_s'] * 1e6:9.1f} us, ratio {r['speedup']:.2f} "
                    f"({r['speedup_iqr'][0]:.2f}-{r['speedup_iqr'][1]:.2f})")
        faster_from = None
        for row in reversed(rows):
            if row["speedup"] < 1.0:
                break
            faster_from = row["elements"]
        results[op] = {"rows": rows, "faster_from": faster_from}
        out(f"  {op}: fastrelu at least as fast from {faster_from} elements "
            f"(CROSSOVER['cpu'] now {frt.CROSSOVER['cpu'][op]})")
    return results


class SmallCNN(nn.Module):
    """conv -> PReLU -> conv -> LeakyReLU -> linear, 64 channels at 32x32."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1)
        self.act1 = nn.PReLU(64)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.act2 = nn.LeakyReLU(0.01)
        self.head = nn.Linear(64 * 32 * 32, 10)

    def forward(self, x):
        return self.head(self.act2(self.conv2(self.act1(self.conv1(x)))).flatten(1))


def cnn_case(channels_last, rounds, seconds):
    torch.manual_seed(0)
    native = SmallCNN()
    converted = frt.convert(SmallCNN())
    converted.load_state_dict(native.state_dict())
    x = torch.randn(64, 3, 32, 32)
    target = torch.randint(0, 10, (64,))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        native.to(memory_format=torch.channels_last)
        converted.to(memory_format=torch.channels_last)

    def train_step(model):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), target).backward()
            opt.step()
        return step

    tn, tf, ratio, spread = interleaved(train_step(native), train_step(converted), rounds,
                                        seconds)
    return {"native_s": tn, "fastrelu_s": tf, "speedup": ratio, "speedup_iqr": spread}


def machine():
    info = fastrelu.info()
    return {"cpu": cpu_model(), "simd": info["simd"], "threads": torch.get_num_threads(),
            "fastrelu_threads": info["threads"], "torch": torch.__version__,
            "fastrelu": info["fastrelu"], "python": platform.python_version()}


SECTIONS = ("crossover", "ops", "cnn")


def ops_section(shapes, rounds, seconds, out):
    out("\nmodule forward + backward through autograd (input and weight gradients):")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for channels_last in (False, True):
            for op in OPS:
                for shape in shapes:
                    r = op_case(op, shape, dtype, channels_last, rounds, seconds)
                    r.update(op=op, shape=list(shape), dtype=str(dtype).split(".")[1],
                             layout="channels_last" if channels_last else "contiguous")
                    rows.append(r)
                    label = (f"  {op:<10} {r['dtype']:<8} {r['layout']:<13} "
                             f"{'x'.join(map(str, shape)):>16}")
                    if "error" in r:
                        out(f"{label}: not run ({r['error']})")
                        break
                    out(f"{label}: native {r['native_s'] * 1e3:9.3f} ms, fastrelu "
                        f"{r['fastrelu_s'] * 1e3:9.3f} ms, {r['speedup']:5.2f}x "
                        f"({r['speedup_iqr'][0]:.2f}-{r['speedup_iqr'][1]:.2f})")
    return rows


def cnn_section(rounds, seconds, out):
    out("\nCNN training step (conv-PReLU-conv-LeakyReLU-linear, batch 64, 64x32x32, SGD):")
    results = {}
    for channels_last in (False, True):
        layout = "channels_last" if channels_last else "contiguous"
        r = results[layout] = cnn_case(channels_last, rounds, seconds)
        out(f"  {layout:<13}: native {r['native_s'] * 1e3:8.2f} ms, fastrelu "
            f"{r['fastrelu_s'] * 1e3:8.2f} ms, {r['speedup']:.2f}x "
            f"({r['speedup_iqr'][0]:.2f}-{r['speedup_iqr'][1]:.2f})")
    return results


def prepare(args):
    """``fastrelu bench --torch``: checks the options that apply (UsageError for the others) and
    returns the run of the ops and CNN sections."""
    for option in ("sizes", "ops", "dtypes", "plot"):
        if getattr(args, option) is not None:
            raise UsageError(f"--torch times every op on its own shapes and draws nothing: "
                             f"--{option} does not apply")
    if args.contention:
        raise UsageError("--torch and --contention are separate reports: give one")
    if args.device != "cpu":
        raise UsageError("--torch compares with PyTorch on the CPU: --device does not apply")
    check_threads(args.threads)
    check_outputs(args.json, None)
    rounds = args.repeats if args.repeats is not None else 3 if args.quick else 7
    return lambda: run(("ops", "cnn"), args.quick, rounds, args.threads, args.json)


def run(sections, quick, rounds, threads, json_path):
    if threads is not None:
        torch.set_num_threads(threads)
        fastrelu.set_num_threads(threads)
    seconds = 0.05 if quick else 0.2

    def out(line=""):
        print(line, flush=True)

    results = {"machine": machine(), "rounds": rounds}
    m = results["machine"]
    out(f"fastrelu.torch report: {m['cpu']}, {m['simd']}, {m['threads']} torch threads, "
        f"{m['fastrelu_threads']} fastrelu threads, torch {m['torch']}")
    out(f"{rounds} rounds, each side timed in alternating slices of about {SLICE * 1e3:g} ms; "
        "ratio = median of the per-slice native time / fastrelu time (> 1: fastrelu faster), "
        "their interquartile range in brackets")
    if "crossover" in sections:
        out("\ncrossover (float32, contiguous, fastrelu forced at every size):")
        results["crossover"] = crossover(rounds, seconds, out)
    if "ops" in sections:
        shapes = QUICK_SHAPES if quick else SHAPES + [stream_shape()]
        results["ops"] = ops_section(shapes, rounds, seconds, out)
    if "cnn" in sections:
        results["cnn"] = cnn_section(rounds, seconds * 5, out)
    if json_path:
        write_json(json_path, results)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastrelu._torch_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="sizes up to 10^6, fewer rounds (seconds, not minutes)")
    parser.add_argument("--sections", default="ops,cnn",
                        help="comma-separated, of: crossover (where fastrelu starts to beat "
                             "PyTorch, per op, fastrelu forced at every size), ops, cnn "
                             "(default: ops,cnn)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (odd)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both PyTorch and fastrelu (default: as configured)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    rounds = args.rounds if args.rounds is not None else 3 if args.quick else 7
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        check_outputs(args.json, None)
    except UsageError as exc:
        parser.error(str(exc))
    return run(sections, args.quick, rounds, args.threads, args.json)


if __name__ == "__main__":
    sys.exit(main())
