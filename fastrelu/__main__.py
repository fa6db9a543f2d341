"""Command line: ``fastrelu bench`` (the benchmark report), ``fastrelu experiment`` (is leaky
worth it?) and ``fastrelu info``; also ``python -m fastrelu ...``."""
import argparse
import importlib.util
import json
import sys

from ._report import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A bad option: one line, `prog: error: message`, exit status 2 (--help has the
        usage)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return n


def _info(args):
    from . import info

    print(json.dumps(info(), indent=2))
    return 0


def _command_module(args):
    if args.command == "experiment":
        from . import experiment

        return experiment
    if args.torch:
        if importlib.util.find_spec("torch") is None:
            raise UsageError("--torch needs PyTorch: pip install 'fastrelu[torch]'")
        from . import _torch_bench

        return _torch_bench
    if args.device == "cuda":
        from . import _gpu_bench

        return _gpu_bench
    from . import bench

    return bench


def _checked_run(parser, args):
    """The command's checks, then its run.  Only the checks' UsageError becomes the one-line
    error: an exception from the run is a fault and keeps its traceback."""
    try:
        run = _command_module(args).prepare(args)
    except UsageError as exc:
        parser.error(str(exc))
    return run()


def main(argv=None):
    parser = _Parser(prog="fastrelu", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="SIMD level, threads, versions and GPU backend state")
    b = commands.add_parser(
        "bench", help="time every op against a memory copy, NumPy, PyTorch and numexpr",
        description="Times every op, forward and backward, against ReLU, a memory copy of the "
        "same bytes (the roofline), the NumPy recipe, and PyTorch and numexpr when installed: "
        "every comparison is the median of per-round ratios of interleaved samples, with its "
        "interquartile range. Then the ops on values of each sign and with subnormal products, "
        "channels-last against contiguous data, one training step with each activation, and "
        "PReLU against PyTorch autograd. Every option is checked before anything is timed.")
    b.add_argument("--quick", action="store_true",
                   help="small sizes only, 5 rounds, the size sweep only (seconds); --sizes and "
                   "--repeats, when given, win")
    b.add_argument("--sizes", help="comma-separated element counts (1000 or 1e3; multiples of "
                   "100 when prelu or relu_stats is timed, as their data is (N, 100); at most "
                   "what memory holds) or 'stream' (4x the last-level cache, the L2 cache on the "
                   "GPU); default 1e3,1e5,1e6,stream (--device cuda: 1e3,1e4,1e6,1e8)")
    b.add_argument("--ops", help="comma-separated subset of relu,leaky_relu,prelu,elu,relu_stats")
    b.add_argument("--dtypes", help="comma-separated subset of float16,bfloat16,float32,float64 "
                   "(default float32; bfloat16 needs ml_dtypes and the CPU)")
    b.add_argument("--threads", type=positive_int, help="threads for fastrelu and its peers, "
                   "at most the logical CPUs (CPU report only)")
    b.add_argument("--repeats", type=positive_int,
                   help="rounds of interleaved samples per comparison (default 15, down to 5 for "
                   "slow ones; quick 5; --contention: blocks per variant, default 10)")
    b.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    b.add_argument("--plot", metavar="PATH", help="write a PNG plot (needs matplotlib)")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the GPU report, on CuPy arrays (needs CuPy and numba-cuda)")
    b.add_argument("--contention", action="store_true",
                   help="instead of the report: leaky_relu's per-call median and 90th percentile "
                   "with --threads (default: all) and with 1 thread, and PyTorch's, while a "
                   "process spins on one core (--sizes, default 1e5,1e6,1e7)")
    b.add_argument("--torch", action="store_true",
                   help="instead of the report: fastrelu.torch's modules against torch.nn's "
                   "(forward + backward through autograd, float32 and bfloat16, contiguous and "
                   "channels-last) and a small CNN's training step (needs PyTorch; --quick, "
                   "--threads, --repeats and --json apply)")
    e = commands.add_parser(
        "experiment", help="train one MLP with each activation: accuracy, dead units, time",
        description="Trains the same MLP with ReLU, Leaky ReLU (0.01, 0.2), PReLU and ELU in "
        "three settings (2x100, 8 layers, negative bias init) and reports test accuracy, dead "
        "units per layer, sparsity and time per epoch. Every option and the data are checked "
        "before training starts.")
    e.add_argument("--quick", action="store_true",
                   help="1 seed, 3 epochs, MNIST cut to 6000/2000 images (< 30 s); --seeds and "
                   "--epochs, when given, win")
    e.add_argument("--data", metavar="DIR", help="MNIST IDX files (default: scikit-learn's "
                   "digits)")
    e.add_argument("--seeds", type=positive_int, help="seeds per configuration (default 5)")
    e.add_argument("--epochs", type=positive_int, help="epochs per run (default 30)")
    e.add_argument("--batch", type=positive_int, default=32, help="batch size (default 32)")
    e.add_argument("--configs", help="comma-separated subset of mlp,deep,dying")
    e.add_argument("--activations", help="comma-separated subset of relu,leaky_relu(0.01),"
                   "leaky_relu(0.2),prelu,elu")
    e.add_argument("--json", metavar="PATH", help="write every run's history as JSON")
    e.add_argument("--plot", metavar="PATH", help="write PNG plots (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info(args)
    return _checked_run({"bench": b, "experiment": e}[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
