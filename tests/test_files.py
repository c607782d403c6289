"""Observation files (CSV, JSON Lines): values read back exactly; every malformed input is an
error naming the line and column; a bad file stores nothing."""

import json

import numpy as np
import pytest

from lossopt.blackbox import ObservationsError, ObservationsNote, Study, read_observations
from lossopt.blackbox.files import write_observations
from lossopt.constraints import fixed, nonnegative


def write(tmp_path, text, name="obs.csv", mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_csv_values_order_lam_failed_and_bom(tmp_path):
    text = ("val_loss,f_a,f_b,lam_a,lam_b,failed\n"
            "0.5,1,2e-3,,,\n"
            "\n"
            "-0.25,3.5,.5,1,0.125,0\n"
            ",,,,,yes\n"
            "nan,1,inf,2,3,TRUE\n")
    path = write(tmp_path, b"\xef\xbb\xbf" + text.encode(), mode="wb")
    obs = read_observations(path)
    assert obs.names == ("a", "b") and len(obs) == 4
    assert obs.lines.tolist() == [2, 4, 5, 6]  # file lines; the blank line 3 is skipped
    assert obs.failed.tolist() == [False, False, True, True]
    assert obs.features[:2].tolist() == [[1.0, 0.002], [3.5, 0.5]]
    assert obs.values[:2].tolist() == [0.5, -0.25]  # negative metrics are fine
    rows = obs.rows()
    assert rows[0][2] is None and rows[1][2].tolist() == [1.0, 0.125]
    assert rows[2] == (None, None, None, True)
    assert rows[3][0] is None and rows[3][1] is None and rows[3][2].tolist() == [2.0, 3.0]
    # With a study's names the columns are reordered to the study's order.
    assert read_observations(path, names=["b", "a"]).features[1].tolist() == [0.5, 3.5]


def test_jsonl_reads_the_same(tmp_path):
    lines = [{"val_loss": 0.5, "f_a": 1, "f_b": 0.002},
             {"val_loss": -0.25, "f_a": 3.5, "f_b": 0.5, "lam_a": 1, "lam_b": 0.125},
             {"failed": True, "val_loss": None, "f_a": None, "f_b": None}]
    path = write(tmp_path, "\n".join(map(json.dumps, lines)) + "\n\n", "obs.jsonl")
    obs = read_observations(path)
    assert obs.features[:2].tolist() == [[1.0, 0.002], [3.5, 0.5]]
    assert obs.values[:2].tolist() == [0.5, -0.25]
    assert np.isnan(obs.lams[0]).all() and obs.lams[1].tolist() == [1.0, 0.125]
    assert obs.failed.tolist() == [False, False, True]
    # sniffed without a suffix too
    assert read_observations(write(tmp_path, path.read_text(), "obs.txt")).names == ("a", "b")


def test_unknown_columns_are_ignored_with_a_note(tmp_path):
    path = write(tmp_path, "epoch,val_loss,f_a,id,seed\n3,0.5,1,0,9\n")
    with pytest.warns(ObservationsNote, match=r"ignored columns 'epoch', 'seed'") as record:
        obs = read_observations(path)
    assert obs.features.tolist() == [[1.0]] and len(obs.notes) == 1
    assert len(record) == 1  # id is known (informational) and not noted


CSV_ERRORS = [
    # (file text, line, column, fragment of the problem)
    ("val_loss,f_a,f_b\n0.5,1,2\n0.4,nan,1\n", 3, "f_a", "nan is not a finite number"),
    ("val_loss,f_a,f_b\n0.5,1,2\ninf,1,1\n", 3, "val_loss", "inf is not a finite number"),
    ("val_loss,f_a,f_b\n0.5,1,-Infinity\n", 2, "f_b", "-inf is not a finite number"),
    ("val_loss,f_a,f_b\n0.5,1,2\n0.4,,1\n", 3, "f_a", "missing value"),
    ("val_loss,f_a,f_b\n0.5,1,2\n0.4,one,1\n", 3, "f_a", "'one' is not a number"),
    ("val_loss,f_a,f_b\n0.5,1,1_000\n", 2, "f_b", "'1_000' is not a number"),
    ("val_loss,f_a,f_b\n0.5,1,2\n0.4,1\n", 3, None, "2 cells but the header (line 1) has 3"),
    ("val_loss,f_a,f_b\n0.5,1,2,7\n", 2, None, "4 cells but the header (line 1) has 3"),
    ("val_loss,f_a,f_a\n0.5,1,2\n", 1, "f_a", "duplicate column name (columns 2 and 3)"),
    ("loss,f_a\n0.5,1\n", 1, None, "no 'val_loss' column"),
    ("val_loss,x\n0.5,1\n", 1, None, "no feature columns"),
    ("val_loss,f_\n0.5,1\n", 1, "f_", "needs a name"),
    ("val_loss,f_a,f_b,lam_a\n0.5,1,2,1\n", 1, None, "missing ['lam_b']"),
    ("val_loss,f_a,lam_c\n0.5,1,1\n", 1, "lam_c", "no matching feature column f_c"),
    ("val_loss,f_a,f_b,lam_a,lam_b\n0.5,1,2,1,\n", 2, "lam_b", "no λ value here"),
    ("val_loss,f_a,lam_a\n0.5,1,nan\n", 2, "lam_a", "nan is not a finite number"),
    ("val_loss,f_a,failed\n0.5,1,maybe\n", 2, "failed", "not a boolean"),
    ("val_loss,f_a,state\n0.5,1,done\n", 2, "state", "not one of complete, failed, pending"),
    ("val_loss,f_a\n0.5,\"1\n", 2, None, "malformed CSV"),
]


@pytest.mark.parametrize("text,line,column,problem", CSV_ERRORS)
def test_csv_errors_name_line_and_column(tmp_path, text, line, column, problem):
    path = write(tmp_path, text)
    with pytest.raises(ObservationsError) as info:
        read_observations(path)
    err = info.value
    assert (err.line, err.column) == (line, column)
    assert problem in str(err)
    where = f"{path}, line {line}" + (f", column {column!r}" if column else "")
    assert str(err).startswith(where)


JSONL_ERRORS = [
    ('{"val_loss": 0.5, "f_a": 1}\n{"val_loss": NaN, "f_a": 1}\n', 2, "val_loss", "nan is not"),
    ('{"val_loss": 0.5, "f_a": 1}\n{"val_loss": 0.4, "f_a": Infinity}\n', 2, "f_a", "inf is not"),
    ('{"val_loss": 0.5, "f_a": 1}\n{"val_loss": 0.4, "f_a": "one"}\n', 2, "f_a",
     "'one' is not a number"),
    ('{"val_loss": 0.5, "f_a": 1}\n{"val_loss": 0.4, "f_a": null}\n', 2, "f_a", "null value"),
    ('{"val_loss": 0.5, "f_a": 1}\n{"val_loss": 0.4}\n', 2, "f_a", "missing key"),
    ('{"val_loss": 0.5, "f_a": 1}\n{"val_loss": 0.4, "f_a": 1, "f_b": 2}\n', 1, "f_b",
     "missing key"),
    ('{"val_loss": 0.5, "f_a": 1, "f_a": 2}\n', 1, "f_a", "duplicate key"),
    ('{"val_loss": 0.5, "f_a": 1}\n{"val_loss": 0.5, "f_a": \n', 2, None, "invalid JSON"),
    ('{"val_loss": 0.5, "f_a": 1}\n[0.5, 1]\n', 2, None, "expected one JSON object"),
    ('{"val_loss": 0.5, "f_a": true}\n', 1, "f_a", "true is not a number"),
]


@pytest.mark.parametrize("text,line,column,problem", JSONL_ERRORS)
def test_jsonl_errors_name_line_and_column(tmp_path, text, line, column, problem):
    path = write(tmp_path, text, "obs.jsonl")
    with pytest.raises(ObservationsError) as info:
        read_observations(path)
    assert (info.value.line, info.value.column) == (line, column)
    assert problem in str(info.value)


@pytest.mark.filterwarnings("ignore::lossopt.blackbox.ObservationsNote")
@pytest.mark.parametrize("text", ["", "\n\n", "\ufeff", "val_loss,f_a\n", "val_loss,f_a\n\n,\n",
                                  "id,state,val_loss,f_a\n0,pending,,\n"])
def test_empty_files_point_to_study_ask(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ObservationsError, match=r"lossopt study ask"):
        read_observations(path)


def test_binary_and_oversized_files(tmp_path):
    import pickle

    path = write(tmp_path, pickle.dumps({"val_loss": 1}), "obs.csv", mode="wb")
    with pytest.raises(ObservationsError, match="not UTF-8 text"):
        read_observations(path)  # never unpickled
    header = "val_loss," + ",".join(f"f_{i}" for i in range(1001))
    path = write(tmp_path, header + "\n" + ",".join(["1"] * 1002) + "\n")
    with pytest.raises(ObservationsError, match=r"line 1: the number of f_<name> columns = 1001 "
                                                r"exceeds .* maximum of 1000"):
        read_observations(path)


def test_study_tell_file_checks_k_and_stores_nothing_from_a_bad_file(tmp_path):
    study = Study(names=["a", "b"])
    study.tell([1.0, 2.0], 0.9)
    wrong_k = write(tmp_path, "val_loss,f_a,f_b,f_c\n0.5,1,2,3\n", "k3.csv")
    with pytest.raises(ValueError, match=r"k = 3 feature columns but the study has k = 2.*"
                                         r"not in the study \['f_c'\]"):
        study.tell_file(wrong_k)
    missing = write(tmp_path, "val_loss,f_a\n0.5,1\n", "k1.csv")
    with pytest.raises(ValueError, match=r"missing \['f_b'\]"):
        study.tell_file(missing)
    bad_last_row = write(tmp_path, "val_loss,f_b,f_a\n0.5,1,2\n0.4,3,4\n0.3,5,x\n", "bad.csv")
    with pytest.raises(ValueError, match=r"line 4, column 'f_a'"):
        study.tell_file(bad_last_row)
    assert [t.value for t in study.trials] == [0.9]  # nothing lost, nothing half-told
    good = write(tmp_path, "val_loss,f_b,f_a,failed\n0.5,1,2,\n0.4,,,1\n0.5,1,2,\n", "good.csv")
    assert study.tell_file(good) == [1, 2, 3]
    trials = study.trials
    assert trials[1].features.tolist() == [2.0, 1.0]  # reordered to the study's names
    assert [t.state for t in trials] == ["complete", "complete", "failed", "complete"]
    # a duplicate observation (rows 1 and 3) is accepted and recorded twice
    assert trials[3].features.tolist() == trials[1].features.tolist()


def test_study_tell_file_infers_k_and_names(tmp_path):
    path = write(tmp_path, "val_loss,f_x,f_y\n0.5,1,2\n")
    study = Study()
    assert study.tell_file(path) == [0]
    assert study.names == ("x", "y") and study.k == 2


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_reads_back_exactly(tmp_path, fmt):
    study = Study(names=["a", "b"])
    study.tell([0.1, 1 / 3], 2 / 3, lam=[1e-300, 7.0])
    study.tell([1.0, 2.0], 0.25)
    study.tell(None, None, failed=True, lam=[1.0, 1.0])
    out = tmp_path / f"t.{fmt}"
    write_observations(out, study.names, study.trials)
    obs = read_observations(out)
    assert obs.features[:2].tolist() == [[0.1, 1 / 3], [1.0, 2.0]]  # bit-exact floats
    assert obs.values[:2].tolist() == [2 / 3, 0.25]
    assert obs.lams[0].tolist() == [1e-300, 7.0] and np.isnan(obs.lams[1]).all()
    assert obs.failed.tolist() == [False, False, True]
    copy = Study(names=["a", "b"])
    copy.tell_file(out)
    assert [(t.state, t.value) for t in copy.trials] == [(t.state, t.value) for t in study.trials]


def test_jsonl_missing_keys_are_not_called_empty_cells(tmp_path):
    path = write(tmp_path, '{"val_loss": 0.5, "f_a": 1, "f_b": 2}\n{"val_loss": 0.4, "f_a": 1}\n',
                 "obs.jsonl")
    with pytest.raises(ObservationsError) as info:
        read_observations(path)
    assert "missing key" in str(info.value) and "empty cell" not in str(info.value)
    path = write(tmp_path, '{"val_loss": null, "f_a": 1}\n', "null.jsonl")
    with pytest.raises(ObservationsError, match="column 'val_loss': null value"):
        read_observations(path)


def test_same_k_wrong_names_says_only_that_the_names_differ(tmp_path):
    study = Study(names=["data", "l2"])
    path = write(tmp_path, "val_loss,f_a,f_b\n0.5,1,2\n", "ab.csv")
    with pytest.raises(ValueError) as info:
        study.tell_file(path)
    message = str(info.value)
    assert "do not match the study's names" in message
    assert "missing ['f_data', 'f_l2']" in message and "not in the study ['f_a', 'f_b']" in message
    assert "k = 2" not in message
    assert study.trials == []


def test_tell_file_rejects_a_negative_lam_naming_row_and_column(tmp_path):
    study = Study(names=["data", "l2"], constraint=nonnegative() & fixed({"data": 1.0}))
    path = write(tmp_path, "val_loss,f_data,f_l2,lam_data,lam_l2\n0.5,1,2,1,0.1\n"
                           "0.4,1,3,1,-0.2\n", "neg.csv")
    with pytest.raises(ObservationsError) as info:
        study.tell_file(path)
    assert (info.value.line, info.value.column) == (3, "lam_l2")
    assert "λ_l2 = -0.2" in str(info.value) and ">= 0" in str(info.value)
    assert study.trials == []  # nothing stored
    fresh = Study()  # k and names from the file: checked before the study is created
    with pytest.raises(ObservationsError, match="column 'lam_l2'"):
        fresh.tell_file(path)
    assert fresh.k is None
    inf = write(tmp_path, "val_loss,f_data,f_l2,lam_data,lam_l2\n0.5,1,2,1,inf\n", "inf.csv")
    with pytest.raises(ObservationsError, match=r"line 2, column 'lam_l2'.*not a finite number"):
        study.tell_file(inf)
    assert study.trials == []
