"""What each op costs next to ReLU, on each kind of values (mixed signs, all positive, all
negative, negative values whose products are subnormal): one group per size, direction and kind,
ReLU in every group."""
import pytest

from conftest import BACKEND, time_call
from fastrelu._report import OPS, VALUE_CASES, Data, fastrelu_impls, op_directions


@pytest.fixture(scope="module", params=VALUE_CASES)
def valued(request, data):
    """The data's size and dtype on one kind of values."""
    return request.param, Data(data.n, data.dtype, BACKEND, values=request.param)


@pytest.mark.parametrize("op, direction", op_directions(OPS))
def test_op(benchmark, valued, size, op, direction):
    case, d = valued
    time_call(benchmark, fastrelu_impls(d)[(op, direction)],
              f"cost over relu {d.dtype.name} {size} {direction} {case}", d, direction)
