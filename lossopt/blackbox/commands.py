"""The black-box verbs of the ``lossopt`` command: ``study create|tell|ask|best|export`` and the
stateless ``recommend``. Registered by :func:`lossopt.cli.build_parser`, following its pattern
(``_add_<verb>(subparsers)`` / ``cmd_<verb>(args) -> exit code``, errors as ``CLIError``).

Results go to stdout as JSON (one object per line); notes and errors to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import List, Optional, Sequence

from lossopt.cli import CLIError, _jsonable

CONSTRAINT_TITLE = "constraint (λ >= 0 always)"
CONSTRAINT_DESCRIPTION = """\
Without --fixed, --simplex or a finite upper bound the feasible set is a cone (the trained model
does not change when λ is scaled), and suggestions are normalized."""


# ----------------------------------------------------------------------------- constraints
def _add_constraint_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(CONSTRAINT_TITLE, CONSTRAINT_DESCRIPTION)
    g.add_argument("--fixed", action="append", default=[], metavar="NAME=VALUE",
                   help="pin λ_NAME = VALUE (repeatable; e.g. --fixed data=1 fixes the scale)")
    g.add_argument("--bounds", action="append", default=[], metavar="NAME=LO:HI",
                   help="keep LO <= λ_NAME <= HI; LO or HI may be left empty (0 and +inf) "
                        "(repeatable)")
    g.add_argument("--simplex", action="store_true",
                   help="λ >= 0 and Σ λ = 1: suggestions also come as probabilities")


def _split_assignment(text: str, option: str, example: str) -> tuple:
    name, sep, rest = text.rpartition("=")
    if not sep or not name.strip():
        raise CLIError(f"{option} {text!r}: expected {example}", code=2)
    return name.strip(), rest.strip()


def _parse_float(text: str, where: str, allow_inf: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CLIError(f"{where}: {text!r} is not a number", code=2) from None
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise CLIError(f"{where}: {text!r} is not a finite number", code=2)
    return value


def _check_file(path: str) -> None:
    """An observations file must be a regular file: say which of the two it is not."""
    if not os.path.exists(path):
        raise CLIError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise CLIError(f"{path}: not a regular file (observations are read from a CSV or JSON "
                       "Lines file)")


def constraint_from_args(fixed: Sequence[str] = (), bounds: Sequence[str] = (),
                         simplex: bool = False, sources: Optional[dict] = None):
    """``nonnegative()`` and the --fixed / --bounds / --simplex options, as one Constraint.

    Negative values, inverted bounds and a name given twice are usage errors (exit code 2); names
    are resolved (and an infeasible combination detected) when the constraint is bound — use
    :func:`bind_from_args` for messages that name the options. Each option becomes its own part;
    ``sources`` (if given) receives {repr(part): the option as typed, e.g. "--fixed data=1"}.
    """
    from lossopt import constraints as C

    sources = {} if sources is None else sources
    out = C.nonnegative()
    sources[repr(out)] = "λ >= 0"
    pinned = set()
    for text in fixed:
        name, value = _split_assignment(text, "--fixed", "NAME=VALUE, e.g. data=1")
        value = _parse_float(value, f"--fixed {text}")
        if value < 0:
            raise CLIError(f"--fixed {text}: {value} is negative; λ is nonnegative", code=2)
        if name in pinned:
            raise CLIError(f"--fixed: {name!r} is given twice", code=2)
        pinned.add(name)
        part = C.fixed({name: value})
        sources[repr(part)] = f"--fixed {text}"
        out = out & part
    seen = set()
    for text in bounds:
        name, spec = _split_assignment(text, "--bounds", "NAME=LO:HI, e.g. l2=1e-6:10")
        lo_text, sep, hi_text = spec.partition(":")
        if not sep:
            raise CLIError(f"--bounds {text}: expected NAME=LO:HI (LO or HI may be empty)",
                           code=2)
        if name in seen:
            raise CLIError(f"--bounds: {name!r} is given twice", code=2)
        seen.add(name)
        lo = _parse_float(lo_text, f"--bounds {text}: LO") if lo_text.strip() else 0.0
        hi = (_parse_float(hi_text, f"--bounds {text}: HI", allow_inf=True)
              if hi_text.strip() else math.inf)
        if lo < 0 or hi < 0:
            raise CLIError(f"--bounds {text}: a negative bound; λ is nonnegative (use LO >= 0)",
                           code=2)
        if lo > hi:
            raise CLIError(f"--bounds {text}: inverted bounds, LO = {lo} > HI = {hi}", code=2)
        lower = {name: lo} if lo_text.strip() else None
        upper = {name: hi} if hi_text.strip() and math.isfinite(hi) else None
        if lower or upper:
            part = C.box(lower, upper)
            sources[repr(part)] = f"--bounds {text}"
            out = out & part
    if simplex:
        part = C.simplex(1.0)
        sources[repr(part)] = "--simplex"
        out = out & part
    return out


def bind_from_args(args: argparse.Namespace, k: int, names: Sequence[str]):
    """The --fixed / --bounds / --simplex options bound to (k, names); every error names the
    option as the user typed it (never a Python repr)."""
    sources: dict = {}
    constraint = constraint_from_args(args.fixed, args.bounds, args.simplex, sources)
    names = list(names)
    shown = ", ".join(names[:20]) + (f", … ({len(names)} in all)" if len(names) > 20 else "")
    for option, texts in (("--fixed", args.fixed), ("--bounds", args.bounds)):
        for text in texts:
            name = text.rpartition("=")[0].strip()
            if name not in names:
                raise CLIError(f"{option} {text}: unknown component name {name!r} "
                               f"(names: {shown})")
    try:
        return constraint.bind(k, names)
    except ValueError as e:
        message = str(e)
        for part, flag in sources.items():
            message = message.replace(part, flag)
        raise CLIError(message) from None


def _suggestion_json(s) -> dict:
    out = {"id": s.id, "lam": s.params}
    if s.probabilities is not None:
        out["probabilities"] = s.probabilities
    return out


def _print_json(obj) -> None:
    print(json.dumps(_jsonable(obj)), flush=True)


def _user_errors(func):
    """ValueError / TypeError from the library become a CLIError (exit 1, one message)."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (ValueError, TypeError) as e:
            raise CLIError(str(e)) from None

    wrapped.__name__ = func.__name__
    wrapped.__doc__ = func.__doc__
    return wrapped


