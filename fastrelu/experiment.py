"""``fastrelu experiment``: is Leaky ReLU (or PReLU, or ELU) worth it over ReLU?

Trains the same MLP with each activation on real handwritten digits, in three settings: the usual
2x100 MLP, a deep 8-layer one, and a "dying" setting (a negative bias init) in which ReLU units die.
For every activation it reports the test accuracy (mean and spread over seeds), the fraction of dead
units per layer over the epochs (units never positive in an epoch, counted by the forward kernels
themselves), the sparsity, and the time per epoch; and it times one epoch of the same network with
the activations written the NumPy way, so the gain of the fused kernels inside a trainer is measured
too.

Data: scikit-learn's bundled 8x8 digits by default (``pip install 'fastrelu[experiment]'``), or
MNIST from its standard IDX files with ``--data DIR``.
"""
import functools
import gzip
import math
import os
import statistics
import struct
import time
import zlib

import numpy as np

from . import nn
from ._report import Progress, UsageError, check_outputs, entries, write_json, written
from .monitor import DeadUnitTracker

ACTIVATIONS = {
    "relu": lambda width: nn.ReLU(),
    "leaky_relu(0.01)": lambda width: nn.LeakyReLU(0.01),
    "leaky_relu(0.2)": lambda width: nn.LeakyReLU(0.2),
    "prelu": lambda width: nn.PReLU(width, init=0.25),
    "elu": lambda width: nn.ELU(1.0),
}

# name -> hidden widths, learning rate, bias init
CONFIGS = {
    "mlp": {"hidden": [100, 100], "lr": 0.05, "bias_init": 0.0,
            "about": "2x100 MLP, the usual comparison setting"},
    "deep": {"hidden": [64] * 8, "lr": 0.02, "bias_init": 0.0,
             "about": "8 hidden layers of 64"},
    "dying": {"hidden": [100, 100], "lr": 0.05, "bias_init": -1.0,
              "about": "2x100 MLP with every bias starting at -1"},
}


# ---- data ---------------------------------------------------------------------------------------

class DataError(UsageError):
    """A missing or malformed data file."""


def load_digits(seed=0):
    """scikit-learn's bundled 8x8 digits (1797 images), scaled to [0, 1], split 80/20."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DataError("the default data set needs scikit-learn: "
                        "pip install 'fastrelu[experiment]' (or give --data DIR with MNIST)") \
            from None
    digits = sk_load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]], "digits (8x8)"


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """An array from an IDX file (the MNIST format), gzipped or not."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt gzip data ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0:
        raise DataError(f"{path}: an IDX file of 0 dimensions")
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize  # in Python's integers, which do not overflow
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header says {shape} of {dtype} ({expected} bytes), "
                        f"the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def _find(directory, stem):
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                 stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise DataError(f"{directory}: no {stem} (or {stem}.gz): the MNIST IDX files are "
                    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
                    "and t10k-labels-idx1-ubyte")


def read_split(directory, split):
    """(images, labels) of one split's IDX files, checked: at least one image of at least one
    pixel, finite pixels, one label per image, labels integers 0..9."""
    images_path = _find(directory, f"{split}-images-idx3-ubyte")
    labels_path = _find(directory, f"{split}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: {images.ndim} dimensions {images.shape}, not 3 "
                        "(images, rows, columns)")
    if len(images) == 0:
        raise DataError(f"{images_path}: no images")
    if 0 in images.shape:
        raise DataError(f"{images_path}: images of {images.shape[1]}x{images.shape[2]} pixels")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise DataError(f"{images_path}: pixels that are NaN or infinite")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: {labels.ndim} dimensions {labels.shape}, not 1")
    if len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(labels)} labels do not match the "
                        f"{len(images)} images of {images_path}")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{labels_path}: labels of type {labels.dtype}, not integers")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{labels_path}: labels outside 0..9 (from {labels.min()} to "
                        f"{labels.max()})")
    return images, labels


def load_mnist(directory):
    """MNIST from its four IDX files in `directory`, images scaled to [0, 1]."""
    if not os.path.isdir(directory):
        raise DataError(f"{directory!r} is not a directory")
    if not os.access(directory, os.R_OK | os.X_OK):
        raise DataError(f"{directory}: cannot read the directory")
    parts = []
    for split in ("train", "t10k"):
        images, labels = read_split(directory, split)
        parts += [(images.reshape(len(images), -1) / 255.0).astype(np.float32),
                  labels.astype(np.int64)]
    if parts[0].shape[1] != parts[2].shape[1]:
        raise DataError(f"{directory}: test images of {parts[2].shape[1]} pixels, training "
                        f"images of {parts[0].shape[1]}")
    return (*parts, f"MNIST ({parts[0].shape[1]} pixels)")


