"""Statistics fused into the forward pass, the dead-unit tracker, and fused bias + activation."""
import numpy as np
import pytest

import fastrelu
from helpers import AxisError, assert_bitwise, assert_close_ulp
from fastrelu import reference
from fastrelu.monitor import ActivationStats, DeadUnitTracker

FORWARD = {
    "relu": (lambda x, **k: fastrelu.relu(x, **k), reference.relu),
    "leaky_relu": (lambda x, **k: fastrelu.leaky_relu(x, 0.1, **k),
                   lambda x: reference.leaky_relu(x, 0.1)),
    "elu": (lambda x, **k: fastrelu.elu(x, 1.0, **k), reference.elu),
}


def expected_counts(x, axis):
    others = tuple(d for d in range(x.ndim) if d != axis)
    return (x > 0).sum(axis=others)


@pytest.mark.parametrize("name", list(FORWARD))
@pytest.mark.parametrize("shape,axis", [((64, 100), 1), ((64, 100), -1), ((8, 16, 9, 9), 1),
                                        ((8, 9, 9, 16), -1), ((4, 3, 300), 1), ((5, 70000), 0),
                                        ((3, 200, 700), 1), ((1, 1000), 1), ((1000, 1), 1),
                                        ((40, 1000), 1), ((5, 512), 1), ((7, 64, 4, 4), 1)])
def test_stats_count_positive_inputs_per_unit(name, shape, axis, dtype):
    fast, ref = FORWARD[name]
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    x.reshape(-1)[:7] = [np.nan, -0.0, 0.0, np.inf, -np.inf, 1e-45, -1e-45]
    y, stats = fast(x, stats=True, axis=axis)
    (assert_close_ulp if name == "elu" else assert_bitwise)(y, ref(x))
    np.testing.assert_array_equal(stats.positive, expected_counts(x, axis % x.ndim))
    assert stats.positive.dtype == np.int64
    assert stats.per_unit * stats.units == x.size
    assert stats.sparsity == pytest.approx(1 - (x > 0).mean())


def test_stats_by_hand():
    x = np.array([[1.0, -1.0, 2.0], [3.0, -2.0, -5.0]])
    y, stats = fastrelu.relu(x, stats=True)
    assert stats.positive.tolist() == [2, 0, 1]
    assert stats.per_unit == 2 and stats.units == 3
    assert stats.dead.tolist() == [False, True, False]
    assert stats.dead_fraction == pytest.approx(1 / 3)
    assert stats.sparsity == pytest.approx(0.5)
    assert stats.activation_rate.tolist() == [1.0, 0.0, 0.5]


def test_prelu_stats_use_its_channel_axis():
    x = np.random.default_rng(1).standard_normal((6, 4, 5))
    w = np.array([0.1, 0.2, 0.3, 0.4])
    y, stats = fastrelu.prelu(x, w, 1, stats=True)
    assert_bitwise(y, reference.prelu(x, w, 1))
    np.testing.assert_array_equal(stats.positive, expected_counts(x, 1))
    y, stats = fastrelu.prelu(x, 0.25, 2, stats=True)  # shared weight, units along axis 2
    np.testing.assert_array_equal(stats.positive, expected_counts(x, 2))


def test_stats_for_fewer_than_two_dims_is_one_unit():
    y, stats = fastrelu.relu(np.array([-1.0, 2.0, 3.0]), stats=True)
    assert stats.positive.tolist() == [2] and stats.per_unit == 3
    y, stats = fastrelu.relu(np.empty((0, 5)), stats=True)
    assert stats.positive.tolist() == [0] * 5 and stats.per_unit == 0 and stats.sparsity == 0.0


@pytest.mark.parametrize("shape,axis", [((23, 100), 1), ((9, 16, 3, 3), 1), ((300, 1000), 1),
                                        ((5, 7, 64), 2)])
