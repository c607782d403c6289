"""The `lossopt` command and the example script, end to end on the real digits data."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lossopt.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_python(*args, cwd):
    """Runs ``python *args`` in a subprocess that imports this checkout's lossopt, installed or not."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One short run of the main job, shared by the assertions below."""
    tmp = tmp_path_factory.mktemp("tune")
    out, plot, stdout = tmp / "r.json", tmp / "p.png", io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["tune", "--problem", "digits-class-weights", "--steps", "3", "--out", str(out),
                     "--plot", str(plot)])
    return code, out, plot, stdout.getvalue()


def test_tune_main_job(tuned):
    code, out, plot, _ = tuned
    assert code == 0
    record = json.loads(out.read_text())
    assert record["problem"] == "digits-class-weights"
    assert record["status"] == "completed"
    assert len(record["names"]) == 11
    assert record["names"][0] == "class_0" and record["names"][-1] == "l2"
    history = record["history"]
    assert all(len(history[key]) == 4 for key in ("lam", "val_loss", "converged", "inner_steps"))
    assert all(len(row) == 11 for row in history["lam"])
    # The first row is λ0 itself; the best is never worse than it.
    assert history["lam"][0] == pytest.approx(record["lam0"])
    assert record["best_val_loss"] <= history["val_loss"][0]
    assert record["best_val_loss"] == pytest.approx(min(history["val_loss"]))
    assert record["baseline"]["val_log_loss"] == pytest.approx(history["val_loss"][0], rel=1e-6)
    # The constraint holds: class_0 pinned at 1, everything nonnegative.
    assert record["best_lam"][0] == 1.0 and min(record["best_lam"]) >= 0
    assert record["baseline"]["inner_solves"] == 1 and record["tuned"]["inner_solves"] == 4
    for column in (record["baseline"], record["tuned"]):
        assert 0.9 < column["test_accuracy"] <= 1.0
        assert 0 < column["test_log_loss"] < 0.5
    assert plot.stat().st_size > 1000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tune_prints_progress_and_table(tuned):
    code, _, _, out = tuned
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["step", "val"])
    progress = [line.split() for line in lines[header + 1:header + 5]]
    assert [row[0] for row in progress] == ["0", "1", "2", "3"]
    assert all(row[-1] in ("yes", "NO") for row in progress)
    for label in ("validation log loss", "test log loss", "test accuracy", "inner solves", "seconds"):
        assert label in out
    assert "class_9" in out and "only the ratios" in out.lower()
    assert "beat the baseline on test log loss" in lines[-3]  # then the two "wrote" lines


def test_default_problem_is_logreg_l1l2(capsys):
    """The default main job: L1 + L2 logistic regression, with the number of nonzero weights."""
    assert main(["tune", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "logreg-l1l2" in out.splitlines()[0]
    row = next(line for line in out.splitlines() if line.startswith("nonzero weights")).split()
    base, learned = int(row[2]), int(row[3])
    assert 0 < base < 465 and 0 < learned < 465
    val = next(line for line in out.splitlines() if line.startswith("validation log loss")).split()
    assert float(val[4]) < float(val[3])  # the learned λ validates better than the baseline
    for name in ("l1", "l2", "data"):
        assert any(line.split()[:1] == [name] for line in out.splitlines())


def test_unknown_problem(capsys):
    assert main(["tune", "--problem", "no-such-problem"]) == 2
    err = capsys.readouterr().err
    assert "no-such-problem" in err and "digits-class-weights" in err
    assert "Traceback" not in err


def test_bad_output_path_fails_fast(tmp_path, capsys):
    assert main(["tune", "--out", str(tmp_path / "missing" / "r.json")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("name,problem", [
    ("p.txt", "matplotlib cannot write .txt files; use one of"),
    ("p", "no file extension"),
    ("missing/p.png", "does not exist"),
])
def test_bad_plot_path_fails_fast(tmp_path, capsys, monkeypatch, name, problem):
    import lossopt

    def no_tuning(*args, **kwargs):
        raise AssertionError("the job ran before --plot was checked")

    monkeypatch.setattr(lossopt, "tune", no_tuning)
    monkeypatch.setattr(lossopt, "argmin", no_tuning)
    assert main(["tune", "--quiet", "--steps", "0", "--plot", str(tmp_path / name)]) == 1
    err = capsys.readouterr().err
    assert f"--plot {tmp_path / name}: " in err and problem in err
    assert "LOSSOPT_DEBUG" not in err and "Traceback" not in err and err.count("\n") == 1


def test_plot_needs_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backend_bases", None)
    assert main(["tune", "--steps", "0", "--plot", str(tmp_path / "p.png")]) == 1
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "Traceback" not in err


def test_missing_sklearn_is_a_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["tune", "--steps", "0"]) == 1
    err = capsys.readouterr().err
    assert "lossopt[demo]" in err and "Traceback" not in err


def test_help(capsys):
    assert main(["--help"]) == 0
    assert "tune" in capsys.readouterr().out
    assert main(["tune", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--problem", "--steps", "--seed", "--float32", "--out", "--plot", "--quiet"):
        assert option in out
    assert "digits-class-weights" in out


def test_python_dash_m(tmp_path):
    proc = run_python("-m", "lossopt", "--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("lossopt ")


def test_example_script(tmp_path):
    proc = run_python(str(ROOT / "examples" / "digits_class_weights.py"), "--steps", "2",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "test log loss" in proc.stdout and "class_9" in proc.stdout


def test_logreg_l1_l2_example(tmp_path):
    proc = run_python(str(ROOT / "examples" / "logreg_l1_l2.py"), "--steps", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "nonzero weights" in proc.stdout and "learned λ1" in proc.stdout
