"""The experiment command: real data loading (digits, MNIST IDX), determinism, the report."""
import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from helpers import forbid, refused
from fastrelu import experiment


def write_idx(path, array, compress=False):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D}
    write_raw(path, codes[array.dtype], array.shape, array.tobytes(), compress)


def write_raw(path, type_code, shape, payload, compress=False):
    """An IDX file of any header and payload, matching or not."""
    header = bytes([0, 0, type_code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
    raw = header + payload
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if compress else raw)


def fake_mnist(directory, n_train=300, n_test=100, compress=True):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):  # a learnable pattern: a bright row per digit
            images[i, 2 * label + 3, 4:24] = 250
        suffix = ".gz" if compress else ""
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels, compress)
    return directory


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_loader_reads_idx(tmp_path, compress):
    fake_mnist(tmp_path, compress=compress)
    x_train, y_train, x_test, y_test, name = experiment.load_mnist(str(tmp_path))
    assert x_train.shape == (300, 784) and x_test.shape == (100, 784)
    assert x_train.dtype == np.float32 and 0 <= x_train.min() and x_train.max() <= 1
    assert y_train.dtype == np.int64 and set(np.unique(y_train)) <= set(range(10))
    assert "MNIST" in name


def test_idx_errors_are_clear(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(experiment.DataError, match="bad magic"):
        experiment.read_idx(str(bad))
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(experiment.DataError, match="the file holds 3"):
        experiment.read_idx(str(short))
    with pytest.raises(experiment.DataError, match="cannot read"):
        experiment.read_idx(str(tmp_path / "missing"))
    with pytest.raises(experiment.DataError, match="no train-images-idx3-ubyte"):
        experiment.load_mnist(str(tmp_path))
    fake_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(99, np.uint8), True)
    with pytest.raises(experiment.DataError, match="99 labels do not match the 100 images"):
        experiment.load_mnist(str(tmp_path))


def test_training_is_deterministic_for_a_seed():
    data = experiment.load_digits()[:4]
    config = experiment.CONFIGS["mlp"]
    a = experiment.train(config, "leaky_relu(0.01)", data, seed=3, epochs=2, batch=64)
    b = experiment.train(config, "leaky_relu(0.01)", data, seed=3, epochs=2, batch=64)
    for ea, eb in zip(a, b):
        assert ea["train_loss"] == eb["train_loss"]
        assert ea["test_accuracy"] == eb["test_accuracy"]
        assert ea["dead_fraction"] == eb["dead_fraction"]


def test_training_learns_and_dying_setting_kills_relu():
    data = experiment.load_digits()[:4]
    ok = experiment.train(experiment.CONFIGS["mlp"], "relu", data, seed=0, epochs=3, batch=32)
    assert ok[-1]["test_accuracy"] > 0.85
    dying = experiment.train(experiment.CONFIGS["dying"], "relu", data, seed=0, epochs=3,
                             batch=32)
    assert max(dying[-1]["dead_fraction"].values()) > 0.3


