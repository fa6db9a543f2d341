"""How close each op comes to the memory-copy roofline: the copy of the bytes an op moves, timed
once per size and direction, in one group with every op of that direction."""
import pytest

from conftest import time_call
from fastrelu._report import OPS, copy_impls, fastrelu_impls, op_directions

DIRECTIONS = ["fwd", "bwd"]


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_copy(benchmark, data, size, direction):
    time_call(benchmark, copy_impls(data)[("copy", direction)],
              f"vs copy {data.dtype.name} {size} {direction}", data, direction)


@pytest.mark.parametrize("op, direction", op_directions(OPS))
def test_op(benchmark, data, size, op, direction):
    time_call(benchmark, fastrelu_impls(data)[(op, direction)],
              f"vs copy {data.dtype.name} {size} {direction}", data, direction)
