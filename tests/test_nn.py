"""fastrelu.nn: every layer's backward against finite differences, the NumPy kernels path against
the fused one, the caller's arrays left alone, dtypes, train/eval, state round trips, the
optimizers against PyTorch's update rules, mini-batches, He initialization, the README example."""
import math
import pathlib
import re
import tracemalloc

import numpy as np
import pytest

from fastrelu import DeadUnitTracker, nn

# name -> activation for 7 units, given keyword arguments (dtype, kernels)
ACTIVATIONS = {
    "relu": lambda **kw: nn.ReLU(**kw),
    "leaky_relu": lambda **kw: nn.LeakyReLU(0.1, **kw),
    "leaky_negative": lambda **kw: nn.LeakyReLU(-0.2, **kw),
    "elu": lambda **kw: nn.ELU(0.7, **kw),
    "elu_negative": lambda **kw: nn.ELU(-0.4, **kw),
    "prelu_shared": lambda **kw: nn.PReLU(1, 0.25, **kw),
    "prelu_per_unit": lambda **kw: nn.PReLU(7, 0.3, **kw),
    "none": lambda **kw: None,
}
LAYER_ACTIVATIONS = [name for name in ACTIVATIONS if name != "none"]


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


def check_gradients(layer, x, g):
    """backward's input and parameter gradients against central differences of sum(g * y)."""
    loss = lambda: float((g * layer.forward(x)).sum())  # noqa: E731
    loss()
    dx = layer.backward(g)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-8)
    for name, p in layer.named_parameters():
        analytic = p.grad.copy()
        np.testing.assert_allclose(analytic, numeric_grad(loss, p.value), rtol=1e-5, atol=1e-8,
                                   err_msg=name)


# ---- gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("kernels", nn.KERNELS)
def test_linear_with_activation_matches_finite_differences(name, kernels):
    rng = np.random.default_rng(0)
    layer = nn.Linear(5, 7, activation=ACTIVATIONS[name](), bias_init=0.05, rng=1,
                      dtype=np.float64, kernels=kernels)
    x = away_from_kinks((4, 5), rng)
    # keep every pre-activation away from the kink at 0
    layer.bias.value[:] = 0.3 - (x @ layer.weight.value).mean(axis=0)
    check_gradients(layer, x, rng.standard_normal((4, 7)))


@pytest.mark.parametrize("name", LAYER_ACTIVATIONS)
def test_standalone_activation_layers(name):
    rng = np.random.default_rng(2)
    act = ACTIVATIONS[name](dtype=np.float64)
    check_gradients(act, away_from_kinks((6, 7), rng), rng.standard_normal((6, 7)))


@pytest.mark.parametrize("kernels", nn.KERNELS)
def test_model_of_separate_layers_matches_finite_differences(kernels):
    """Activations as layers of their own, several in a row (each must leave alone the output
    the one before keeps for its backward), PReLUs of both kinds, a float64 model built from
    layers given no dtype."""
    rng = np.random.default_rng(3)
    model = nn.Sequential([
        nn.Linear(5, 6, rng=4, kernels=kernels), nn.LeakyReLU(-0.3, kernels=kernels),
        nn.ReLU(kernels=kernels),
        nn.Linear(6, 6, activation=nn.PReLU(6, 0.2), rng=5, kernels=kernels),
        nn.ELU(0.5, kernels=kernels), nn.LeakyReLU(0.2, kernels=kernels),
        nn.PReLU(kernels=kernels),
        nn.Linear(6, 6, activation=nn.ELU(), rng=6, kernels=kernels),
        nn.LeakyReLU(0.3, kernels=kernels),
        nn.Linear(6, 3, rng=7, kernels=kernels)], dtype=np.float64)
    check_gradients(model, away_from_kinks((4, 5), rng), rng.standard_normal((4, 3)))


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
        opt = nn.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loss = nn.SoftmaxCrossEntropy()
        values = []
        for step in range(5):
            values.append(loss.forward(model.forward(x), labels))
            model.backward(loss.backward())
            opt.step()
        return values, [p.value for p in model.parameters()]

    fast_losses, fast_params = run("fastrelu")
    ref_losses, ref_params = run("numpy")
    np.testing.assert_allclose(fast_losses, ref_losses, rtol=1e-5)
    for a, b in zip(fast_params, ref_params):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ---- the caller's arrays ------------------------------------------------------------------------

def frozen(a):
    """A read-only copy: any write raises, and its values can be compared afterwards."""
    a = np.array(a)
    a.flags.writeable = False
    return a


