"""fastrelu against the NumPy recipe, np.maximum, and PyTorch and numexpr when installed: one group
per op, direction and size, fastrelu both writing into out= and allocating its result (the
recipe and PyTorch's PReLU allocate)."""
import pytest

from conftest import time_call
from fastrelu._report import OPS, implementations, installed, op_directions
from fastrelu.bench import PEERS

PEER_NAMES = ["fastrelu", "fastrelu-alloc", "numpy", "numpy-maximum", *PEERS]


@pytest.fixture(scope="module")
def impls(data):
    return implementations(data, OPS, installed(PEERS))


@pytest.mark.parametrize("op, direction", op_directions(OPS))
@pytest.mark.parametrize("impl", PEER_NAMES)
def test_peer(benchmark, data, impls, size, impl, op, direction):
    if (impl, op, direction) not in impls:
        pytest.skip(f"{impl} has no {op} {direction} here")
    time_call(benchmark, impls[(impl, op, direction)],
              f"peers {op} {direction} {data.dtype.name} {size}", data, direction)