def _vector(values: Optional[List[str]], option: str) -> Optional[List[float]]:
    """--features 1 2 3 or --features 1,2,3 → floats (NaN/inf rejected by the Study)."""
    if values is None:
        return None
    out = []
    for chunk in values:
        for text in filter(None, (t.strip() for t in chunk.split(","))):
            try:
                out.append(float(text))
            except ValueError:
                raise CLIError(f"{option}: entry {len(out)} is {text!r}, not a number",
                               code=2) from None
    return out


def _open_study(path: str):
    from lossopt.blackbox.storage import SQLiteStorage
    from lossopt.blackbox.study import Study

    study = Study(storage=SQLiteStorage(path, create=False))
    if study.k is None:
        raise CLIError(f"{path}: the storage holds no study yet; create one with "
                       "`lossopt study create PATH --names ...`")
    return study


# ----------------------------------------------------------------------------- study
STUDY_DESCRIPTION = """\
An ask/tell study kept in one SQLite file (safe to share between processes): ask for the next λ
to train with, train elsewhere, tell the trained model's features f(θ) and validation loss."""

STUDY_EPILOG = """\
examples:
  lossopt study create study.db --names data l2 --fixed data=1 --bounds l2=1e-6:10
  lossopt study ask study.db -n 4            # one JSON suggestion per line
  lossopt study tell study.db --id 0 --features 0.31 12.5 --value 0.42
  lossopt study tell study.db results.csv    # columns val_loss, f_<name>, [lam_<name>, failed]
  lossopt study best study.db
  lossopt study export study.db trials.csv"""