# name -> (a new layer, its input's shape)
CALLER_CASES = {
    **{f"{name}-{kernels}": (lambda name=name, kernels=kernels:
                             ACTIVATIONS[name](kernels=kernels), (6, 7))
       for name in LAYER_ACTIVATIONS for kernels in nn.KERNELS},
    **{f"linear-{name}": (lambda name=name: nn.Linear(5, 7, activation=ACTIVATIONS[name](),
                                                      rng=0), (6, 5))
       for name in ACTIVATIONS},
    "model-starting-with-relu": (lambda: nn.Sequential([
        nn.ReLU(), nn.Linear(5, 4, rng=0), nn.LeakyReLU(0.1)]), (6, 5)),
    "model-ending-in-fused-elu": (lambda: nn.Sequential([
        nn.Linear(5, 4, rng=0), nn.PReLU(4), nn.Linear(4, 3, activation=nn.ELU(), rng=1)]),
        (6, 5)),
}


@pytest.mark.parametrize("case", list(CALLER_CASES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layers_never_modify_the_callers_arrays(case, mode):
    build, shape = CALLER_CASES[case]
    layer = build() if mode == "train" else build().eval()
    rng = np.random.default_rng(7)
    x = frozen(rng.standard_normal(shape).astype(np.float32))
    before = x.copy()
    y = layer.forward(x)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(y, build().forward(x.copy()))  # what a writable copy gives
    if mode == "train":
        g = frozen(rng.standard_normal(y.shape).astype(np.float32))
        g_before = g.copy()
        assert layer.backward(g).shape == x.shape
        np.testing.assert_array_equal(g, g_before)


def test_loss_state_and_batches_leave_the_callers_arrays_alone():
    rng = np.random.default_rng(8)
    logits, labels = frozen(rng.standard_normal((6, 3))), frozen(rng.integers(0, 3, 6))
    loss = nn.SoftmaxCrossEntropy()
    loss.forward(logits, labels)
    loss.backward()
    model = nn.Linear(3, 2, rng=0)
    state = {name: frozen(v) for name, v in nn.Linear(3, 2, rng=1).state_dict().items()}
    model.load_state_dict(state)
    saved = model.state_dict()
    saved["weight"][...] = 7  # a copy: the model is unaffected
    assert not (model.weight.value == 7).any()
    X, y = frozen(rng.standard_normal((10, 3))), frozen(np.arange(10))
    for xb, yb in nn.batches(X, y, 4, seed=0):
        model.forward(xb)


def test_inplace_overwrites_only_when_asked():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    relu = nn.ReLU(inplace=True)
    y = relu.forward(x)
    assert y is x and (x >= 0).all()
    g = rng.standard_normal((4, 5)).astype(np.float32)
    dx = relu.backward(g)
    assert dx is g
    # a model's inplace covers its entry; a float64 batch cast at the entry is the model's own
    model = nn.Sequential([nn.ReLU(), nn.Linear(5, 3, rng=0)], inplace=True)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    model.forward(x)
    assert (x >= 0).all()
    x64 = rng.standard_normal((4, 5))
    before = x64.copy()
    nn.Sequential([nn.ReLU(), nn.Linear(5, 3, rng=0)]).forward(x64)
    np.testing.assert_array_equal(x64, before)
    fused = nn.Linear(5, 3, activation=nn.ReLU(), rng=0, inplace=True)
    fused.weight.value[:, 0] = -1  # unit 0 is off for an input of ones
    fused.forward(np.ones((4, 5), np.float32))
    g = np.full((4, 3), 2.0, np.float32)
    fused.backward(g)
    assert (g[:, 0] == 0).all()  # the fused backward wrote its dz into g, as asked


def peak_bytes(call):
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("fused", [True, False])
def test_activations_inside_a_model_work_in_the_models_arrays(fused):
    """The hidden activation (256 x 2000 float32, 2 MB) is the only large array forward makes,
    and backward's only large arrays are the gradients of it and of the matrix product."""
    layers = [nn.Linear(50, 2000, activation=nn.ReLU(), rng=0)] if fused else \
        [nn.Linear(50, 2000, rng=0), nn.ReLU()]
    model = nn.Sequential(layers + [nn.Linear(2000, 10, rng=1)])
    x = np.random.default_rng(10).standard_normal((256, 50)).astype(np.float32)
    hidden = 256 * 2000 * 4
    assert peak_bytes(lambda: model.forward(x)) < 1.2 * hidden
    g = np.ones((256, 10), np.float32)
    assert peak_bytes(lambda: model.backward(g)) < 1.2 * hidden
    model.eval()
    negative = nn.Sequential([nn.Linear(50, 2000, rng=0), nn.LeakyReLU(-0.5)]).eval()
    assert peak_bytes(lambda: negative.forward(x)) < 1.2 * hidden  # in place: nothing kept


# ---- dtypes -------------------------------------------------------------------------------------

def digits_subset():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data[:400] / 16.0, digits.target[:400]  # float64 and int64, as sklearn gives


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_model_of_either_dtype_trains_on_float64_data(dtype):
    X, y = digits_subset()
    model = nn.Sequential([nn.Linear(64, 32, rng=0), nn.ReLU(), nn.Linear(32, 10, rng=1)],
                          dtype=dtype)
    loss, opt = nn.SoftmaxCrossEntropy(), nn.Adam(model.parameters(), lr=1e-2)
    first = loss.forward(model.forward(X), y)
    rng = np.random.default_rng(0)
    for _ in range(10):
        for xb, yb in nn.batches(X, y, 50, seed=rng):
            out = model.forward(xb)
            assert out.dtype == dtype
            loss.forward(out, yb)
            model.backward(loss.backward())
            opt.step()
    assert all(p.value.dtype == dtype for p in model.parameters())
    model.eval()
    assert loss.forward(model.forward(X), y) < first / 4
    assert (model.forward(X).argmax(axis=1) == y).mean() > 0.9


def test_one_dtype_per_model():
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    # given to the model: every layer takes it, exactly as if built with it
    model = nn.Sequential([nn.Linear(4, 5, activation=nn.PReLU(5, 0.3), rng=0), nn.PReLU(),
                           nn.Linear(5, 2, bias_init=0.1, rng=1)], dtype=np.float64)
    direct = nn.Sequential([nn.Linear(4, 5, activation=nn.PReLU(5, 0.3, dtype=f64), rng=0),
                            nn.PReLU(dtype=f64), nn.Linear(5, 2, bias_init=0.1, rng=1,
                                                           dtype=f64)])
    assert model.dtype == direct.dtype == f64
    for (name, a), (_, b) in zip(model.state_dict().items(), direct.state_dict().items()):
        assert a.dtype == f64 and np.array_equal(a, b), name
    assert model.layers[0].activation.weight.value[0] == 0.3  # not float32's 0.30000001
    # the first layer's dtype; its activation follows it
    linear = nn.Linear(3, 4, dtype=np.float64, activation=nn.PReLU())
    assert linear.activation.weight.value.dtype == f64
    assert linear.forward(np.arange(6).reshape(2, 3)).dtype == f64  # integers cast too
    assert nn.Sequential([nn.ReLU(), nn.Linear(3, 2, dtype="float64")]).dtype == f64
    # no dtype anywhere: float32, and a float64 input or a list is cast at the entry
    plain = nn.Linear(3, 2, rng=0)
    assert plain.dtype == f32 and plain.forward(np.ones((2, 3))).dtype == f32
    assert nn.Sequential([nn.ReLU()]).forward([[1, -2]]).tolist() == [[1, 0]]
    # an activation on its own computes in its input's float dtype
    relu = nn.ReLU()
    for dtype in (np.float16, np.float32, np.float64):
        assert relu.forward(np.ones(3, dtype)).dtype == dtype
    assert relu.forward(np.arange(3)).dtype == relu.forward([0.5]).dtype == f64
    with pytest.raises(ValueError, match="layer 1 was given dtype float64, but the model "
                                         "computes in float32"):
        nn.Sequential([nn.Linear(3, 4, dtype=np.float32), nn.Linear(4, 2, dtype=np.float64)])
    with pytest.raises(ValueError, match="layer 0 was given dtype float32"):
        nn.Sequential([nn.Linear(3, 4, activation=nn.PReLU(dtype=np.float32))], dtype=f64)
    with pytest.raises(ValueError, match="float32 or float64, not float16"):
        nn.Linear(3, 4, dtype=np.float16)
    with pytest.raises(TypeError, match="dtype must be"):
        nn.ReLU(dtype="no-such-type")
    for bad in (np.ones((2, 3), complex), np.ones((2, 3), bool)):
        with pytest.raises(TypeError, match=f"x has dtype {bad.dtype}; fastrelu.nn takes "
                                            "integers or floats"):
            plain.forward(bad)
    with pytest.raises(TypeError, match="x must contain real numbers"):
        plain.forward([["a", "b", "c"]])
    with pytest.raises(TypeError, match="masked array"):
        plain.forward(np.ma.masked_array(np.ones((2, 3))))


# ---- train and eval -----------------------------------------------------------------------------

def stats_model():
    return nn.Sequential([nn.Linear(4, 8, activation=nn.ReLU(), bias_init=0.1, rng=0),
                          nn.Linear(8, 6, rng=1), nn.LeakyReLU(-0.5), nn.PReLU(6),
                          nn.Linear(6, 2, rng=2)])


def test_eval_leaves_caches_and_stats_alone():
    rng = np.random.default_rng(11)
    x1, x2 = rng.standard_normal((5, 4)), rng.standard_normal((7, 4))
    g = rng.standard_normal((5, 2)).astype(np.float32)
    reference = stats_model()
    reference.forward(x1)
    reference.backward(g)

    model = stats_model()
    model.track_stats()
    model.forward(x1)
    stats = [act.stats for _, act in model.activations()]
    assert all(s is not None for s in stats)
    assert model.eval() is model and not model.training
    np.testing.assert_array_equal(model.forward(x2), stats_model().forward(x2))
    assert [act.stats for _, act in model.activations()] == stats  # the same objects
    model.backward(g)  # from the training forward's cache, untouched by the eval one
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        np.testing.assert_array_equal(a.grad, b.grad, err_msg=name)

    model.eval(track_stats=True)
    model.forward(x2)
    assert all(act.stats is not s and act.stats.per_unit == 7
               for (_, act), s in zip(model.activations(), stats))
    with pytest.raises(RuntimeError, match="needs a forward in training mode"):
        model.backward(g)  # the cache went with the backward before; eval kept none
    assert model.train() is model and model.training
    model.forward(x1)
    model.backward(g)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        model.backward(g)


def test_stats_are_tracked_per_activation():
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
    assert [name for name, _ in stats_model().activations()] == ["hidden1", "hidden2",
                                                                 "hidden3"]


# ---- state --------------------------------------------------------------------------------------

def state_model(seed=0, dtype=None):
    return nn.Sequential([nn.Linear(4, 5, activation=nn.PReLU(5), rng=seed), nn.ReLU(),
                          nn.PReLU(), nn.Linear(5, 3, rng=seed + 1)], dtype=dtype)


def test_state_round_trips_through_npz(tmp_path):
    model = state_model()
    assert list(model.state_dict()) == ["0.weight", "0.bias", "0.activation.weight",
                                        "2.weight", "3.weight", "3.bias"]
    model.layers[2].weight.value[:] = 0.6  # not the initial value
    path = tmp_path / "model.npz"
    np.savez(path, **model.state_dict())
    x = np.random.default_rng(12).standard_normal((3, 4))
    expected = model.eval().forward(x)
    with open(path, "rb") as file, np.load(path, allow_pickle=False) as archive:
        for source in (str(path), path, file, archive):
            other = state_model(seed=5)
            values = [p.value for p in other.parameters()]
            other.load_state_dict(source)
            np.testing.assert_array_equal(other.eval().forward(x), expected)
            assert all(p.value is v for p, v in zip(other.parameters(), values))  # in place


def test_load_state_dict_refuses_a_mismatch(tmp_path):
    model = state_model()
    before = model.state_dict()
    good = state_model(seed=3).state_dict()

    def refused(state, *messages, error=ValueError):
        with pytest.raises(error) as info:
            model.load_state_dict(state)
        for message in messages:
            assert message in str(info.value)
        for name, value in model.state_dict().items():
            np.testing.assert_array_equal(value, before[name])  # nothing loaded

    refused({k: v for k, v in good.items() if k != "2.weight"}, "missing '2.weight'")
    refused({**good, "4.weight": np.ones(2, np.float32)}, "unexpected '4.weight'")
    refused({**good, "3.bias": np.ones(4, np.float32)},
            "'3.bias' is float32 (4,), the model's is float32 (3,)")
    refused(state_model(dtype=np.float64).state_dict(),
            "'0.weight' is float64 (4, 5), the model's is float32 (4, 5)")
    refused([("0.weight", 1)], "mapping", error=TypeError)
    np.save(tmp_path / "one.npy", np.ones(3))
    refused(tmp_path / "one.npy", ".npy file")


# ---- optimizers ---------------------------------------------------------------------------------

# a small least-squares problem: 0.5 * |X w + b - T|^2 / 8, from w0, b0
_rng = np.random.default_rng(0)
LSQ_X, LSQ_T = _rng.standard_normal((8, 3)), _rng.standard_normal((8, 2))
LSQ_W, LSQ_B = _rng.standard_normal((3, 2)), _rng.standard_normal(2)


def lsq_grads(w, b):
    residual = (LSQ_X @ w + b - LSQ_T) / 8
    return LSQ_X.T @ residual, residual.sum(axis=0)


def reference_optimizer(steps, lr, weight_decay=0.0, betas=None, eps=1e-8, decoupled=False,
                        momentum=0.0, dampening=0.0, nesterov=False):
    """The update rules of PyTorch's documentation (torch.optim.Adam, AdamW, SGD), written
    independently of fastrelu.nn: w, b after `steps` steps on the least-squares problem."""
    params = [LSQ_W.copy(), LSQ_B.copy()]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    buf = [None, None]
    for t in range(1, steps + 1):
        for i, (p, g) in enumerate(zip(params, lsq_grads(*params))):
            if decoupled:
                p = p - lr * weight_decay * p
            else:
                g = g + weight_decay * p
            if betas:
                m[i] = betas[0] * m[i] + (1 - betas[0]) * g
                v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
                m_hat, v_hat = m[i] / (1 - betas[0] ** t), v[i] / (1 - betas[1] ** t)
                params[i] = p - lr * m_hat / (np.sqrt(v_hat) + eps)
                continue
            if momentum:
                buf[i] = g if buf[i] is None else momentum * buf[i] + (1 - dampening) * g
                g = g + momentum * buf[i] if nesterov else buf[i]
            params[i] = p - lr * g
    return np.concatenate([params[0].ravel(), params[1]])


# name -> (fastrelu.nn optimizer, reference settings, w and b after 20 steps from PyTorch 2.x)
OPTIMIZERS = {
    "adam": (lambda p: nn.Adam(p, lr=0.1, weight_decay=0.05),
             dict(lr=0.1, weight_decay=0.05, betas=(0.9, 0.999)),
             [0.118471479133, 0.068659888955, -0.075610284984, -0.641508352677, 1.153116248947,
              -0.253525874205, -0.138616350608, 0.188898703743]),
    "adamw": (lambda p: nn.AdamW(p, lr=0.1, weight_decay=0.05),
              dict(lr=0.1, weight_decay=0.05, betas=(0.9, 0.999), decoupled=True),
              [0.121135505615, 0.080668888244, -0.070589720022, -0.668226351378,
               1.162355728952, -0.308605771732, -0.163632382163, 0.113120435715]),
    "sgd": (lambda p: nn.SGD(p, lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.05),
            dict(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.05),
            [-0.068532760654, 0.334885704481, -0.148226901565, -0.375827641676, 0.525655630751,
             -0.316783519168, 0.003485419966, 0.18289188332]),
    "nesterov": (lambda p: nn.SGD(p, lr=0.1, momentum=0.8, nesterov=True),
                 dict(lr=0.1, momentum=0.8, nesterov=True),
                 [0.054462006247, 0.33128161076, -0.115244341428, -0.49096871593, 0.498045653672,
                  -0.531069007502, -0.038872982696, 0.188295736724]),
}


def run_optimizer(make, steps=20):
    w, b = nn.Parameter(LSQ_W.copy()), nn.Parameter(LSQ_B.copy())
    opt = make([w, b])
    for _ in range(steps):
        w.grad[...], b.grad[...] = lsq_grads(w.value, b.value)
        opt.step()
        assert not w.grad.any() and not b.grad.any()  # step() clears them
    return np.concatenate([w.value.ravel(), b.value])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizers_follow_pytorchs_update_rules(name):
    make, settings, pytorch = OPTIMIZERS[name]
    np.testing.assert_allclose(reference_optimizer(20, **settings), pytorch, rtol=0, atol=1e-11)
    np.testing.assert_allclose(run_optimizer(make), pytorch, rtol=0, atol=1e-11)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizers_match_pytorch(name):
    torch = pytest.importorskip("torch")
    w = torch.tensor(LSQ_W, requires_grad=True)
    b = torch.tensor(LSQ_B, requires_grad=True)
    settings = {k: v for k, v in OPTIMIZERS[name][1].items() if k not in ("betas", "decoupled")}
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(name, torch.optim.SGD)
    opt = kind([w, b], **settings)
    for _ in range(20):
        opt.zero_grad()
        loss = 0.5 * ((torch.tensor(LSQ_X) @ w + b - torch.tensor(LSQ_T)) ** 2).sum() / 8
        loss.backward()
        opt.step()
    ours = run_optimizer(OPTIMIZERS[name][0])
    np.testing.assert_allclose(ours, np.concatenate([w.detach().numpy().ravel(),
                                                     b.detach().numpy()]), rtol=0, atol=1e-6)


def test_a_model_trained_with_adam_matches_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    x, labels = rng.standard_normal((16, 5)), rng.integers(0, 3, 16)
    model = nn.Sequential([nn.Linear(5, 8, rng=0), nn.LeakyReLU(0.1),
                           nn.Linear(8, 3, activation=nn.ELU(), rng=1), nn.Linear(3, 3, rng=2)],
                          dtype=np.float64)
    twin = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.LeakyReLU(0.1),
                               torch.nn.Linear(8, 3), torch.nn.ELU(),
                               torch.nn.Linear(3, 3)).double()
    with torch.no_grad():
        for ours, theirs in zip([model.layers[0], model.layers[2], model.layers[3]],
                                [twin[0], twin[2], twin[4]]):
            theirs.weight.copy_(torch.tensor(ours.weight.value.T))
            theirs.bias.copy_(torch.tensor(ours.bias.value))
    loss, opt = nn.SoftmaxCrossEntropy(), nn.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
    torch_opt = torch.optim.Adam(twin.parameters(), lr=0.01, weight_decay=0.1)
    for _ in range(5):
        value = loss.forward(model.forward(x), labels)
        model.backward(loss.backward())
        opt.step()
        torch_opt.zero_grad()
        torch_loss = torch.nn.functional.cross_entropy(twin(torch.tensor(x)),
                                                       torch.tensor(labels))
        torch_loss.backward()
        torch_opt.step()
        assert value == pytest.approx(torch_loss.item(), abs=1e-9)
    np.testing.assert_allclose(model.layers[0].weight.value, twin[0].weight.detach().numpy().T,
                               rtol=0, atol=1e-6)


def test_optimizer_hand_worked_steps():
    p = nn.Parameter(np.array([1.0, 2.0]))
    opt = nn.SGD([p], lr=0.1, momentum=0.5)
    p.grad[:] = [1.0, -1.0]
    opt.step()
    assert p.value.tolist() == [0.9, 2.1] and p.grad.tolist() == [0.0, 0.0]
    p.grad[:] = [1.0, -1.0]
    opt.step()  # buffer = 0.5 * (1, -1) + (1, -1)
    np.testing.assert_allclose(p.value, [0.75, 2.25])
    # Adam's first step moves each weight by lr against the gradient's sign, whatever its size
    q = nn.Parameter(np.array([1.0, 2.0], np.float32))
    adam = nn.Adam([q], lr=0.1)
    q.grad[:] = [0.5, -300.0]
    adam.step()
    np.testing.assert_allclose(q.value, [0.9, 2.1], rtol=1e-6)
    assert q.value.dtype == np.float32


@pytest.mark.parametrize("make", [lambda p: nn.Adam(p, weight_decay=0.1),
                                  lambda p: nn.AdamW(p),
                                  lambda p: nn.SGD(p, lr=0.1, momentum=0.9, dampening=0.1,
                                                   weight_decay=0.1, nesterov=False)])
def test_optimizer_steps_allocate_nothing_large(make):
    p = nn.Parameter(np.ones(1_000_000, np.float32))
    opt = make([p])
    p.grad[:] = 0.5
    opt.step()  # SGD's momentum buffer is made here
    p.grad[:] = 0.5
    assert peak_bytes(opt.step) < 100_000  # the parameter is 4 MB


def test_optimizer_arguments_are_checked():
    p = nn.Parameter(np.zeros(2))
    for make, error, message in [
        (lambda: nn.SGD([p], lr=0), ValueError, "lr must be > 0"),
        (lambda: nn.SGD([p], lr="0.1"), TypeError, "lr must be a real number"),
        (lambda: nn.SGD([p], momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
        (lambda: nn.SGD([p], nesterov=True), ValueError, "nesterov needs momentum > 0"),
        (lambda: nn.SGD([p], nesterov="yes"), TypeError, "nesterov must be True or False"),
        (lambda: nn.SGD([p], nesterov=2), ValueError, r"nesterov must be True or False \(or 0 or 1\)"),
        (lambda: nn.Adam([p], betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be in"),
        (lambda: nn.Adam([p], betas=0.9), TypeError, "betas must be a pair"),
        (lambda: nn.Adam([p], eps=-1), ValueError, "eps must be >= 0"),
        (lambda: nn.AdamW([p], weight_decay=-0.1), ValueError, "weight_decay must be >= 0"),
        (lambda: nn.Adam([]), ValueError, "parameters is empty"),
        (lambda: nn.Adam([p, p]), ValueError, "twice"),
        (lambda: nn.Adam([np.zeros(2)]), TypeError, r"parameters\[0\] is a ndarray"),
        (lambda: nn.Adam(3), TypeError, "iterable of Parameter"),
        (lambda: nn.Parameter([1.0]), TypeError, "float32 or float64 NumPy array"),
    ]:
        with pytest.raises(error, match=message):
            make()


# ---- mini-batches -------------------------------------------------------------------------------

def test_batches():
    X, y = np.arange(20).reshape(10, 2), np.arange(10)
    shuffled = list(nn.batches(X, y, 4, seed=1))
    assert [len(yb) for _, yb in shuffled] == [4, 4, 2]
    order = np.concatenate([yb for _, yb in shuffled])
    assert sorted(order) == list(range(10)) and list(order) != list(range(10))
    for xb, yb in shuffled:
        np.testing.assert_array_equal(xb, X[yb])  # rows stay together
    again = np.concatenate([yb for _, yb in nn.batches(X, y, 4, seed=1)])
    np.testing.assert_array_equal(again, order)
    rng = np.random.default_rng(1)
    epochs = [np.concatenate([yb for _, yb in nn.batches(X, y, 4, seed=rng)]) for _ in range(2)]
    assert not np.array_equal(*epochs)  # one Generator: a new order each epoch
    in_order = list(nn.batches(X, y, np.int64(3), shuffle=False))
    assert [yb.tolist() for _, yb in in_order] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert np.shares_memory(in_order[0][0], X)  # views, no copies
    for args, kwargs, error, message in [
        ((X, y[:9], 4), {}, ValueError, "X has 10 rows but y has 9"),
        ((X, y, 0), {}, ValueError, "size must be a positive integer"),
        ((X, y, True), {}, TypeError, "size must be an integer, not bool"),
        ((X, y, 4), {"shuffle": "yes"}, TypeError, "shuffle must be True or False"),
        ((X, y, 4), {"seed": "abc"}, TypeError, "seed must be None"),
        ((X, y, 4), {"seed": -1}, ValueError, "seed must be None"),
        ((np.float64(1), y, 4), {}, ValueError, "at least one dimension"),
    ]:
        with pytest.raises(error, match=message):
            nn.batches(*args, **kwargs)  # refused at the call, not at the first batch


# ---- initialization -----------------------------------------------------------------------------

GAINS = {
    "relu": math.sqrt(2), "leaky_relu": math.sqrt(2 / 1.01), "leaky_negative": math.sqrt(2 / 1.04),
    "elu": math.sqrt(2), "elu_negative": math.sqrt(2), "prelu_shared": math.sqrt(2 / 1.0625),
    "prelu_per_unit": math.sqrt(2 / 1.09), "none": 1.0,
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_he_initialization_for_every_placement(name, dtype):
    n_in, n_out = (4000, 7) if name == "prelu_per_unit" else (400, 300)
    own = nn.Linear(n_in, n_out, activation=ACTIVATIONS[name](), rng=3, dtype=dtype)
    after = [] if name == "none" else [ACTIVATIONS[name]()]
    placements = {
        "own activation": own,
        "followed in a model": nn.Sequential([nn.Linear(n_in, n_out, rng=3)] + after,
                                             dtype=dtype).layers[0],
        "then a Linear": nn.Sequential([nn.Linear(n_in, n_out, rng=3)] + after +
                                       [nn.Linear(n_out, 2)], dtype=dtype).layers[0],
    }
    std = GAINS[name] / math.sqrt(n_in)
    for placement, layer in placements.items():
        w = layer.weight.value
        assert w.dtype == dtype
        np.testing.assert_array_equal(w, own.weight.value, err_msg=placement)
        assert w.std() == pytest.approx(std, rel=0.02), placement
        assert abs(w.mean()) < 0.02 * std, placement


def test_gain_one_without_an_activation_after():
    for model in (nn.Sequential([nn.Linear(400, 300, rng=3), nn.Linear(300, 2)]),
                  nn.Sequential([nn.ReLU(), nn.Linear(400, 300, rng=3)])):
        linear = next(layer for layer in model.layers if isinstance(layer, nn.Linear))
        assert linear.weight.value.std() == pytest.approx(1 / math.sqrt(400), rel=0.02)


def test_placement_keeps_weights_that_were_set_or_trained():
    edited = nn.Linear(4, 3, rng=0)
    edited.weight.value[:] = 0.5
    nn.Sequential([edited, nn.ReLU()])
    assert (edited.weight.value == 0.5).all()
    ran = nn.Linear(4, 3, rng=0)
    ran.forward(np.ones((1, 4)))
    before = ran.weight.value.copy()
    nn.Sequential([ran, nn.ReLU()], dtype=np.float64)
    assert ran.weight.value.dtype == np.float64
    np.testing.assert_array_equal(ran.weight.value, before.astype(np.float64))


# ---- arguments ----------------------------------------------------------------------------------

def test_layer_arguments_are_checked():
    assert nn.PReLU(np.int64(3)).weight.value.shape == (3,)
    assert nn.ReLU(inplace=np.bool_(True)).inplace is True
    x, shared_relu = np.ones((2, 3)), nn.ReLU()
    for make, error, message in [
        (lambda: nn.PReLU(0), ValueError, "num_parameters must be a positive integer, got 0"),
        (lambda: nn.PReLU(True), TypeError, "num_parameters must be an integer, not bool"),
        (lambda: nn.PReLU(2.5), TypeError, "num_parameters must be an integer, not float"),
        (lambda: nn.PReLU(init="a"), TypeError, "init must be a real number"),
        (lambda: nn.LeakyReLU(float("nan")), ValueError, "negative_slope must be finite"),
        (lambda: nn.ELU(alpha=None), TypeError, "alpha must be a real number"),
        (lambda: nn.ReLU(kernels="cuda-magic"), ValueError, "kernels"),
        (lambda: nn.ReLU(inplace="yes"), TypeError, "inplace must be True or False"),
        (lambda: nn.ReLU(track_stats=None), TypeError, "track_stats must be True or False"),
        (lambda: nn.Linear(0, 3), ValueError, "in_features must be a positive integer"),
        (lambda: nn.Linear(3, "4"), TypeError, "out_features must be an integer, not str"),
        (lambda: nn.Linear(3, 4, activation="relu"), TypeError, "activation must be a ReLU"),
        (lambda: nn.Linear(3, 4, bias_init=[0.1]), TypeError, "bias_init must be a real"),
        (lambda: nn.Linear(3, 4, rng="seed"), TypeError, "rng must be None"),
        (lambda: nn.Linear(3, 4, rng=True), TypeError, "rng must be None"),
        (lambda: nn.Sequential([]), ValueError, "layers is empty"),
        (lambda: nn.Sequential(5), TypeError, "layers must be a list"),
        (lambda: nn.Sequential([nn.ReLU(), nn.SoftmaxCrossEntropy()]), TypeError,
         r"layers\[1\] is a SoftmaxCrossEntropy, not a layer"),
        (lambda: nn.Sequential([shared_relu, nn.Linear(3, 3, activation=shared_relu)]),
         ValueError, "layer 1.activation is the same object as layer 0"),
        (lambda: nn.Linear(3, 4).forward(np.ones((2, 5))), ValueError,
         r"x has shape \(2, 5\), but Linear\(3, 4, dtype=float32\) takes \(batch, 3\)"),
        (lambda: nn.Linear(3, 4).backward(np.ones((2, 4))), RuntimeError,
         "needs a forward in training mode"),
        (lambda: nn.ReLU().train("no"), TypeError, "mode must be True or False"),
        (lambda: nn.ReLU().eval(track_stats=None), TypeError, "track_stats must be True"),
    ]:
        with pytest.raises(error, match=message):
            make()
    relu = nn.ReLU()
    relu.forward(x)
    with pytest.raises(ValueError, match=r"grad has shape \(3, 2\) but the forward's output "
                                         r"had shape \(2, 3\)"):
        relu.backward(np.ones((3, 2)))


def test_loss_arguments_are_checked():
    loss, logits = nn.SoftmaxCrossEntropy(), np.zeros((3, 4))
    with pytest.raises(RuntimeError, match="needs a forward first"):
        loss.backward()
    for labels, error, message in [
        (np.array([0.0, 1.0, 2.0]), TypeError, "labels must be integers, not float64"),
        (np.array([0, 1]), ValueError, r"labels must have shape \(3,\)"),
        (np.array([0, 4, 1]), ValueError, r"labels must lie in 0..3"),
        (np.array([0, -1, 1]), ValueError, r"labels must lie in 0..3"),
    ]:
        with pytest.raises(error, match=message):
            loss.forward(logits, labels)
    with pytest.raises(ValueError, match=r"logits must have shape \(N, classes\)"):
        loss.forward(np.zeros(3), np.array([0, 1, 2]))


# ---- the README ---------------------------------------------------------------------------------

def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"<!-- nn-example -->\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md (nn example)", "exec"), namespace)
    assert namespace["accuracy"] > 0.9
    assert (tmp_path / "digits-mlp.npz").exists()


def test_linear_with_prelu_is_fused_and_matches_the_unfused_layers():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 6))
    grad = rng.standard_normal((32, 5))
    results = []
    for kernels in ("fastrelu", "numpy"):
        layer = nn.Linear(6, 5, activation=nn.PReLU(5, 0.3), rng=1, dtype=np.float64,
                          kernels=kernels)
        assert layer.fused == (kernels == "fastrelu")
        y = layer.forward(x)
        g = grad.copy()
        dx = layer.backward(g)
        np.testing.assert_array_equal(g, grad)  # the caller's gradient is left alone
        results.append((y, dx, layer.weight.grad.copy(), layer.bias.grad.copy(),
                        layer.activation.weight.grad.copy()))
    for fused, unfused in zip(*results):
        np.testing.assert_allclose(fused, unfused, rtol=1e-12, atol=1e-12)