# ---- training -----------------------------------------------------------------------------------

def build(config, activation, n_in, n_out, seed, kernels="fastrelu"):
    layers, width_in = [], n_in
    rng = np.random.default_rng(seed)
    for width in config["hidden"]:
        layers.append(nn.Linear(width_in, width, activation=ACTIVATIONS[activation](width),
                                bias_init=config["bias_init"], rng=rng, kernels=kernels))
        width_in = width
    layers.append(nn.Linear(width_in, n_out, rng=rng, kernels=kernels))
    return nn.Sequential(layers)


def run_epoch(model, loss, opt, x, y, batch, rng, tracker=None):
    total = 0.0
    for xb, yb in nn.batches(x, y, batch, seed=rng):
        total += loss.forward(model.forward(xb), yb) * len(yb)
        model.backward(loss.backward())
        opt.step()
        if tracker is not None:
            for name, act in model.activations():
                tracker.update(name, act.stats)
    return total / len(y)


def accuracy(model, x, y):
    """Test accuracy, in eval mode: nothing cached for a backward, training statistics kept."""
    model.eval()
    try:
        return float((model.forward(x).argmax(axis=1) == y).mean())
    finally:
        model.train()


def train(config, activation, data, seed, epochs, batch):
    """One run: per-epoch test accuracy, loss, dead fraction and sparsity per layer, time."""
    x_train, y_train, x_test, y_test = data
    model = build(config, activation, x_train.shape[1], 10, seed)
    model.track_stats()
    loss, tracker = nn.SoftmaxCrossEntropy(), DeadUnitTracker()
    opt = nn.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    rng = np.random.default_rng(seed + 1000)
    history = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        train_loss = run_epoch(model, loss, opt, x_train, y_train, batch, rng, tracker)
        seconds = time.perf_counter() - t0
        report = tracker.end_epoch()
        history.append({
            "train_loss": train_loss,
            "test_accuracy": accuracy(model, x_test, y_test),
            "dead_fraction": {k: v["dead_fraction"] for k, v in report.items()},
            "sparsity": {k: v["sparsity"] for k, v in report.items()},
            "seconds": seconds,
        })
    return history


def time_kernels(config, activation, data, batch, repeats=3):
    """Seconds for one training epoch with fastrelu's kernels and with the NumPy reference,
    same network, same batches, best of `repeats`."""
    x_train, y_train = data[0], data[1]
    out = {}
    for kernels in nn.KERNELS:
        best = float("inf")
        for r in range(repeats):
            model = build(config, activation, x_train.shape[1], 10, 0, kernels)
            opt = nn.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
            t0 = time.perf_counter()
            run_epoch(model, nn.SoftmaxCrossEntropy(), opt, x_train, y_train, batch,
                      np.random.default_rng(r))
            best = min(best, time.perf_counter() - t0)
        out[kernels] = best
    return out


def summarize(runs):
    """Across seeds: final test accuracy mean/std, final-epoch dead fraction and sparsity per
    layer (means), mean epoch time."""
    final = [h[-1] for h in runs]
    acc = [f["test_accuracy"] for f in final]
    layers = list(final[0]["dead_fraction"])
    return {
        "accuracy_mean": statistics.mean(acc),
        "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "dead_fraction": {k: statistics.mean(f["dead_fraction"][k] for f in final)
                          for k in layers},
        "sparsity": statistics.mean(statistics.mean(f["sparsity"].values()) for f in final),
        "epoch_seconds": statistics.mean(e["seconds"] for h in runs for e in h),
    }


def format_dead(dead):
    values = list(dead.values())
    if len(values) <= 2:
        return " ".join(f"{v:5.1%}" for v in values)
    return f"{min(values):.0%}..{max(values):.0%} (mean {statistics.mean(values):.1%})"