def _add_study(subparsers) -> None:
    p = subparsers.add_parser(
        "study", help="ask/tell study over a storage file (black-box path)",
        description=STUDY_DESCRIPTION, epilog=STUDY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(title="study commands", dest="study_command", metavar="VERB")
    verbs.required = True

    c = verbs.add_parser("create", help="create a study file",
                         description="Create a study in a new SQLite file.",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("storage", metavar="STORAGE", help="path of the SQLite file to create")
    size = c.add_mutually_exclusive_group(required=True)
    size.add_argument("--names", nargs="+", metavar="NAME",
                      help="component names (space- or comma-separated); k = their number")
    size.add_argument("--k", type=int, metavar="K", help="number of components (names 0..K-1)")
    _add_constraint_options(c)
    c.add_argument("--seed", type=int, default=0, help="seed of the suggestions (default 0)")
    c.set_defaults(func=cmd_study_create)

    t = verbs.add_parser("tell", help="record observations",
                         description="Record observations: every row of FILE (CSV or JSON Lines "
                                     "with columns val_loss, f_<name>, optional lam_<name>, "
                                     "failed), or one observation given by options.")
    t.add_argument("storage", metavar="STORAGE")
    t.add_argument("file", nargs="?", metavar="FILE", help="observations file (.csv / .jsonl)")
    t.add_argument("--features", nargs="+", metavar="X", help="f(θ), k numbers")
    t.add_argument("--value", metavar="V", help="validation loss of the trained model")
    t.add_argument("--lam", nargs="+", metavar="X", help="λ trained with (optional)")
    t.add_argument("--id", type=int, help="id of the suggestion this result answers")
    t.add_argument("--failed", action="store_true", help="the training failed (excluded from "
                                                         "the model)")
    t.set_defaults(func=cmd_study_tell)

    a = verbs.add_parser("ask", help="suggest λ to train with (JSON, one per line)",
                         description="Print the next λ as JSON, one suggestion per line: "
                                     '{"id": ..., "lam": {name: value}} plus "probabilities" '
                                     "under a simplex. Each is recorded as pending.")
    a.add_argument("storage", metavar="STORAGE")
    a.add_argument("-n", type=int, default=1, metavar="N",
                   help="number of distinct suggestions, for parallel workers (default 1)")
    a.set_defaults(func=cmd_study_ask)

    b = verbs.add_parser("best", help="print the best observation (JSON)")
    b.add_argument("storage", metavar="STORAGE")
    b.set_defaults(func=cmd_study_best)

    e = verbs.add_parser("export", help="write every trial as CSV or JSON Lines",
                         description="Write every trial (id, state, val_loss, f_<name>, "
                                     "lam_<name>) to OUT: .jsonl gives JSON Lines, anything "
                                     "else CSV, - writes CSV to stdout.")
    e.add_argument("storage", metavar="STORAGE")
    e.add_argument("out", metavar="OUT", help="OUT.csv, OUT.jsonl or - (stdout)")
    e.set_defaults(func=cmd_study_export)


@_user_errors
def cmd_study_create(args: argparse.Namespace) -> int:
    from lossopt.blackbox.study import Study

    if os.path.exists(args.storage):
        raise CLIError(f"{args.storage} already exists; choose a new file name (open an existing "
                       "study with the other study commands)")
    names = None
    if args.names is not None:
        names = [n.strip() for chunk in args.names for n in chunk.split(",") if n.strip()]
    constraint_from_args(args.fixed, args.bounds, args.simplex)  # usage errors first
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}", code=2)
    k = None if names is not None else args.k
    # Bind first so that a bad option never leaves a file behind.
    from lossopt.blackbox._checks import check_k, check_names

    if names is not None:
        names = check_names(names)
    else:
        check_k(k, "--k")
    constraint = bind_from_args(args, len(names) if names is not None else k,
                                names if names is not None else tuple(map(str, range(k))))
    study = Study(k=k, names=names, constraint=constraint, storage=args.storage, seed=args.seed)
    from lossopt.blackbox.storage import bound_to_json

    _print_json({"created": args.storage, "k": study.k, "names": list(study.names),
                 "constraint": bound_to_json(study.constraint), "seed": study.seed})
    study.close()
    return 0


@_user_errors
def cmd_study_tell(args: argparse.Namespace) -> int:
    one = args.features is not None or args.value is not None or args.lam is not None or \
        args.id is not None or args.failed
    if (args.file is None) == (not one):
        raise CLIError("give either FILE or --features/--value (and optionally --lam, --id, "
                       "--failed)", code=2)
    study = _open_study(args.storage)
    try:
        if args.file is not None:
            _check_file(args.file)
            ids = study.tell_file(args.file)
        else:
            try:  # NaN / inf pass here: the Study names them (and accepts them when --failed)
                value = None if args.value is None else float(args.value)
            except ValueError:
                raise CLIError(f"--value: {args.value!r} is not a number", code=2) from None
            ids = [study.tell(_vector(args.features, "--features"), value,
                              lam=_vector(args.lam, "--lam"), id=args.id, failed=args.failed)]
    finally:
        study.close()
    _print_json({"told": ids})
    return 0


@_user_errors
def cmd_study_ask(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise CLIError(f"-n must be >= 1, got {args.n}", code=2)
    study = _open_study(args.storage)
    try:
        suggestions = study.ask(args.n)
    finally:
        study.close()
    for s in suggestions:
        _print_json(_suggestion_json(s))
    return 0


@_user_errors
def cmd_study_best(args: argparse.Namespace) -> int:
    study = _open_study(args.storage)
    try:
        best, names = study.best, study.names
    finally:
        study.close()
    if best is None:
        raise CLIError(f"{args.storage}: no complete observation yet (tell one with `lossopt "
                       "study tell`)")
    by_name = lambda a: None if a is None else dict(zip(names, map(float, a)))
    _print_json({"id": best.id, "value": best.value, "lam": by_name(best.lam),
                 "features": by_name(best.features)})
    return 0


@_user_errors
def cmd_study_export(args: argparse.Namespace) -> int:
    from lossopt.blackbox.files import write_observations

    if args.out != "-":
        from lossopt.cli import _check_writable
        from pathlib import Path

        _check_writable(Path(args.out), "OUT")
    study = _open_study(args.storage)
    try:
        trials, names = study.trials, study.names
    finally:
        study.close()
    write_observations(args.out, names, trials)
    return 0


# ----------------------------------------------------------------------------- recommend
RECOMMEND_DESCRIPTION = """\
Recommend the next λ to train with from a file of observations (no state kept): prints
{"lam": {name: value}} as JSON, plus "probabilities" under --simplex. The file is CSV or JSON
Lines with columns val_loss, f_<name> per feature, optional lam_<name> and failed. The same
file, seed and options always give the same λ — the one a study told this file would suggest."""


def _add_recommend(subparsers) -> None:
    p = subparsers.add_parser(
        "recommend", help="recommend the next λ from an observations file (JSON)",
        description=RECOMMEND_DESCRIPTION,
        epilog="example:\n  lossopt recommend examples/observations.csv --fixed class_0=1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="observations (.csv or .jsonl)")
    _add_constraint_options(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the recommendation (default 0)")
    p.set_defaults(func=cmd_recommend)


@_user_errors
def cmd_recommend(args: argparse.Namespace) -> int:
    import numpy as np

    from lossopt.blackbox.files import read_observations
    from lossopt.blackbox.study import check_told_lams, next_lams, probabilities

    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}", code=2)
    constraint_from_args(args.fixed, args.bounds, args.simplex)  # usage errors first
    _check_file(args.file)
    obs = read_observations(args.file)
    bound = bind_from_args(args, obs.k, obs.names)
    check_told_lams(obs, bound)
    ok = ~obs.failed
    known = ~np.isnan(obs.lams).any(axis=1)
    lam = next_lams(obs.features[ok], obs.values[ok], obs.lams[known] if known.any() else None,
                    bound, args.seed, len(obs), 1)[0]
    out = {"lam": dict(zip(obs.names, map(float, lam)))}
    p = probabilities(lam, bound)
    if p is not None:
        out["probabilities"] = p
    _print_json(out)
    return 0
