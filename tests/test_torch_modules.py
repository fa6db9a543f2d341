"""fastrelu.torch's modules, convert() and the statistics against torch.nn: identity, repr,
state_dict, training to the same weights, torch.compile(fullgraph=True) and torch.export."""
import copy
import pickle

import numpy as np
import pytest

import fastrelu

torch = pytest.importorskip("torch")
frt = pytest.importorskip("fastrelu.torch")
nn = torch.nn


@pytest.fixture
def always_fastrelu(monkeypatch):
    for table in frt.CROSSOVER.values():
        for op in table:
            monkeypatch.setitem(table, op, 0)


PAIRS = [(nn.ReLU, frt.ReLU), (nn.LeakyReLU, frt.LeakyReLU), (nn.PReLU, frt.PReLU),
         (nn.ELU, frt.ELU)]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.PReLU(4)])
        self.heads = nn.ModuleDict({"a": nn.Sequential(nn.Conv2d(4, 4, 1), nn.LeakyReLU(0.2)),
                                    "b": nn.ELU(0.5)})
        self.act = nn.ReLU()

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.act(self.heads["b"](self.heads["a"](x)))


class SmallCNN(nn.Module):
    """conv -> PReLU -> conv -> LeakyReLU(inplace) -> ELU -> conv -> ReLU(inplace) -> linear
    (ELU left out with elu=False)."""

    def __init__(self, channels=4, elu=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.act1 = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act2 = nn.LeakyReLU(0.1, inplace=True)
        self.act3 = nn.ELU() if elu else nn.Identity()
        self.conv3 = nn.Conv2d(channels, channels, 1)
        self.act4 = nn.ReLU(inplace=True)
        self.head = nn.Linear(channels * 8 * 8, 3)

    def forward(self, x):
        h = self.act3(self.act2(self.conv2(self.act1(self.conv1(x)))))
        return self.head(self.act4(self.conv3(h)).flatten(1))


@pytest.mark.parametrize("torch_cls,fast_cls", PAIRS)
def test_modules_are_the_torch_classes(torch_cls, fast_cls):
    m = fast_cls()
    assert isinstance(m, torch_cls)
    assert repr(m) == repr(torch_cls())
    assert list(m.state_dict()) == list(torch_cls().state_dict())
    assert "track_stats=True" in repr(fast_cls(track_stats=True))


def test_constructor_arguments_are_torch_s():
    assert frt.LeakyReLU(0.2, True).negative_slope == 0.2 and frt.LeakyReLU(0.2, True).inplace
    assert frt.ELU(0.5).alpha == 0.5 and frt.ReLU(True).inplace
    p = frt.PReLU(8, 0.1, dtype=torch.float64)
    assert p.weight.shape == (8,) and p.weight.dtype == torch.float64
    assert torch.equal(p.weight, torch.full((8,), 0.1, dtype=torch.float64))


def test_convert_nested_model_keeps_everything():
    torch.manual_seed(0)
    model = Block().double()
    prelu = model.layers[1]
    weight = prelu.weight
    hook_calls = []
    prelu.register_forward_hook(lambda *args: hook_calls.append(1))
    before = copy.deepcopy(model.state_dict())
    assert frt.convert(model) is model
    assert type(model.layers[1]) is frt.PReLU and model.layers[1] is prelu
    assert type(model.heads["a"][1]) is frt.LeakyReLU and model.heads["a"][1].negative_slope == 0.2
    assert type(model.heads["b"]) is frt.ELU and model.heads["b"].alpha == 0.5
    assert type(model.act) is frt.ReLU
    assert prelu.weight is weight and weight.dtype == torch.float64
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    model(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert hook_calls == [1]


def test_convert_leaves_other_modules_and_subclasses_alone():
    class MyReLU(nn.ReLU):
        pass

    model = nn.Sequential(MyReLU(), nn.GELU(), nn.ReLU6())
    frt.convert(model)
    assert [type(m) for m in model] == [MyReLU, nn.GELU, nn.ReLU6]
    assert type(frt.convert(nn.PReLU())) is frt.PReLU  # the root itself
    with pytest.raises(TypeError, match="torch.nn.Module"):
        frt.convert("model")


def test_torch_checkpoint_loads_into_a_converted_model(tmp_path):
    torch.manual_seed(0)
    native = Block()
    with torch.no_grad():
        native.layers[1].weight.uniform_(-1, 1)
    torch.save(native.state_dict(), tmp_path / "ckpt.pt")
    converted = frt.convert(Block())
    converted.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    assert torch.equal(converted.layers[1].weight, native.layers[1].weight)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(converted(x), native(x), rtol=1e-6, atol=1e-7)
    # and back: a converted model's checkpoint loads into a torch one
    torch.save(converted.state_dict(), tmp_path / "back.pt")
    Block().load_state_dict(torch.load(tmp_path / "back.pt"))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_converted_model_trains_to_the_same_weights(always_fastrelu, channels_last):
    """Bit for bit in float32 through ReLU, Leaky ReLU and PReLU, except the PReLU weight
    gradient, which fastrelu sums in float64 where PyTorch sums in float32: with PReLU's
    weight frozen, identical weights; with it trained, equal within float32 rounding (and so
    with ELU, within 4 ulp of PyTorch's)."""
    def train(convert, freeze_prelu, elu=False):
        torch.manual_seed(0)
        model = SmallCNN(elu=elu)
        if convert:
            frt.convert(model)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.act1.weight.requires_grad_(not freeze_prelu)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                              momentum=0.9)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randn(8, 3, 8, 8, generator=gen)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            y = torch.randint(0, 3, (8,), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return model.state_dict()

    for freeze, elu in ((True, False), (False, False), (False, True)):
        fast, native = train(True, freeze, elu), train(False, freeze, elu)
        for k in native:
            if freeze:
                assert torch.equal(fast[k], native[k]), k
            else:
                torch.testing.assert_close(fast[k], native[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_modules_in_other_dtypes(always_fastrelu, dtype):
    torch.manual_seed(0)
    native = Block().to(dtype)
    converted = frt.convert(copy.deepcopy(native))
    x = torch.randn(2, 3, 5, 5, dtype=dtype)
    assert torch.equal(converted(x), native(x))


# ---- statistics ---------------------------------------------------------------------------------


def positive_per_channel(x):
    return (x > 0).sum(dim=[d for d in range(x.dim()) if d != 1]).numpy()


@pytest.mark.parametrize("fast_cls", [frt.ReLU, frt.LeakyReLU, frt.ELU, frt.PReLU])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_track_stats_counts_positive_inputs_per_channel(fast_cls, channels_last):
    x = torch.randn(4, 5, 3, 2)
    x[:, 2] = -1.0  # a dead channel
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    m = fast_cls(track_stats=True)
    assert m.stats is None
    y = m(x)  # small: still counted by the kernels, below the crossover
    assert isinstance(m.stats, fastrelu.ActivationStats)
    np.testing.assert_array_equal(m.stats.positive, positive_per_channel(x))
    assert m.stats.per_unit == 4 * 3 * 2
    assert m.stats.dead.tolist() == [False, False, True, False, False]
    native = {frt.ReLU: nn.ReLU, frt.LeakyReLU: nn.LeakyReLU, frt.ELU: nn.ELU,
              frt.PReLU: nn.PReLU}[fast_cls]()
    torch.testing.assert_close(y, native(x), rtol=4e-7, atol=0)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_stats_with_autograd_and_in_place():
    x = torch.randn(3, 4, requires_grad=True)
    m = frt.LeakyReLU(0.1, inplace=True, track_stats=True)
    h = x * 1
    y = m(h)
    assert y is h
    np.testing.assert_array_equal(m.stats.positive, positive_per_channel(x.detach()))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.where(x > 0, 1.0, 0.1))


def test_stats_are_off_by_default_and_refuse_what_the_kernels_cannot_take(monkeypatch):
    m = frt.ReLU()
    calls = []
    monkeypatch.setattr(fastrelu.torch.fastrelu, "relu",
                        lambda *a, **k: calls.append(k.get("stats")))
    m(torch.randn(3))  # below the crossover: PyTorch's kernel, no statistics
    assert m.stats is None and calls == []
    with pytest.raises(TypeError, match="track_stats=True"):
        frt.ReLU(track_stats=True)(torch.tensor([1, -1]))


def test_track_feeds_a_dead_unit_tracker():
    torch.manual_seed(0)
    model = frt.convert(Block())
    tracker = fastrelu.DeadUnitTracker()
    names = frt.track(model, tracker)
    assert names == ["layers.1", "heads.a.1", "heads.b", "act"]
    batches = [torch.randn(2, 3, 5, 5) for _ in range(3)]
    expected = 0
    for x in batches:
        model(x)
        expected += positive_per_channel(model.layers[0](x).detach())
    assert tracker.stats("layers.1").per_unit == 3 * 2 * 25
    np.testing.assert_array_equal(tracker.stats("layers.1").positive, expected)
    report = tracker.end_epoch()
    assert set(report) == set(names) and report["act"]["batches"] == 3
    frt.track(model, None)
    model(batches[0])
    assert tracker.layers == []
    with pytest.raises(TypeError, match="DeadUnitTracker"):
        frt.track(model, {})
    with pytest.raises(ValueError, match="convert"):
        frt.track(nn.Linear(2, 2), tracker)


# ---- torch.compile and torch.export -------------------------------------------------------------


def graph_recorder(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def fastrelu_targets(graphs):
    return {str(n.target) for g in graphs for n in g.graph.nodes
            if n.op == "call_function" and "fastrelu" in str(n.target)}


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_compile_fullgraph(always_fastrelu, channels_last):
    torch.manual_seed(0)
    native = SmallCNN()
    converted = frt.convert(copy.deepcopy(native))
    x = torch.randn(4, 3, 8, 8)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    graphs = []
    compiled = torch.compile(converted, fullgraph=True, backend=graph_recorder(graphs))
    torch._dynamo.reset()
    out = compiled(x)
    out.sum().backward()
    assert fastrelu_targets(graphs) == {"fastrelu.prelu.default", "fastrelu.leaky_relu.default",
                                        "fastrelu.elu.default", "fastrelu.relu.default"}
    ref = native(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(converted.named_parameters(), native.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compile_with_inductor_and_statistics():
    torch.manual_seed(0)
    model = frt.convert(SmallCNN())
    model.act1.track_stats = True
    x = torch.randn(4, 3, 8, 8)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model.act1.stats.positive,
                                  positive_per_channel(model.conv1(x).detach()))
    # a tracker is fed from inside the compiled graph, in the same pass
    tracker = fastrelu.DeadUnitTracker()
    frt.track(model, tracker)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    for _ in range(2):
        compiled(x).sum().backward()
    np.testing.assert_array_equal(tracker.stats("act1").positive,
                                  2 * positive_per_channel(model.conv1(x).detach()))
    report = tracker.end_epoch()
    assert {name: r["batches"] for name, r in report.items()} == \
        {"act1": 2, "act2": 2, "act3": 2, "act4": 2}


def test_compile_inplace_without_grad(always_fastrelu):
    x = torch.randn(3, 4)
    expected = torch.nn.functional.leaky_relu(x, 0.3)
    graphs = []
    fn = torch.compile(lambda t: frt.leaky_relu(t, 0.3, inplace=True), fullgraph=True,
                       backend=graph_recorder(graphs))
    torch._dynamo.reset()
    with torch.no_grad():
        y = fn(x)
    assert torch.equal(x, expected) and torch.equal(y, expected)
    assert fastrelu_targets(graphs) == {"fastrelu.leaky_relu_.default"}


@pytest.mark.parametrize("module", [nn.LeakyReLU(-0.2, inplace=True),
                                    nn.ELU(alpha=-0.5, inplace=True)], ids=["leaky", "elu"])
def test_compile_inplace_with_a_negative_parameter_and_grad(always_fastrelu, module):
    # eager mode refuses its backward (the output cannot give the gradient); compiled, the
    # gradient comes from a copy of the input, as PyTorch's compiled graphs give it
    torch.manual_seed(0)
    native = nn.Sequential(nn.Linear(8, 8), copy.deepcopy(module))
    converted = frt.convert(copy.deepcopy(native))
    x = torch.randn(16, 8)
    torch._dynamo.reset()
    y = torch.compile(converted, fullgraph=True)(x)
    y.sum().backward()
    reference = nn.Sequential(native[0], type(module)(module.negative_slope if
                                                      hasattr(module, "negative_slope")
                                                      else module.alpha))
    expected = reference(x)
    expected.sum().backward()
    if isinstance(module, nn.LeakyReLU):
        assert torch.equal(y, expected)
    else:  # ELU: within 4 ulp
        torch.testing.assert_close(y, expected, rtol=5e-7, atol=1e-7)
    torch.testing.assert_close(converted[0].weight.grad, native[0].weight.grad)


def test_a_copy_of_a_tracked_model_feeds_its_own_tracker_when_compiled():
    tracker = fastrelu.DeadUnitTracker()
    model = frt.convert(nn.Sequential(nn.Linear(4, 6), nn.ReLU()))
    frt.track(model, tracker)
    x = torch.randn(5, 4)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch._dynamo.reset()
        torch.compile(copied, fullgraph=True)(x)
        own = copied[1]._tracker
        assert own is not tracker
        np.testing.assert_array_equal(own.stats("1").positive,
                                      (copied[0](x) > 0).sum(dim=0).numpy())
        assert own.end_epoch()["1"]["batches"] == 1
    assert tracker.end_epoch() == {}  # the original saw no batch


@pytest.mark.slow
def test_export(always_fastrelu):
    torch.manual_seed(0)
    native = SmallCNN()
    converted = frt.convert(copy.deepcopy(native))
    x = torch.randn(4, 3, 8, 8)
    ep = torch.export.export(converted, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if "fastrelu" in str(n.target)}
    assert {"fastrelu.prelu.default", "fastrelu.elu.default"} <= targets
    torch.testing.assert_close(ep.module()(x), native(x), rtol=1e-5, atol=1e-6)


class Marked(torch.Tensor):
    """A tensor subclass: modules hand it to the torch module's own forward."""


@pytest.mark.parametrize("torch_cls, fast_cls", PAIRS)
@pytest.mark.parametrize("inplace", [False, True])
def test_below_the_crossover_modules_compute_pytorch_s_result(monkeypatch, torch_cls, fast_cls,
                                                              inplace):
    calls = []
    for name in ("relu", "leaky_relu", "elu", "prelu"):
        original = getattr(frt.fastrelu, name)
        monkeypatch.setattr(frt.fastrelu, name,
                            lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
        monkeypatch.setitem(frt.CROSSOVER["cpu"], name, 100)
    kwargs = {} if torch_cls is nn.PReLU else {"inplace": inplace}
    native, fast = torch_cls(**kwargs), frt.convert(torch_cls(**kwargs))
    x = torch.randn(2, 3, 4)  # 24 elements: PyTorch's kernel
    for given in (x, x.as_subclass(Marked), nn.Parameter(x.clone(), requires_grad=False)):
        expected = native(given.clone())
        got = fast(given.clone())
        assert torch.equal(got, expected) and type(got) is type(expected)
    assert calls == []
    big = torch.randn(2, 50)  # 100 elements: fastrelu's (ELU within a few ulp)
    torch.testing.assert_close(fast(big.clone()), native(big.clone()),
                               rtol=1e-6 if torch_cls is nn.ELU else 0, atol=0)
    assert calls == [1]


@pytest.mark.slow
def test_compile_with_a_changing_parameter_and_dynamic_shapes(always_fastrelu):
    """A float argument that changes becomes symbolic in torch.compile: PyTorch's op takes it;
    dynamic shapes trace fastrelu's op without a guard on the size."""
    x = torch.randn(4, 3, 8, 8)
    torch._dynamo.reset()
    fn = torch.compile(lambda t, a: frt.elu(t, a), backend="aot_eager", fullgraph=True)
    for alpha in (1.0, 0.5, 2.0):
        torch.testing.assert_close(fn(x, alpha), nn.functional.elu(x, alpha))
    torch._dynamo.reset()
    model = frt.convert(SmallCNN())
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="aot_eager")
    for batch in (4, 6):
        xb = torch.randn(batch, 3, 8, 8)
        torch.testing.assert_close(compiled(xb), model(xb), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_export_with_a_dynamic_batch(always_fastrelu, monkeypatch):
    """With the real crossovers, a dynamic batch dimension is exported without a constraint on
    it (the traced size would otherwise be guarded against the crossover)."""
    monkeypatch.setitem(frt.CROSSOVER["cpu"], "prelu", 1 << 15)
    monkeypatch.setitem(frt.CROSSOVER["cpu"], "elu", 1 << 17)
    model = nn.Sequential(frt.PReLU(4), frt.ELU())
    x = torch.randn(64, 4, 32, 32)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    for batch in (2, 64):
        xb = torch.randn(batch, 4, 32, 32)
        torch.testing.assert_close(ep.module()(xb), model(xb), rtol=1e-6, atol=1e-7)


def test_jit_script_compiles_pytorch_s_modules():
    """TorchScript cannot call fastrelu's kernels: a converted model scripts as the torch model,
    sharing its parameters (torch.jit.script puts the modules it prepares into the model)."""
    torch.manual_seed(0)
    model = frt.convert(nn.Sequential(nn.Linear(5, 6), nn.PReLU(6), nn.LeakyReLU(0.2),
                                      nn.ELU(), nn.ReLU()))
    weight = model[1].weight
    x = torch.randn(3, 5)
    expected = model(x)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), expected, rtol=1e-6, atol=1e-7)
    assert [type(m) for m in model] == [nn.Linear, nn.PReLU, nn.LeakyReLU, nn.ELU, nn.ReLU]
    assert model[1].weight is weight and model[2].negative_slope == 0.2
    assert scripted.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        model[1].weight.fill_(0.5)
    assert torch.equal(scripted.state_dict()["1.weight"], model[1].weight)


def test_track_stats_refuses_forward_mode_ad_clearly():
    import torch.autograd.forward_ad as fwad
    module = frt.PReLU(3, track_stats=True)
    with fwad.dual_level():
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            module(fwad.make_dual(torch.randn(2, 3), torch.ones(2, 3)))


def test_track_stats_refuses_in_place_on_elements_that_may_share_memory():
    base = torch.randn(100)
    before = base.clone()
    module = frt.ReLU(inplace=True, track_stats=True)
    with pytest.raises(RuntimeError, match="may share memory.*turn track_stats off"):
        module(base.as_strided((10, 10), (5, 1)))
    assert torch.equal(base, before)
    module.track_stats = False
    module(base.as_strided((10, 10), (5, 1)))  # PyTorch's own kernel writes it
    assert (base[:55] >= 0).all()  # the elements the view covers


@pytest.mark.slow
def test_symbolic_sizes_keep_pytorch_s_relu_and_leaky_relu():
    """ReLU and Leaky ReLU never take fastrelu's kernels by size, symbolic or not: an export with
    a dynamic batch keeps PyTorch's ops; ELU's and PReLU's symbolic sizes take fastrelu's."""
    model = frt.convert(SmallCNN())
    ep = torch.export.export(model, (torch.randn(4, 3, 8, 8),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {t for t in targets if "fastrelu" in t} == {"fastrelu.prelu.default",
                                                       "fastrelu.elu.default"}
    assert {"aten.leaky_relu_.default", "aten.relu_.default"} & targets or \
        {"aten.leaky_relu.default", "aten.relu.default"} <= targets


def test_half_tensors_take_parameters_up_to_float32_s_range():
    """PyTorch computes float16 and bfloat16 in float32: a parameter beyond float16's range is
    taken (the products round to the dtype), as fastrelu's kernels do, statistics included."""
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.tensor([[-1.0, 0.5, -0.5, 2.0]], dtype=dtype)
        for native, fast in [(nn.ELU(7e4), frt.ELU(7e4, track_stats=True)),
                             (nn.LeakyReLU(7e4), frt.LeakyReLU(7e4, track_stats=True))]:
            assert torch.equal(fast(x), native(x))
            assert fast.stats.positive.tolist() == [0, 1, 0, 1]
