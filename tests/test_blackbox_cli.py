"""`lossopt study ...` and `lossopt recommend`: a round trip, and bad input as messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lossopt.blackbox import Study, read_observations
from lossopt.cli import main
from lossopt.constraints import fixed, nonnegative

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "observations.csv"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def json_lines(out):
    return [json.loads(line) for line in out.splitlines() if line.strip()]


OBS = "val_loss,f_a,f_b,f_c,lam_a,lam_b,lam_c,note\n" \
      "0.50,1.0,2.0,3.0,1,1,1,first\n" \
      "0.25,2.0,1.0,0.5,,,,imported\n" \
      "0.75,0.5,3.0,1.0,1,0.1,2,third\n"


def test_round_trip_create_tell_ask_best_export(tmp_path, capsys):
    db, csv_in = tmp_path / "s.db", tmp_path / "obs.csv"
    csv_in.write_text(OBS)
    code, out, _ = run(capsys, "study", "create", db, "--names", "a,b", "c", "--fixed", "a=1",
                       "--bounds", "b=0.01:100", "--seed", "3")
    assert code == 0
    created = json.loads(out)
    assert created["k"] == 3 and created["names"] == ["a", "b", "c"] and created["seed"] == 3
    assert created["constraint"] == {"lower": [1.0, 0.01, 0.0], "upper": [1.0, 100.0, None],
                                     "sum_mask": None, "total": None}

    code, out, err = run(capsys, "study", "tell", db, csv_in)
    assert code == 0 and json.loads(out) == {"told": [0, 1, 2]}
    assert "ignored column 'note'" in err

    code, out, _ = run(capsys, "study", "ask", db, "-n", "2")
    asked = json_lines(out)
    assert code == 0 and [s["id"] for s in asked] == [3, 4]
    for s in asked:
        assert list(s["lam"]) == ["a", "b", "c"] and "probabilities" not in s
        assert s["lam"]["a"] == 1.0 and 0.01 <= s["lam"]["b"] <= 100 and s["lam"]["c"] >= 0

    code, out, _ = run(capsys, "study", "tell", db, "--id", 3, "--features", "0.1", "0.2",
                       "0.3", "--value", "0.125")
    assert code == 0 and json.loads(out) == {"told": [3]}
    code, out, _ = run(capsys, "study", "tell", db, "--id", 4, "--failed")
    assert code == 0
    code, out, _ = run(capsys, "study", "tell", db, "--features", "1,1,1", "--value", "0.9",
                       "--lam", "1", "2", "3")
    assert code == 0 and json.loads(out) == {"told": [5]}

    code, out, _ = run(capsys, "study", "best", db)
    best = json.loads(out)
    assert code == 0 and best["id"] == 3 and best["value"] == 0.125
    assert best["features"] == {"a": 0.1, "b": 0.2, "c": 0.3}
    assert best["lam"] == asked[0]["lam"]

    for name in ("t.csv", "t.jsonl"):
        code, _, _ = run(capsys, "study", "export", db, tmp_path / name)
        assert code == 0
        obs = read_observations(tmp_path / name)
        assert obs.values[:4].tolist() == [0.5, 0.25, 0.75, 0.125]
        assert obs.failed.tolist() == [False, False, False, False, True, False]
        assert obs.lams[5].tolist() == [1.0, 2.0, 3.0]
    code, out, _ = run(capsys, "study", "export", db, "-")
    assert code == 0 and out.splitlines()[0] == "id,state,val_loss,f_a,f_b,f_c,lam_a,lam_b,lam_c"
    assert len(out.splitlines()) == 7
    # the Python API sees the same study
    study = Study(storage=db)
    assert study.constraint.lower.tolist() == [1.0, 0.01, 0.0] and study.seed == 3
    assert [t.state for t in study.trials] == ["complete"] * 4 + ["failed", "complete"]


def test_simplex_suggestions_print_probabilities(tmp_path, capsys):
    db = tmp_path / "s.db"
    assert run(capsys, "study", "create", db, "--k", 3, "--simplex")[0] == 0
    code, out, _ = run(capsys, "study", "ask", db)
    s = json.loads(out)
    assert code == 0 and list(s["lam"]) == ["0", "1", "2"]
    assert sum(s["probabilities"].values()) == pytest.approx(1.0, abs=1e-12)
    assert s["probabilities"] == s["lam"]  # total 1


def test_bad_input_is_a_message_and_loses_nothing(tmp_path, capsys):
    db = tmp_path / "s.db"
    # constraint options: usage errors (exit 2), and no file is left behind
    for options, message in [
        (["--bounds", "a=3:1"], "inverted bounds, LO = 3.0 > HI = 1.0"),
        (["--bounds", "a=-1:1"], "a negative bound"),
        (["--bounds", "a=1"], "expected NAME=LO:HI"),
        (["--fixed", "a=-2"], "-2.0 is negative"),
        (["--fixed", "a=x"], "'x' is not a number"),
        (["--fixed", "a=nan"], "not a finite number"),
        (["--fixed", "a=1", "--fixed", "a=2"], "'a' is given twice"),
    ]:
        code, _, err = run(capsys, "study", "create", db, "--names", "a", "b", *options)
        assert code == 2 and message in err, (options, err)
        assert not db.exists()
    for options, message in [
        (["--names", "a", "b", "--fixed", "z=1"], "unknown component name 'z'"),
        (["--names", "a", "b", "--simplex", "--fixed", "a=2"], "is infeasible"),
        (["--names", "a", "b", "a"], "names must be unique"),
        (["--k", "1001"], "--k = 1001 exceeds the black-box path's maximum of 1000"),
    ]:
        code, _, err = run(capsys, "study", "create", db, *options)
        assert code == 1 and message in err, (options, err)
        assert not db.exists()

    assert run(capsys, "study", "create", db, "--names", "a", "b")[0] == 0
    code, _, err = run(capsys, "study", "create", db, "--names", "a", "b")
    assert code == 1 and "already exists" in err
    assert run(capsys, "study", "tell", db, "--features", "1", "2", "--value", "0.5")[0] == 0

    bad = tmp_path / "bad.csv"
    cases = [
        ("val_loss,f_a,f_b\n0.4,1,2\n0.3,1,nan\n", "line 3, column 'f_b': nan is not a finite"),
        ("val_loss,f_a,f_b\n0.4,1,\n", "line 2, column 'f_b': missing value"),
        ("val_loss,f_a,f_b\n0.4,1,two\n", "line 2, column 'f_b': 'two' is not a number"),
        ("val_loss,f_a,f_b\n0.4,1,2,3\n", "line 2: the row has 4 cells"),
        ("val_loss,f_a,f_a\n0.4,1,2\n", "line 1, column 'f_a': duplicate column name"),
        ("val_loss,f_a,f_b,f_c\n0.4,1,2,3\n", "k = 3 feature columns but the study has k = 2"),
        ("", "the file is empty"),
        ("val_loss,f_a,f_b\n", "no data rows"),
    ]
    for text, message in cases:
        bad.write_text(text)
        code, _, err = run(capsys, "study", "tell", db, bad)
        assert code == 1 and message in err, (text, err)
    for argv, message in [
        (["--features", "1", "nan", "--value", "0.1"], "component 'b' (index 1) is nan"),
        (["--features", "1", "2", "--value", "inf"], "value (the validation loss) is inf"),
        (["--features", "1", "2", "3", "--value", "0.1"], "features has length 3, expected k = 2"),
        (["--features", "1", "x", "--value", "0.1"], "entry 1 is 'x', not a number"),
        (["--features", "1", "2"], "value (the validation loss) is missing"),
        (["--id", "0", "--features", "1", "2", "--value", "0.1"], "trial 0 was already told"),
        (["--id", "9", "--features", "1", "2", "--value", "0.1"], "no trial with id 9"),
    ]:
        code, _, err = run(capsys, "study", "tell", db, *argv)
        assert code in (1, 2) and message in err, (argv, err)
    code, _, err = run(capsys, "study", "tell", db, bad, "--value", "1")
    assert code == 2 and "either FILE or --features" in err
    # nothing stored before was lost, nothing bad was added
    trials = Study(storage=db).trials
    assert [(t.state, t.value, t.features.tolist()) for t in trials] == [("complete", 0.5,
                                                                           [1.0, 2.0])]

    missing = tmp_path / "missing.db"
    for verb in ("ask", "best"):
        code, _, err = run(capsys, "study", verb, missing)
        assert code == 1 and "no study storage" in err
        assert not missing.exists()
    empty_db = tmp_path / "e.db"
    assert run(capsys, "study", "create", empty_db, "--k", "2")[0] == 0
    code, _, err = run(capsys, "study", "best", empty_db)
    assert code == 1 and "no complete observation yet" in err
    (tmp_path / "junk.db").write_text("junk " * 200)
    code, _, err = run(capsys, "study", "ask", tmp_path / "junk.db")
    assert code == 1 and "not an SQLite database" in err


def test_recommend_bad_input(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("val_loss,f_a\n")
    code, _, err = run(capsys, "recommend", empty)
    assert code == 1 and "no data rows" in err and "lossopt study ask" in err
    code, _, err = run(capsys, "recommend", tmp_path / "nope.csv")
    assert code == 1 and "no such file" in err
    code, _, err = run(capsys, "recommend", tmp_path)
    assert code == 1 and "not a regular file" in err
    code, _, err = run(capsys, "recommend", EXAMPLE, "--fixed", "nope=1")
    assert code == 1 and "unknown component name 'nope'" in err
    code, _, err = run(capsys, "recommend", EXAMPLE, "--bounds", "l2=5:1")
    assert code == 2 and "inverted bounds" in err


def test_recommend_example_in_a_subprocess_matches_a_study(capsys):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "lossopt", "recommend",
                           "examples/observations.csv", "--fixed", "class_0=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lam = json.loads(proc.stdout)["lam"]
    names = [f"class_{c}" for c in range(10)] + ["l2"]
    assert list(lam) == names and lam["class_0"] == 1.0
    assert all(v >= 0 and np.isfinite(v) for v in lam.values())
    # deterministic: the same λ in this process, and the one a study told this file suggests
    code, out, _ = run(capsys, "recommend", EXAMPLE, "--fixed", "class_0=1")
    assert code == 0 and json.loads(out)["lam"] == lam
    study = Study(names=names, constraint=nonnegative() & fixed({"class_0": 1.0}), seed=0)
    study.tell_file(EXAMPLE)
    assert study.ask().params == lam


def test_cli_tell_rejects_a_negative_lam_and_stores_nothing(tmp_path, capsys):
    db = tmp_path / "study.db"
    code, _, _ = run(capsys, "study", "create", db, "--names", "data", "l2", "--fixed", "data=1",
                     "--bounds", "l2=1e-6:10")
    assert code == 0
    code, out, err = run(capsys, "study", "tell", db, "--features", "0.3", "9", "--value", "0.4",
                         "--lam", "1", "-1")
    assert code == 1 and out == ""
    assert "λ_l2 = -1.0" in err and ">= 0" in err and "Traceback" not in err
    assert Study(storage=str(db)).trials == []
    bad = tmp_path / "neg.jsonl"
    bad.write_text('{"val_loss": 0.4, "f_data": 1, "f_l2": 2, "lam_data": 1, "lam_l2": -3}\n')
    code, _, err = run(capsys, "study", "tell", db, bad)
    assert code == 1 and "line 1, column 'lam_l2'" in err and "λ_l2 = -3" in err
    code, _, err = run(capsys, "recommend", bad, "--fixed", "data=1")
    assert code == 1 and "line 1, column 'lam_l2'" in err
    code, out, _ = run(capsys, "study", "tell", db, "--features", "0.3", "9", "--value", "0.4",
                       "--lam", "2", "0.6")  # off only by scale: accepted
    assert code == 0 and json_lines(out) == [{"told": [0]}]


def test_constraint_errors_name_the_option_not_a_repr(tmp_path, capsys):
    code, _, err = run(capsys, "recommend", EXAMPLE, "--fixed", "foo=1")
    assert code == 1
    assert "--fixed foo=1: unknown component name 'foo' (names: class_0, class_1" in err
    assert "fixed({" not in err and "{'foo'" not in err
    code, _, err = run(capsys, "recommend", EXAMPLE, "--bounds", "zz=0:1")
    assert code == 1 and "--bounds zz=0:1: unknown component name 'zz'" in err
    assert "box(" not in err
    code, _, err = run(capsys, "recommend", EXAMPLE, "--fixed", "class_0=1", "--bounds",
                       "class_0=2:3")
    assert code == 1 and "--bounds class_0=2:3" in err and "box(" not in err
    code, _, err = run(capsys, "study", "create", tmp_path / "s.db", "--names", "a", "b",
                       "--fixed", "c=1")
    assert code == 1 and "--fixed c=1: unknown component name 'c' (names: a, b)" in err
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("verb", [["recommend"], ["study", "create"]])
def test_constraint_options_are_listed_once_in_help(capsys, verb):
    code, out, _ = run(capsys, *verb, "--help")
    assert code == 0
    body = out.split("\n\n", 1)[1]  # after the usage lines
    for option in ("--fixed NAME=VALUE", "--bounds NAME=LO:HI", "--simplex "):
        assert sum(line.lstrip().startswith(option) for line in body.splitlines()) == 1, option
    assert "constraint (λ >= 0 always)" in out and "cone" in out
