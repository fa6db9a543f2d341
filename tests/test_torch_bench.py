"""The PyTorch report (fastrelu bench --torch, python -m fastrelu._torch_bench): its options, and
every row of the ops section on tiny shapes."""
import json

import pytest

pytest.importorskip("torch")
bench = pytest.importorskip("fastrelu._torch_bench")


@pytest.fixture
def threads():
    """--threads sets both libraries' thread counts: put them back for the tests after."""
    import fastrelu
    import torch

    before = fastrelu.get_num_threads(), torch.get_num_threads()
    yield
    fastrelu.set_num_threads(before[0])
    torch.set_num_threads(before[1])


def test_ops_section_covers_every_op_dtype_and_layout(tmp_path, monkeypatch, capsys, threads):
    monkeypatch.setattr(bench, "QUICK_SHAPES", [(1, 4, 2, 2)])
    path = tmp_path / "r.json"
    assert bench.main(["--quick", "--sections", "ops", "--rounds", "1", "--threads", "1",
                       "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["ops"]
    assert {(r["op"], r["dtype"], r["layout"]) for r in rows} == {
        (op, dtype, layout) for op in bench.OPS for dtype in ("float32", "bfloat16")
        for layout in ("contiguous", "channels_last")}
    for r in rows:
        if r["dtype"] == "float32":
            assert r["native_s"] > 0 and r["fastrelu_s"] > 0 and r["speedup"] > 0
    assert "torch threads" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--sections", "ops,bogus"], "unknown section"),
    (["--threads", "0"], "--threads"),
    (["--rounds", "0"], "--rounds"),
])
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def test_fastrelu_bench_torch_runs_the_ops_and_cnn_sections(monkeypatch, tmp_path):
    from fastrelu.__main__ import main

    calls = []
    monkeypatch.setattr(bench, "run", lambda *args: calls.append(args) or 0)
    path = str(tmp_path / "t.json")
    assert main(["bench", "--torch", "--quick", "--threads", "1", "--repeats", "2",
                 "--json", path]) == 0
    assert main(["bench", "--torch"]) == 0
    assert calls == [(("ops", "cnn"), True, 2, 1, path), (("ops", "cnn"), False, 7, None, None)]


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "1e3"], "--sizes does not apply"),
    (["--ops", "relu"], "--ops does not apply"),
    (["--dtypes", "float32"], "--dtypes does not apply"),
    (["--plot", "p.png"], "--plot does not apply"),
    (["--contention"], "separate reports"),
    (["--device", "cuda"], "--device does not apply"),
    (["--threads", "100000"], "logical CPUs"),
    (["--json", "/no/such/folder/r.json"], "does not exist"),
])
def test_fastrelu_bench_torch_refuses_options_that_do_not_apply(argv, message, capsys,
                                                                monkeypatch):
    from fastrelu.__main__ import main

    monkeypatch.setattr(bench, "run", lambda *args: pytest.fail("ran despite a bad option"))
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--torch", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
