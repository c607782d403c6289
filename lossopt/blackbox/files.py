"""Observation files: CSV and JSON Lines, one trained model per row.

Columns (CSV header, or the keys of each JSON object):

- ``val_loss``: the validation loss V(θ) of the model (lower is better);
- ``f_<name>``: one column per feature f_name(θ) — the feature names, and k, come from these;
- ``lam_<name>`` (optional): the λ the model was trained with; a row leaves all of them empty
  (or null) when its λ is unknown;
- ``failed`` (optional): 1/true/yes marks a training that failed or diverged — its other cells may
  be empty or non-finite, and it is recorded but never used by the model;
- ``state`` (optional, written by ``Study.to_csv``): ``complete``, ``failed`` or ``pending``
  (pending rows are skipped); ``id`` (optional): informational, ignored.

Any other column is ignored with an :class:`ObservationsNote` warning. A UTF-8 byte-order mark is
accepted. In JSON Lines the columns are the union of the objects' keys, a key absent from an
object (or null) is an empty cell (reported as a missing key / null value), and numbers may also be written as strings. Every error names
the file, the line and the column. Files are parsed as text — never
executed, evaluated or unpickled.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import sys
import tempfile
import warnings
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from lossopt.blackbox._checks import check_k

EMPTY_HINT = ("to start without observations, get an initial design from `lossopt study ask` "
              "(or Study.ask())")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NONFINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_TRUE, _FALSE = {"1", "true", "yes", "y", "t"}, {"", "0", "false", "no", "n", "f"}
_KNOWN = {"val_loss", "failed", "state", "id"}


class ObservationsNote(UserWarning):
    """Something in an observations file that was ignored on purpose (e.g. an unknown column)."""


class ObservationsError(ValueError):
    """A malformed observations file; ``path``, ``line`` (1-based, or None) and ``column``
    (or None) locate the problem."""

    def __init__(self, path: str, line: Optional[int], column: Optional[str], problem: str):
        where = path + (f", line {line}" if line is not None else "") + (
            f", column {column!r}" if column is not None else "")
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.column, self.problem = path, line, column, problem


@dataclasses.dataclass(frozen=True, eq=False)
class Observations:
    """The rows of an observations file, in file order (pending rows skipped).

    ``features`` (m, k), ``values`` (m,), ``lams`` (m, k) are float64 with NaN where a cell was
    empty (only allowed for failed rows, and for a row's whole λ); ``failed`` (m,) bool; ``lines``
    the file line of each row; ``notes`` what was ignored.
    """

    path: str
    names: Tuple[str, ...]
    features: np.ndarray
    values: np.ndarray
    lams: np.ndarray
    failed: np.ndarray
    lines: np.ndarray
    notes: Tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.values)

    @property
    def k(self) -> int:
        return len(self.names)

    def rows(self) -> List[Tuple[Optional[np.ndarray], Optional[float], Optional[np.ndarray],
                                 bool]]:
        """(features or None, value or None, lam or None, failed) per row."""
        out = []
        for f, v, lam, bad in zip(self.features, self.values, self.lams, self.failed):
            out.append((None if np.isnan(f).any() else f, None if math.isnan(v) else float(v),
                        None if np.isnan(lam).any() else lam, bool(bad)))
        return out


def file_format(path: str, default: str = "csv") -> str:
    """``"jsonl"`` for *.jsonl / *.ndjson / *.json, ``"csv"`` for *.csv, else ``default``."""
    ext = os.path.splitext(str(path))[1].lower()
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}.get(ext,
                                                                                       default)


def read_observations(path: "str | os.PathLike[str]", names: Optional[Sequence[str]] = None,
                      *, format: Optional[str] = None) -> Observations:
    """Reads a CSV or JSON Lines observations file (format from the suffix, else sniffed).

    With ``names`` (a study's), the file's ``f_`` columns must be exactly those names (in any
    order) and the result follows the order of ``names``. Raises :class:`ObservationsError`
    (a ValueError) naming the line and column of the first problem; warns
    :class:`ObservationsNote` for ignored columns.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise ObservationsError(path, None, None, f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ObservationsError(path, raw[:e.start].count(b"\n") + 1, None,
                                f"not UTF-8 text (byte {e.start}); observation files are "
                                "CSV or JSON Lines text") from None
    if format is None:
        format = file_format(path, default="")
        if not format:
            format = "jsonl" if text.lstrip().startswith("{") else "csv"
    if format not in ("csv", "jsonl"):
        raise ValueError(f"format must be 'csv' or 'jsonl', got {format!r}")
    records = _csv_records(path, text) if format == "csv" else _jsonl_records(path, text)
    return _parse(path, records, names)


def _csv_records(path: str, text: str) -> Tuple[List[str], int, List[Tuple[int, dict]]]:
    """(header, header line, [(line, {column: cell})]) with cells as stripped strings."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, header_line, rows = None, None, []
    try:
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if header is None:
                header, header_line = [cell.strip() for cell in row], line
                _check_header(path, header, header_line)
                continue
            if len(row) != len(header):
                raise ObservationsError(path, line, None,
                                        f"the row has {len(row)} cells but the header (line "
                                        f"{header_line}) has {len(header)} columns")
            rows.append((line, {col: cell.strip() for col, cell in zip(header, row)}))
    except csv.Error as e:
        raise ObservationsError(path, reader.line_num, None, f"malformed CSV: {e}") from None
    return header, header_line, rows


def _jsonl_records(path: str, text: str) -> Tuple[List[str], int, List[Tuple[int, dict]]]:
    """The columns are the union of the objects' keys (first line first); a key absent from an
    object is an empty cell there."""
    header, header_line, rows, seen = None, None, [], set()
    for line, chunk in enumerate(text.splitlines(), 1):
        if not chunk.strip():
            continue
        try:
            obj = json.loads(chunk, object_pairs_hook=_unique_keys, parse_constant=float)
        except _DuplicateKey as e:
            raise ObservationsError(path, line, str(e), "duplicate key in one object") from None
        except json.JSONDecodeError as e:
            raise ObservationsError(path, line, None, f"invalid JSON: {e.msg} (character "
                                                      f"{e.colno})") from None
        if not isinstance(obj, dict):
            raise ObservationsError(path, line, None, "expected one JSON object {\"val_loss\": "
                                    f"..., \"f_<name>\": ...}} per line, got {type(obj).__name__}")
        if header is None:
            header, header_line = [], line
        header.extend(key for key in obj if key not in seen)
        seen.update(obj)
        rows.append((line, obj))
    return header, header_line, rows


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _check_header(path: str, header: List[str], line: int) -> None:
    seen = {}
    for i, col in enumerate(header, 1):
        if col in seen:
            raise ObservationsError(path, line, col, f"duplicate column name (columns "
                                    f"{seen[col]} and {i})")
        seen[col] = i


def _parse(path: str, records, names: Optional[Sequence[str]]) -> Observations:
    header, header_line, rows = records
    if header is None:
        raise ObservationsError(path, None, None, "the file is empty (no header, no data rows); "
                                + EMPTY_HINT)
    cols = header
    if "val_loss" not in cols:
        raise ObservationsError(path, header_line, None,
                                f"no 'val_loss' column (columns: {cols[:20]}); expected val_loss, "
                                "one f_<name> per feature, optional lam_<name>, failed")
    feats = [c[2:] for c in cols if c.startswith("f_")]
    if any(not n for n in feats):
        raise ObservationsError(path, header_line, "f_", "a feature column needs a name after "
                                "f_ (f_<name>)")
    if not feats:
        raise ObservationsError(path, header_line, None,
                                f"no feature columns f_<name> (columns: {cols[:20]})")
    try:
        check_k(len(feats), "the number of f_<name> columns")
    except ValueError as e:
        raise ObservationsError(path, header_line, None, str(e)) from None
    lam_cols = [c[4:] for c in cols if c.startswith("lam_")]
    for n in lam_cols:
        if n not in feats:
            raise ObservationsError(path, header_line, f"lam_{n}",
                                    f"no matching feature column f_{n}")
    if lam_cols and len(lam_cols) != len(feats):
        missing = [f"lam_{n}" for n in feats if n not in lam_cols]
        raise ObservationsError(path, header_line, None,
                                f"lam_ columns must cover every feature or none; missing "
                                f"{missing[:10]}")
    unknown = [c for c in cols if c not in _KNOWN and not c.startswith(("f_", "lam_"))]
    notes = []
    if unknown:
        notes.append(f"{path}: ignored column{'s' if len(unknown) > 1 else ''} "
                     f"{', '.join(map(repr, unknown[:10]))}{' ...' if len(unknown) > 10 else ''} "
                     "(known: val_loss, f_<name>, lam_<name>, failed, state, id)")
    if names is not None:
        names = tuple(names)
        if set(feats) != set(names) or len(feats) != len(names):
            missing = [f"f_{n}" for n in names if n not in feats]
            extra = [f"f_{n}" for n in feats if n not in names]
            if len(feats) == len(names):
                problem = (f"the feature columns do not match the study's names "
                           f"{list(names)[:20]}")
            else:
                problem = (f"the file has k = {len(feats)} feature columns but the study has "
                           f"k = {len(names)} (names {list(names)[:20]})")
            raise ObservationsError(
                path, header_line, None, problem
                + (f"; missing {missing[:10]}" if missing else "")
                + (f"; not in the study {extra[:10]}" if extra else ""))
        feats = list(names)

    m, k = len(rows), len(feats)
    features, lams = np.full((m, k), np.nan), np.full((m, k), np.nan)
    values, failed = np.full(m, np.nan), np.zeros(m, bool)
    lines = np.zeros(m, int)
    keep = np.zeros(m, bool)
    pending = 0
    for r, (line, cells) in enumerate(rows):
        bad = _flag(path, line, cells)
        if bad is None:  # pending
            pending += 1
            continue
        keep[r], failed[r], lines[r] = True, bad, line
        for j, n in enumerate(feats):
            features[r, j] = _number(path, line, f"f_{n}", cells, bad)
        values[r] = _number(path, line, "val_loss", cells, bad)
        if bad and np.isnan(features[r]).any():
            features[r] = np.nan
        if lam_cols:
            empty = [f"lam_{n}" for n in feats if _is_empty(cells.get(f"lam_{n}"))]
            if empty and len(empty) != k:
                raise ObservationsError(path, line, empty[0],
                                        "no λ value here, in a row with other λ values given; "
                                        "leave all lam_ values of a row empty (or null) when "
                                        "its λ is unknown")
            if not empty:
                lams[r] = [_number(path, line, f"lam_{n}", cells, False, hint="")
                           for n in feats]
    if pending:
        notes.append(f"{path}: skipped {pending} pending row{'s' if pending > 1 else ''} "
                     "(state = pending: asked, never told)")
    for note in notes:
        warnings.warn(note, ObservationsNote, stacklevel=3)
    if not keep.any():
        raise ObservationsError(path, None, None,
                                "no data rows (only a header"
                                f"{', and pending rows' if pending else ''}); {EMPTY_HINT}")
    arrays = [features[keep], values[keep], lams[keep], failed[keep], lines[keep]]
    for a in arrays:
        a.setflags(write=False)
    return Observations(path, tuple(feats), *arrays, notes=tuple(notes))


def _is_empty(cell: Any) -> bool:
    return cell is None or (isinstance(cell, str) and not cell.strip())


def _flag(path: str, line: int, cells: dict) -> Optional[bool]:
    """True for a failed row, False for a complete one, None for a pending one."""
    failed = cells.get("failed")
    if isinstance(failed, str):
        text = failed.strip().lower()
        if text not in _TRUE | _FALSE:
            raise ObservationsError(path, line, "failed", f"{failed!r} is not a boolean "
                                    "(use 1/0, true/false, yes/no, or leave it empty)")
        failed = text in _TRUE
    elif failed is None:
        failed = False
    elif isinstance(failed, bool) or (isinstance(failed, (int, float)) and failed in (0, 1)):
        failed = bool(failed)
    else:
        raise ObservationsError(path, line, "failed", f"{failed!r} is not a boolean")
    state = cells.get("state")
    if _is_empty(state):
        return failed
    if not isinstance(state, str) or state.strip().lower() not in ("complete", "failed",
                                                                    "pending"):
        raise ObservationsError(path, line, "state", f"{state!r} is not one of complete, "
                                "failed, pending")
    state = state.strip().lower()
    if failed and state != "failed":
        raise ObservationsError(path, line, "state", f"state {state!r} contradicts failed = "
                                f"{cells.get('failed')!r}")
    return None if state == "pending" else state == "failed"


def _number(path: str, line: int, column: str, cells: dict, lenient: bool,
            hint: str = " (mark the row failed = 1 if the training diverged)") -> float:
    """The cell as a float; NaN for an empty (or, when ``lenient``, non-finite) cell."""
    cell = cells.get(column)
    if _is_empty(cell):
        if lenient:
            return math.nan
        what = ("missing key" if column not in cells else "null value" if cell is None else
                "missing value (empty cell)")
        raise ObservationsError(path, line, column, f"{what}; mark the row failed = 1 if the "
                                "training produced no result")
    if isinstance(cell, str):
        text = cell.strip()
        if _NUMBER.fullmatch(text):
            value = float(text)
        elif _NONFINITE.fullmatch(text):
            value = float(text)
        else:
            raise ObservationsError(path, line, column, f"{cell!r} is not a number")
    elif isinstance(cell, (int, float)) and not isinstance(cell, bool):
        value = float(cell)
    else:
        raise ObservationsError(path, line, column, f"{json.dumps(cell)} is not a number")
    if not math.isfinite(value):
        if lenient:
            return math.nan
        raise ObservationsError(path, line, column, f"{value} is not a finite number{hint}")
    return value


def write_observations(path: "str | os.PathLike[str]", names: Sequence[str],
                       trials: Iterable[Any], *, format: Optional[str] = None) -> None:
    """Writes trials (objects with id, state, lam, features, value) as CSV or JSON Lines.

    Columns: id, state, val_loss, f_<name>..., lam_<name>...; unknown cells are empty (null).
    ``path`` "-" writes CSV (or ``format``) to stdout; a file is written whole or not at all.
    The output reads back with :func:`read_observations`.
    """
    path = os.fspath(path)
    format = format or file_format(path)
    if format not in ("csv", "jsonl"):
        raise ValueError(f"format must be 'csv' or 'jsonl', got {format!r}")
    columns = (["id", "state", "val_loss"] + [f"f_{n}" for n in names]
               + [f"lam_{n}" for n in names])
    rows = []
    for t in trials:
        f = [None] * len(names) if t.features is None else [float(x) for x in t.features]
        lam = [None] * len(names) if t.lam is None else [float(x) for x in t.lam]
        rows.append([int(t.id), t.state, t.value] + f + lam)
    buf = io.StringIO(newline="")
    if format == "csv":
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v
                             for v in row])
    else:
        for row in rows:
            buf.write(json.dumps(dict(zip(columns, row))) + "\n")
    if path == "-":
        sys.stdout.write(buf.getvalue())
        sys.stdout.flush()
        return
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".lossopt-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
