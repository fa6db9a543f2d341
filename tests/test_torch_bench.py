"""The PyTorch report (python -m fastrelu._torch_bench): its options, and every row of the ops
section on tiny shapes."""
import json

import pytest

pytest.importorskip("torch")
bench = pytest.importorskip("fastrelu._torch_bench")


def test_ops_section_covers_every_op_dtype_and_layout(tmp_path, monkeypatch, capsys):
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
