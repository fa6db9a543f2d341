"""Command line: ``fastrelu bench`` (the benchmark report), ``fastrelu experiment`` (is leaky
worth it?) and ``fastrelu info``; also ``python -m fastrelu ...``."""
import argparse
import json
import sys


def _info(args):
    from . import info

    print(json.dumps(info(), indent=2))
    return 0


def _bench(args):
    from . import bench

    return bench.main(args)


def _experiment(args):
    from . import experiment

    return experiment.main(args)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastrelu", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="SIMD level, threads, versions and GPU backend state")
    b = commands.add_parser(
        "bench", help="time every op against a memory copy, NumPy, PyTorch and numexpr",
        description="Times every op, forward and backward, side by side with a memory copy of "
        "the same bytes (the roofline), the NumPy recipe, and PyTorch and numexpr when installed.")
    b.add_argument("--quick", action="store_true", help="small sizes only, 3 repeats (< 20 s)")
    b.add_argument("--sizes", help="comma-separated element counts, multiples of 1000, or "
                   "'stream' (4x the last-level cache); default 1e3,1e5,1e6,stream")
    b.add_argument("--ops", help="comma-separated subset of relu,leaky_relu,prelu,elu")
    b.add_argument("--dtypes", help="comma-separated dtypes (default float32)")
    b.add_argument("--threads", type=int, help="threads for fastrelu and its peers")
    b.add_argument("--repeats", type=int, help="samples per measurement (default 7, quick 3)")
    b.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    b.add_argument("--plot", metavar="PATH", help="write a PNG plot (needs matplotlib)")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the GPU backend on CuPy arrays")
    e = commands.add_parser(
        "experiment", help="train one MLP with each activation: accuracy, dead units, time",
        description="Trains the same MLP with ReLU, Leaky ReLU (0.01, 0.2), PReLU and ELU in "
        "three settings (2x100, 8 layers, negative bias init) and reports test accuracy, dead "
        "units per layer, sparsity and time per epoch.")
    e.add_argument("--quick", action="store_true", help="1 seed, 3 epochs (< 30 s)")
    e.add_argument("--data", metavar="DIR", help="MNIST IDX files (default: scikit-learn's "
                   "digits)")
    e.add_argument("--seeds", type=int, help="seeds per configuration (default 5)")
    e.add_argument("--epochs", type=int, help="epochs per run (default 30)")
    e.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    e.add_argument("--configs", help="comma-separated subset of mlp,deep,dying")
    e.add_argument("--activations", help="comma-separated subset of relu,leaky_relu(0.01),"
                   "leaky_relu(0.2),prelu,elu")
    e.add_argument("--json", metavar="PATH", help="write every run's history as JSON")
    e.add_argument("--plot", metavar="PATH", help="write PNG plots (needs matplotlib)")
    args = parser.parse_args(argv)
    return {"info": _info, "bench": _bench, "experiment": _experiment}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
