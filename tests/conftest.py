"""Fixtures; the shared helpers are in helpers.py."""
import numpy as np
import pytest

from helpers import DTYPES


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request):
    return request.param