def prepare(args):
    """Checks every option and loads the data (UsageError, DataError), and returns the run, which
    nothing has started yet.  --seeds and --epochs, when given, win over what --quick picks."""
    quick = args.quick
    seeds = args.seeds if args.seeds is not None else (1 if quick else 5)
    epochs = args.epochs if args.epochs is not None else (3 if quick else 30)
    configs = entries("--configs", args.configs, "config", CONFIGS) \
        if args.configs is not None else list(CONFIGS)
    activations = entries("--activations", args.activations, "activation", ACTIVATIONS) \
        if args.activations is not None else list(ACTIVATIONS)
    plt = check_outputs(args.json, args.plot)
    *data, data_name = load_mnist(args.data) if args.data is not None else load_digits()
    if quick and args.data is not None:  # a slice of MNIST keeps --quick quick
        data = [data[0][:6000], data[1][:6000], data[2][:2000], data[3][:2000]]
    return functools.partial(run, data, data_name, configs, activations, seeds=seeds,
                             epochs=epochs, batch=args.batch, json_path=args.json,
                             plot_path=args.plot, plt=plt)


def run(data, data_name, configs, activations, seeds, epochs, batch, json_path, plot_path, plt):
    print(f"data: {data_name}, {len(data[1])} train / {len(data[3])} test; {seeds} seed(s), "
          f"{epochs} epochs, batch {batch}, SGD momentum 0.9")

    progress = Progress(len(configs) * len(activations) * seeds * epochs)
    results = {}
    for config_name in configs:
        config = CONFIGS[config_name]
        for act in activations:
            progress.label = f"{config_name} {act}"
            runs = []
            for seed in range(seeds):
                runs.append(train(config, act, data, seed, epochs, batch))
                progress(epochs)
            results.setdefault(config_name, {})[act] = {"runs": runs, **summarize(runs)}

    for config_name in configs:
        print(f"\n{config_name}: {CONFIGS[config_name]['about']} "
              f"(lr {CONFIGS[config_name]['lr']})")
        print(f"{'activation':<17}{'test accuracy':>18}{'dead units, last epoch':>28}"
              f"{'sparsity':>10}{'s/epoch':>9}")
        for act, r in results[config_name].items():
            acc = f"{r['accuracy_mean']:.2%} ± {r['accuracy_std']:.2%}"
            print(f"{act:<17}{acc:>18}{format_dead(r['dead_fraction']):>28}"
                  f"{r['sparsity']:>10.2f}{r['epoch_seconds']:>9.3f}")

    timing_config = configs[0]
    print(f"\none training epoch of '{timing_config}', fastrelu kernels vs the same network with "
          "NumPy activations (fastrelu.reference; best of 3):")
    kernel_timings = {}
    for act in activations:
        t = time_kernels(CONFIGS[timing_config], act, data, batch)
        kernel_timings[act] = t
        print(f"  {act:<17} fastrelu {t['fastrelu'] * 1e3:8.1f} ms   NumPy "
              f"{t['numpy'] * 1e3:8.1f} ms   {t['numpy'] / t['fastrelu']:.2f}x")

    if json_path is not None:
        write_json(json_path, {"data": data_name, "seeds": seeds, "epochs": epochs,
                               "batch": batch, "configs": {k: CONFIGS[k] for k in configs},
                               "results": results,
                               "epoch_timing": {"config": timing_config,
                                                "seconds": kernel_timings}})
    if plot_path is not None:
        plot(plt, results, plot_path)
    return 0


def plot(plt, results, path):
    configs = list(results)
    fig, axes = plt.subplots(2, len(configs), figsize=(5 * len(configs), 7.5), squeeze=False)
    for col, config in enumerate(configs):
        for act, r in results[config].items():
            runs = r["runs"]
            epochs = np.arange(1, len(runs[0]) + 1)
            acc = np.mean([[e["test_accuracy"] for e in h] for h in runs], axis=0)
            dead = np.mean([[np.mean(list(e["dead_fraction"].values())) for e in h]
                            for h in runs], axis=0)
            axes[0, col].plot(epochs, acc, label=act)
            axes[1, col].plot(epochs, dead, label=act)
        axes[0, col].set(title=f"{config}: test accuracy", xlabel="epoch")
        axes[1, col].set(title=f"{config}: dead units (mean over layers)", xlabel="epoch",
                         ylim=(-0.02, 1.02))
        axes[0, col].legend(fontsize=8)
    fig.tight_layout()
    written(path, lambda p: fig.savefig(p, dpi=100))
