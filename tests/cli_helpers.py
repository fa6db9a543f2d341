"""Helpers of the command-line tests: what a refusal looks like, and what must not start."""
import pytest

from fastrelu.__main__ import main


def forbid(monkeypatch, *targets):
    """Makes a call of any (module, name) of `targets` fail the test."""
    def started(*args, **kwargs):
        raise AssertionError("work started")

    for module, name in targets:
        monkeypatch.setattr(module, name, started, raising=False)


def refused(capsys, argv):
    """main(argv)'s error line, after checking that it exited with status 2 and printed nothing
    else: no traceback, no report."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(("fastrelu: error: ", f"fastrelu {argv[0]}: error: ")), err
    return err
