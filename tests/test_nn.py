"""fastrelu.nn: every layer's backward against finite differences, and the NumPy kernels path
against the fused one."""
import numpy as np
import pytest

from fastrelu import nn

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "leaky_negative": lambda: nn.LeakyReLU(-0.2),
    "elu": lambda: nn.ELU(0.7),
    "prelu_shared": lambda: nn.PReLU(1, 0.25, dtype=np.float64),
    "prelu_per_unit": lambda: nn.PReLU(7, 0.3, dtype=np.float64),
    "none": lambda: None,
}


def away_from_kinks(shape, rng):
    x = rng.uniform(-2, 2, shape)
    return np.where(np.abs(x) < 0.05, 0.5, x)


def numeric_grad(f, array, h=1e-6):
    grad = np.zeros_like(array)
    for i in np.ndindex(array.shape):
        old = array[i]
        array[i] = old + h
        up = f()
        array[i] = old - h
        down = f()
        array[i] = old
        grad[i] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("kernels", nn.KERNELS)
def test_linear_with_activation_matches_finite_differences(name, kernels):
    rng = np.random.default_rng(0)
    layer = nn.Linear(5, 7, activation=ACTIVATIONS[name](), bias_init=0.05, rng=1,
                      dtype=np.float64, kernels=kernels)
    x = away_from_kinks((4, 5), rng)
    g = rng.standard_normal((4, 7))
    # keep every pre-activation away from the kink at 0
    layer.bias.value[:] = 0.3 - (x @ layer.weight.value).mean(axis=0)
    loss = lambda: float((g * layer.forward(x.copy())).sum())  # noqa: E731
    loss()
    dx = layer.backward(g.copy())
    np.testing.assert_allclose(dx, numeric_grad(lambda: loss(), x), rtol=1e-5, atol=1e-8)
    analytic = [p.grad.copy() for p in layer.parameters()]
    for p, a in zip(layer.parameters(), analytic):
        np.testing.assert_allclose(a, numeric_grad(loss, p.value), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "elu", "prelu_per_unit"])
def test_standalone_activation_layers(name):
    rng = np.random.default_rng(2)
    act = ACTIVATIONS[name]()
    x = away_from_kinks((6, 7), rng)
    g = rng.standard_normal((6, 7))
    loss = lambda: float((g * act.forward(x.copy())).sum())  # noqa: E731
    loss()
    dx = act.backward(g.copy())
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-8)


def test_activations_keep_only_what_backward_needs():
    x = np.random.default_rng(3).standard_normal((4, 5))
    relu = nn.ReLU()
    y = relu.forward(x)
    assert y is x and relu._saved is y  # in place, the output kept
    leaky = nn.LeakyReLU(-0.5)  # negative slope: the output no longer tells the sign
    x2 = np.random.default_rng(3).standard_normal((4, 5))
    y2 = leaky.forward(x2)
    assert y2 is not x2 and leaky._saved is x2


def test_softmax_cross_entropy():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((5, 3))
    labels = np.array([0, 2, 1, 1, 0])
    loss = nn.SoftmaxCrossEntropy()
    value = loss.forward(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert value == pytest.approx(-np.log(p[np.arange(5), labels]).mean())
    numeric = numeric_grad(lambda: nn.SoftmaxCrossEntropy().forward(logits, labels), logits)
    np.testing.assert_allclose(loss.backward(), numeric, rtol=1e-6, atol=1e-9)


def test_sgd_with_momentum():
    p = nn.Parameter(np.array([1.0, 2.0]))
    opt = nn.SGD([p], lr=0.1, momentum=0.5)
    p.grad[:] = [1.0, -1.0]
    opt.step()
    assert p.value.tolist() == [0.9, 2.1] and p.grad.tolist() == [0.0, 0.0]
    p.grad[:] = [1.0, -1.0]
    opt.step()  # v = 0.5 * (-0.1, 0.1) - (0.1, -0.1)
    np.testing.assert_allclose(p.value, [0.75, 2.25])
    with pytest.raises(ValueError):
        nn.SGD([p], lr=0)


def test_fused_and_numpy_kernels_train_identically():
    """Same initial weights, same batches: both paths give the same losses and weights."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 10)).astype(np.float32)
    labels = rng.integers(0, 3, 64)

    def run(kernels):
        model = nn.Sequential([
            nn.Linear(10, 16, activation=nn.LeakyReLU(0.1), rng=7, kernels=kernels),
            nn.Linear(16, 16, activation=nn.PReLU(16), rng=8, kernels=kernels),
            nn.Linear(16, 16, activation=nn.ELU(), rng=9, kernels=kernels),
            nn.Linear(16, 3, rng=10, kernels=kernels),
        ])
        opt = nn.SGD(model.parameters(), lr=0.05)
        loss = nn.SoftmaxCrossEntropy()
        values = []
        for step in range(5):
            values.append(loss.forward(model.forward(x.copy()), labels))
            model.backward(loss.backward())
            opt.step()
        return values, [p.value for p in model.parameters()]

    fast_losses, fast_params = run("fastrelu")
    ref_losses, ref_params = run("numpy")
    np.testing.assert_allclose(fast_losses, ref_losses, rtol=1e-5)
    for a, b in zip(fast_params, ref_params):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_stats_are_tracked_per_activation():
    from fastrelu import DeadUnitTracker

    model = nn.Sequential([nn.Linear(4, 8, activation=nn.ReLU(), bias_init=-10.0, rng=0),
                           nn.Linear(8, 6, activation=nn.ReLU(), bias_init=0.1, rng=1),
                           nn.Linear(6, 2, rng=2)])
    model.track_stats()
    tracker = DeadUnitTracker()
    x = np.random.default_rng(6).standard_normal((32, 4)).astype(np.float32)
    model.forward(x)
    for name, act in model.activations():
        tracker.update(name, act.stats)
    report = tracker.end_epoch()
    assert report["hidden1"]["dead_fraction"] == 1.0  # a bias of -10 kills every unit
    assert report["hidden1"]["units"] == 8 and report["hidden2"]["units"] == 6


def test_bad_arguments():
    with pytest.raises(ValueError, match="kernels"):
        nn.ReLU(kernels="cuda-magic")
    with pytest.raises(ValueError, match="num_parameters"):
        nn.PReLU(0)