def test_stats_in_place_count_the_inputs(shape, axis, dtype):
    """In place, results overwrite the inputs, and with negative parameters (and biases) their signs
    differ from the inputs': the counts are still of the inputs (rows counted in groups and one
    by one, first partial rows, both threads)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    w = np.linspace(-2, 1, c).astype(dtype)
    b = np.linspace(-0.5, 0.5, c).astype(dtype)
    view = [1] * len(shape)
    view[axis] = c
    cases = [
        (lambda a: fastrelu.prelu(a, w, axis, out=a, stats=True), lambda a: a),
        (lambda a: fastrelu.leaky_relu(a, -0.5, axis=axis, out=a, stats=True), lambda a: a),
        (lambda a: fastrelu.elu(a, -1.0, axis=axis, out=a, stats=True), lambda a: a),
        (lambda a: fastrelu.bias_activation(a, b, "leaky_relu", -0.5, axis, out=a, stats=True),
         lambda a: a + b.reshape(view)),
    ]
    for run, counted in cases:
        a = x.copy()
        expected = expected_counts(counted(x), axis)
        y, stats = run(a)
        assert y is a
        np.testing.assert_array_equal(stats.positive, expected)


def test_stats_with_out_and_threads():
    x = np.random.default_rng(2).standard_normal((300, 1000)).astype(np.float32)
    out = np.empty_like(x)
    y, stats = fastrelu.leaky_relu(x, 0.2, out=out, stats=True)
    assert y is out
    np.testing.assert_array_equal(stats.positive, expected_counts(x, 1))


def test_bad_stats_arguments():
    x = np.ones((3, 4))
    with pytest.raises(AxisError):
        fastrelu.relu(x, stats=True, axis=2)
    with pytest.raises(TypeError, match="stats must be True or False"):
        fastrelu.relu(x, stats="yes")
    with pytest.raises(TypeError, match="from_output must be True or False"):
        fastrelu.elu_backward(x, x, from_output="yes")


def test_tracker_accumulates_an_epoch():
    tracker = DeadUnitTracker()
    tracker.update("h1", ActivationStats(np.array([0, 3, 0]), 4))
    tracker.update("h1", ActivationStats(np.array([0, 1, 2]), 4))
    tracker.update("h2", ActivationStats(np.array([5]), 5))
    assert tracker.layers == ["h1", "h2"]
    assert tracker.dead_fraction("h1") == pytest.approx(1 / 3)  # unit 0 never positive
    assert tracker.sparsity("h1") == pytest.approx(1 - 6 / 24)
    np.testing.assert_allclose(tracker.activation_rates("h1"), [0, 0.5, 0.25])
    report = tracker.end_epoch()
    assert report["h1"]["dead_units"] == 1 and report["h1"]["batches"] == 2
    assert report["h2"]["dead_fraction"] == 0.0
    assert tracker.layers == [] and tracker.history == [report]
    with pytest.raises(ValueError, match="units"):
        tracker.update("h2", ActivationStats(np.array([1, 2]), 5))
        tracker.update("h2", ActivationStats(np.array([1]), 5))


def test_tracker_does_not_alias_the_stats():
    tracker = DeadUnitTracker()
    positive = np.array([1, 0])
    tracker.update("h", ActivationStats(positive, 2))
    positive[:] = 9
    assert tracker.stats("h").positive.tolist() == [1, 0]
    tracker.stats("h").positive[:] = 0  # what it hands out is a copy too
    assert tracker.report()["h"]["dead_units"] == 1


def test_activation_stats_counts_are_checked():
    with pytest.raises(ValueError, match=r"must lie in \[0, per_unit=1\], got 0 to 50"):
        ActivationStats([50, 0], 1)
    with pytest.raises(ValueError, match="got -1 to 0"):
        ActivationStats([-1, 0], 3)
    # unsigned counts are fine, and add up in a tracker like any others
    tracker = DeadUnitTracker()
    for _ in range(2):
        tracker.update("h", ActivationStats(np.array([3, 0], np.uint64), 4))
    assert tracker.stats("h").positive.tolist() == [6, 0]
    assert tracker.stats("h").per_unit == 8
    # int64 holds the counts: an unsigned count beyond it is not wrapped around
    with pytest.raises(ValueError, match="beyond the int64 counts"):
        ActivationStats(np.array([2**63], np.uint64), 2**64)


# ---- fused bias + activation --------------------------------------------------------------------

ACTS = [("relu", None, lambda z: reference.relu(z), lambda g, z: reference.relu_backward(g, z)),
        ("leaky_relu", 0.2, lambda z: reference.leaky_relu(z, 0.2),
         lambda g, z: reference.leaky_relu_backward(g, z, 0.2)),
        ("elu", 1.5, lambda z: reference.elu(z, 1.5), lambda g, z: reference.elu_backward(g, z, 1.5))]


@pytest.mark.parametrize("activation,param,ref_fwd,ref_bwd", ACTS, ids=[a[0] for a in ACTS])
@pytest.mark.parametrize("shape,axis", [((32, 100), 1), ((4, 8, 5, 5), 1), ((4, 5, 5, 8), -1),
                                        ((3, 4, 600), 1), ((2, 70000), 1), ((1, 300), 1),
                                        ((50000, 1), 1)])
def test_bias_activation_matches_unfused(activation, param, ref_fwd, ref_bwd, shape, axis,
                                         dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(dtype)
    b = rng.standard_normal(shape[axis]).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    bshape = [1] * len(shape)
    bshape[axis] = -1
    # x + b in the compute type (float32 for float16), rounded once with the activation
    compute = np.float64 if dtype == np.float64 else np.float32
    z = x.astype(compute) + b.astype(compute).reshape(bshape)
    y, stats = fastrelu.bias_activation(x, b, activation, param, axis, stats=True)
    check = assert_close_ulp if activation == "elu" else assert_bitwise
    check(y, ref_fwd(z).astype(dtype))
    np.testing.assert_array_equal(stats.positive, expected_counts(z, axis % len(shape)))
    dx, db = fastrelu.bias_activation_backward(g, y, activation, param, axis)
    expected_dx = ref_bwd(g.astype(compute), z).astype(dtype)
    if activation == "elu":
        # from the output: grad * (y + alpha), equal to grad * alpha * e^z up to the rounding of y
        eps = np.finfo(dtype).eps
        err = np.abs(dx.astype(np.float64) - expected_dx.astype(np.float64))
        bound = 4 * eps * (np.abs(g) * (np.abs(y) + param) + np.abs(expected_dx))
        assert (err <= bound).all()
    else:
        check(dx, expected_dx)
    # the bias gradient sums the unrounded per-element gradients in float64, then rounds once
    others = tuple(d for d in range(len(shape)) if d != axis % len(shape))
    dz = ref_bwd(g.astype(compute), z).astype(np.float64)
    tol = {np.float16: 1e-3, np.float32: 1e-6, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(db.astype(np.float64), dz.sum(axis=others), rtol=tol,
                               atol=tol * np.abs(dz).sum(axis=others).max())


def test_elu_backward_from_output_is_contract_exact_for_nan_and_zero():
    y = fastrelu.elu(np.array([np.nan, -0.0, 0.0, -np.inf, 2.0]))
    g = np.full(5, 3.0)
    dx, db = fastrelu.bias_activation_backward(g[None], y[None], "elu", 1.0, 1)
    assert dx[0].tolist()[1:] == [3.0, 3.0, 0.0, 3.0] and dx[0][0] == 3.0


def test_bias_activation_gradients_match_finite_differences():
    rng = np.random.default_rng(4)
    x = rng.uniform(-2, 2, (6, 5))
    b = rng.uniform(-0.5, 0.5, 5)
    g = rng.standard_normal((6, 5))
    z = x + b
    x = np.where(np.abs(z) < 1e-2, x + 0.1, x)
    h = 1e-6
    for activation, param in [("leaky_relu", 0.1), ("elu", 0.7), ("relu", None)]:
        y = fastrelu.bias_activation(x, b, activation, param)
        dx, db = fastrelu.bias_activation_backward(g, y, activation, param)
        loss = lambda xx, bb: (g * fastrelu.bias_activation(xx, bb, activation, param)).sum()  # noqa: E731
        numeric_dx = g * (fastrelu.bias_activation(x + h, b, activation, param)
                          - fastrelu.bias_activation(x - h, b, activation, param)) / (2 * h)
        np.testing.assert_allclose(dx, numeric_dx, rtol=1e-6, atol=1e-9)
        for u in range(5):
            e = np.zeros(5)
            e[u] = h
            np.testing.assert_allclose(db[u], (loss(x, b + e) - loss(x, b - e)) / (2 * h),
                                       rtol=1e-5)


def test_bias_activation_errors():
    x, b = np.ones((3, 4)), np.ones(4)
    with pytest.raises(ValueError, match="activation must be one of"):
        fastrelu.bias_activation(x, b, "gelu")
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        fastrelu.bias_activation(x, np.ones(3))
    with pytest.raises(TypeError, match="must match"):
        fastrelu.bias_activation(x, b.astype(np.float32))
    with pytest.raises(ValueError, match="parameter >= 0"):
        fastrelu.bias_activation_backward(x, x, "leaky_relu", -0.1)
    with pytest.raises(TypeError, match="relu takes no parameter"):
        fastrelu.bias_activation(x, b, "relu", 0.1)
    with pytest.raises(ValueError, match="alpha must be finite"):
        fastrelu.bias_activation(x, b, "elu", np.nan)
    out = np.full((3, 4), 7.0)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastrelu.bias_activation(x, b, out=out)
    with pytest.raises(ValueError, match="overlaps bias"):
        buf = np.zeros(16)
        fastrelu.bias_activation(x, buf[:4], out=buf[2:14].reshape(3, 4))


def test_elu_backward_from_output():
    x = np.random.default_rng(5).standard_normal(1000) * 3
    x[:4] = [np.nan, -0.0, -np.inf, 0.0]
    g = np.random.default_rng(6).standard_normal(1000)
    y = fastrelu.elu(x, 0.8)
    from_y = fastrelu.elu_backward(g, y, 0.8, from_output=True)
    from_x = fastrelu.elu_backward(g, x, 0.8)
    np.testing.assert_allclose(from_y, from_x, rtol=1e-14, atol=1e-15)
    expected = np.where(y <= 0, g * (y + 0.8), g)
    assert_bitwise(from_y, expected)
    with pytest.raises(ValueError, match="alpha >= 0"):
        fastrelu.elu_backward(g, y, -0.5, from_output=True)


def test_an_empty_batch_reports_no_unit_dead():
    tracker = fastrelu.DeadUnitTracker()
    _, stats = fastrelu.relu(np.zeros((0, 5), np.float32), stats=True)
    assert stats.per_unit == 0 and not stats.dead.any() and stats.dead_fraction == 0.0
    tracker.update("hidden", stats)
    assert tracker.report()["hidden"]["dead_units"] == 0
    # then a real batch: only its never-positive units are dead
    _, stats = fastrelu.relu(np.array([[1.0, -1.0, 0.0, 2.0, -3.0]], np.float32), stats=True)
    tracker.update("hidden", stats)
    np.testing.assert_array_equal(tracker.stats("hidden").dead, [False, True, True, False, True])


@pytest.mark.parametrize("bad", [None, np.zeros(3), {"positive": np.zeros(3)}])
def test_update_needs_activation_stats(bad):
    tracker = fastrelu.DeadUnitTracker()
    with pytest.raises(TypeError, match="stats must be an ActivationStats"):
        tracker.update("hidden", bad)
    assert tracker.layers == []


def test_unknown_layers_and_unhashable_names():
    tracker = fastrelu.DeadUnitTracker()
    _, stats = fastrelu.relu(np.ones((2, 3)), stats=True)
    with pytest.raises(TypeError, match="layer must be a hashable name"):
        tracker.update(["hidden"], stats)
    with pytest.raises(KeyError, match="no statistics for layer 'missing'"):
        tracker.stats("missing")