@pytest.mark.slow
def test_quick_run_writes_report(tmp_path):
    out = tmp_path / "exp.json"
    res = subprocess.run([sys.executable, "-m", "fastrelu", "experiment", "--quick",
                          "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "test accuracy" in res.stdout and "NumPy" in res.stdout
    report = json.loads(out.read_text())
    assert set(report["results"]) == set(experiment.CONFIGS)
    for config in report["results"].values():
        assert set(config) == set(experiment.ACTIVATIONS)
        for r in config.values():
            assert 0 <= r["accuracy_mean"] <= 1 and len(r["runs"][0]) == 3
            assert all(0 <= v <= 1 for v in r["dead_fraction"].values())
    assert set(report["epoch_timing"]["seconds"]) == set(experiment.ACTIVATIONS)


def test_mnist_from_data_dir(tmp_path):
    fake_mnist(tmp_path)
    res = subprocess.run([sys.executable, "-m", "fastrelu", "experiment", "--data",
                          str(tmp_path), "--epochs", "2", "--seeds", "1", "--configs", "mlp",
                          "--activations", "relu,prelu"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "MNIST (784 pixels), 300 train / 100 test" in res.stdout


# ---- bad options and data files -----------------------------------------------------------------

@pytest.fixture
def no_work(monkeypatch):
    forbid(monkeypatch, (experiment, "run"), (experiment, "train"),
           (experiment, "time_kernels"))


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "argument --seeds: 0 is not positive"),
    (["--epochs", "-3"], "argument --epochs: -3 is not positive"),
    (["--batch", "0"], "argument --batch: 0 is not positive"),
    (["--batch", "1.5"], "argument --batch: '1.5' is not a whole number"),
    (["--configs", "wide"], "unknown config 'wide'; choose from mlp, deep, dying"),
    (["--configs", ""], "--configs: empty list"),
    (["--configs", "mlp,,deep"], "--configs: empty entry"),
    (["--configs", "mlp,mlp"], "config mlp given twice"),
    (["--activations", "gelu"], "unknown activation 'gelu'"),
    (["--activations", ""], "--activations: empty list"),
    (["--data", "/nonexistent-dir"], "'/nonexistent-dir' is not a directory"),
    (["--data", ""], "'' is not a directory"),
    (["--json", "/nonexistent-dir/r.json"], "folder /nonexistent-dir does not exist"),
])
def test_bad_options_are_refused_before_training(capsys, no_work, args, message):
    assert message in refused(capsys, ["experiment", *args])


def test_plot_without_matplotlib_is_refused_up_front(capsys, no_work, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    out = str(tmp_path / "r.png")
    assert "--plot needs matplotlib" in refused(capsys, ["experiment", "--plot", out])
    assert "is a folder" in refused(capsys, ["experiment", "--json", str(tmp_path)])


def gzip_corrupted(path, at, count=40):
    """The gzip file with `count` bytes overwritten from byte `at`: at 10, where the gzip header
    ends, the deflate data; at -8, the checksum."""
    data = bytearray(path.read_bytes())
    data[at:at + count] = b"\xff" * count
    path.write_bytes(bytes(data))


def gzip_truncated(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def images(path, shape, payload=None):
    write_raw(path, 0x08, shape, bytes(int(np.prod(shape))) if payload is None else payload)


BAD_FILES = {  # name: (changes the fake MNIST set, message)
    "deflate data corrupt": (lambda d: gzip_corrupted(d / "train-images-idx3-ubyte.gz", 10),
                             "corrupt gzip data (Error -3 while decompressing data"),
    "gzip checksum wrong": (lambda d: gzip_corrupted(d / "train-images-idx3-ubyte.gz", -8, 4),
                            "corrupt gzip data (CRC check failed)"),
    "gzip truncated": (lambda d: gzip_truncated(d / "train-labels-idx1-ubyte.gz"),
                       "corrupt gzip data"),
    "payload truncated": (lambda d: write_raw(d / "t10k-images-idx3-ubyte.gz", 0x08,
                                              (100, 28, 28), bytes(1000), True),
                          "the file holds 1000"),
    "header truncated": (lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(bytes([0, 0, 8, 3, 0, 0]))), "truncated IDX header"),
    "bad magic": (lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(b"PK\x03\x04" + bytes(100))), "bad magic number"),
    "no dimensions": (lambda d: write_raw(d / "train-labels-idx1-ubyte.gz", 0x08, (), b"", True),
                      "0 dimensions"),
    "zero-sized images": (lambda d: images(d / "train-images-idx3-ubyte.gz", (300, 28, 0)),
                          "images of 28x0 pixels"),
    "no images": (lambda d: (images(d / "t10k-images-idx3-ubyte.gz", (0, 28, 28)),
                             write_idx(d / "t10k-labels-idx1-ubyte.gz", np.zeros(0, np.uint8))),
                  "no images"),
    # 2^22 * 2^21 * 2^21 = 2^64 bytes, 0 in 64-bit arithmetic
    "dimensions overflow": (lambda d: images(d / "train-images-idx3-ubyte.gz",
                                             (2**22, 2**21, 2**21), b""), "IDX header says"),
    "dimensions beyond the file": (lambda d: images(d / "train-images-idx3-ubyte.gz",
                                                    (60000, 28, 28), bytes(784)),
                                   "the file holds 784"),
    "images not 3-d": (lambda d: images(d / "train-images-idx3-ubyte.gz", (300, 784)),
                       "2 dimensions (300, 784), not 3"),
    "labels count": (lambda d: write_idx(d / "train-labels-idx1-ubyte.gz",
                                         np.zeros(299, np.uint8), True),
                     "299 labels do not match the 300 images"),
    "labels above 9": (lambda d: write_idx(d / "train-labels-idx1-ubyte.gz",
                                           np.full(300, 10, np.uint8), True),
                       "labels outside 0..9 (from 10 to 10)"),
    "negative labels": (lambda d: write_idx(d / "t10k-labels-idx1-ubyte.gz",
                                            np.full(100, -1, np.int8), True),
                        "labels outside 0..9"),
    "float labels": (lambda d: write_idx(d / "t10k-labels-idx1-ubyte.gz",
                                         np.full(100, 1.5, ">f4"), True),
                     "labels of type >f4, not integers"),
    "NaN pixels": (lambda d: write_idx(d / "t10k-images-idx3-ubyte.gz",
                                       np.full((100, 28, 28), np.nan, ">f4"), True),
                   "pixels that are NaN or infinite"),
    "test images of another size": (lambda d: images(d / "t10k-images-idx3-ubyte.gz",
                                                     (100, 20, 20)),
                                    "test images of 400 pixels, training images of 784"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_data_files_are_refused_before_training(capsys, no_work, tmp_path, name):
    change, message = BAD_FILES[name]
    change(fake_mnist(tmp_path))
    out = tmp_path / "r.json"
    assert message in refused(capsys, ["experiment", "--data", str(tmp_path), "--json", str(out)])
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_unreadable_data_dir_is_refused(capsys, no_work, tmp_path):
    fake_mnist(tmp_path)
    tmp_path.chmod(0)
    try:
        assert "cannot read the directory" in refused(capsys, ["experiment", "--data",
                                                              str(tmp_path)])
    finally:
        tmp_path.chmod(0o700)


def test_no_traceback_reaches_the_terminal(tmp_path):
    fake_mnist(tmp_path)
    gzip_corrupted(tmp_path / "train-images-idx3-ubyte.gz", 10)
    for args in (["--data", str(tmp_path)], ["--seeds", "0"], ["--configs", "wide"]):
        res = subprocess.run([sys.executable, "-m", "fastrelu", "experiment", *args],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and res.stdout == "", (args, res.stderr)
        assert res.stderr.count("\n") == 1, res.stderr
        assert res.stderr.startswith("fastrelu experiment: error: "), res.stderr
