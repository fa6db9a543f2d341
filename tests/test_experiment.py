"""The experiment command: real data loading (digits, MNIST IDX), determinism, the report."""
import gzip
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from fastrelu import experiment


def write_idx(path, array, compress=False):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape)
    raw = header + array.tobytes()
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
    with pytest.raises(experiment.DataError, match="do not match"):
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


def test_bad_options():
    res = subprocess.run([sys.executable, "-m", "fastrelu", "experiment", "--data",
                          "/nonexistent-dir"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "is not a directory" in res.stderr
    res = subprocess.run([sys.executable, "-m", "fastrelu", "experiment", "--configs", "wide"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "unknown config" in res.stderr
