"""The ``lossopt`` command.

One subcommand per verb, each a ``cmd_<verb>(args) -> exit code`` function registered by an
``_add_<verb>(subparsers)`` function. The black-box verbs ``study`` (create, tell, ask, best,
export) and ``recommend`` live in :mod:`lossopt.blackbox.commands`.

Exit codes: 0 success, 1 error (message on stderr, never a traceback; set ``LOSSOPT_DEBUG=1`` to
see it), 2 bad usage (unknown problem, bad option), 130 interrupted.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

PROG = "lossopt"


class CLIError(Exception):
    """An error reported to the user as one message; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- helpers
def _problems() -> dict:
    from lossopt.problems import PROBLEMS

    return PROBLEMS


def _check_writable(path: Path, option: str) -> None:
    """Fail before any work if ``path`` cannot be written (missing folder, is a folder)."""
    if path.is_dir():
        raise CLIError(f"{option} {path}: is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"{option} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"{option} {path}: folder {parent} is not writable")


def _check_plot_path(path: Path) -> None:
    """Fail before any work if --plot cannot be written: folder, matplotlib, file format."""
    _check_writable(path, "--plot")
    try:
        from matplotlib.backend_bases import FigureCanvasBase  # no pyplot, no backend yet
    except ImportError:
        raise CLIError("--plot needs matplotlib: pip install 'lossopt[demo]'") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    ext = path.suffix[1:].lower()
    known = ", ".join(sorted(formats))
    if not ext:
        raise CLIError(f"--plot {path}: no file extension; give one matplotlib can write "
                       f"({known})")
    if ext not in formats:
        raise CLIError(f"--plot {path}: matplotlib cannot write .{ext} files; use one of "
                       f"{known}")


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise CLIError("--plot needs matplotlib: pip install 'lossopt[demo]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _jsonable(x: Any) -> Any:
    """Numpy / JAX values as plain JSON (non-finite floats become null)."""
    import numpy as np

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one readable line on stderr (no source line), after flushing stdout."""
    sys.stdout.flush()
    print(f"{PROG}: {category.__name__}: {message}", file=sys.stderr, flush=True)


def _call_factory(factory, seed: int, dtype) -> Any:
    """Builds a problem, passing ``seed`` and ``dtype`` where the factory accepts them."""
    params = inspect.signature(factory).parameters
    kwargs = {}
    if "seed" in params:
        kwargs["seed"] = seed
    if "dtype" in params:
        kwargs["dtype"] = dtype
    return factory(**kwargs)


# ----------------------------------------------------------------------------- tune
TUNE_DESCRIPTION = """\
Learn the loss hyperparameters λ of a ready-made problem by exact hypergradient descent
(implicit differentiation through the inner solve), then compare the untuned baseline λ0 with
the learned λ on held-out test data.

Each step solves θ*(λ) = argmin_θ λ·f(θ) on the training split, evaluates the validation log
loss and its gradient in λ, and lets the optimizer propose the next λ (kept feasible by the
problem's constraint). One progress line is printed per step; the run ends with a comparison
table, the learned λ by name, and whether it beat the baseline on test log loss."""

TUNE_EPILOG = """\
problems:
{problems}

examples:
  lossopt tune
  lossopt tune --problem digits-class-weights
  lossopt tune --steps 50 --out result.json --plot val_loss.png
  lossopt tune --float32 --quiet"""


def _add_tune(subparsers) -> None:
    problems = "\n".join(f"  {name}" for name in _problems())
    p = subparsers.add_parser(
        "tune",
        help="learn λ for a ready-made problem by hypergradient descent",
        description=TUNE_DESCRIPTION,
        epilog=TUNE_EPILOG.format(problems=problems),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--problem", default="logreg-l1l2", metavar="NAME",
                   help="which problem to tune (default: %(default)s; see the list below)")
    p.add_argument("--steps", type=_nonnegative_int, default=20, metavar="N",
                   help="optimizer steps; N + 1 inner solves, λ0 included (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the train/validation/test split (default: %(default)s)")
    p.add_argument("--float32", action="store_true",
                   help="compute in float32 (default: float64, whose tighter solves give "
                        "more accurate hypergradients)")
    p.add_argument("--out", type=Path, metavar="FILE.json",
                   help="write the result (λ0, learned λ, metrics, per-step history) as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="plot the validation loss per step to FILE (needs matplotlib; the "
                        "format comes from the extension: png, pdf, svg, ...)")
    p.add_argument("--quiet", action="store_true",
                   help="no per-step progress lines; print only the final summary")
    p.set_defaults(func=cmd_tune)


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _fmt_float(x: float, width: int = 10) -> str:
    return f"{x:>{width}.6f}" if math.isfinite(x) else f"{'n/a':>{width}}"


def cmd_tune(args: argparse.Namespace) -> int:
    problems = _problems()
    if args.problem not in problems:
        known = ", ".join(problems)
        raise CLIError(f"unknown problem {args.problem!r}; known problems: {known}", code=2)
    # Fail before any work on what would otherwise fail at the end.
    if args.out is not None:
        _check_writable(args.out, "--out")
    if args.plot is not None:
        _check_plot_path(args.plot)

    import jax

    # Must precede the creation of any array (the problem's data and θ0 included).
    jax.config.update("jax_enable_x64", not args.float32)
    import jax.numpy as jnp
    import numpy as np

    import lossopt

    dtype = jnp.float32 if args.float32 else jnp.float64
    try:
        problem = _call_factory(problems[args.problem], args.seed, dtype)
    except ImportError as e:
        raise CLIError(f"cannot load problem {args.problem!r}: {e}") from None

    quiet = args.quiet
    say = print
    names = None

    # ---- baseline: one solve at λ0 (time includes compilation, as the tuned column's does)
    solve = lossopt.argmin(problem.loss)
    t0 = time.perf_counter()
    theta_base, info_base = solve.with_info(problem.lam0, problem.theta0, problem.train)
    jax.block_until_ready(theta_base)
    base_seconds = time.perf_counter() - t0
    base_val = float(problem.val_loss(theta_base, problem.val))
    base_test = problem.metrics(theta_base, problem.test)

    say(f"lossopt tune: {problem.name} ({'float32' if args.float32 else 'float64'}, "
        f"{args.steps} steps, split seed {args.seed})")
    say(f"  {problem.description}")
    say(f"  constraint: {problem.constraint}")
    if not bool(info_base.converged):
        say(f"  note: the baseline solve did not converge (residual {float(info_base.residual):.3g})")

    # ---- tune, one progress line per inner solve
    header = (f"{'step':>4}  {'val loss':>10}  {'best':>10}  {'inner':>5}  {'adjoint':>7}  "
              f"converged")
    best_seen = {"value": math.inf, "any_converged": False}

    def progress(step: int, row: dict) -> None:
        v, ok = row["val_loss"], row["converged"]
        # Same rule as tune's best: converged rows first, then the lowest validation loss.
        if ok and not best_seen["any_converged"]:
            best_seen.update(value=math.inf, any_converged=True)
        if (ok or not best_seen["any_converged"]) and math.isfinite(v) and v < best_seen["value"]:
            best_seen["value"] = v
        if not quiet:
            if step == 0:
                say()
                say(header)
            say(f"{step:>4}  {_fmt_float(v)}  {_fmt_float(best_seen['value'])}  "
                f"{row['inner_steps']:>5}  {row['adjoint_steps']:>7}  {'yes' if ok else 'NO'}",
                flush=True)

    t0 = time.perf_counter()
    result = lossopt.tune(problem.loss, problem.val_loss, problem.theta0, problem.train,
                          problem.val, problem.lam0, constraint=problem.constraint,
                          steps=args.steps, callback=progress)
    tune_seconds = time.perf_counter() - t0
    if result.n_solves == 0:
        raise CLIError(f"tuning stopped before the first solve finished ({result.status})", code=130)
    names = list(result.names)
    tuned_test = problem.metrics(result.best_theta, problem.test)

    baseline = {"val_log_loss": base_val, "test_log_loss": base_test["log_loss"],
                "test_accuracy": base_test["accuracy"], "inner_solves": 1,
                "seconds": base_seconds}
    tuned = {"val_log_loss": result.best_val_loss, "test_log_loss": tuned_test["log_loss"],
             "test_accuracy": tuned_test["accuracy"], "inner_solves": result.n_solves,
             "seconds": tune_seconds}
    if "nonzero" in base_test:  # sparse models: how many weights are nonzero
        baseline["nonzero_weights"], tuned["nonzero_weights"] = base_test["nonzero"], tuned_test["nonzero"]

    # ---- summary
    say()
    if result.status != "completed":
        say(f"status: {result.status}")
    say(f"{'':<22}{'baseline λ0':>14}{'learned λ':>14}")
    say(f"{'validation log loss':<22}{baseline['val_log_loss']:>14.4f}{tuned['val_log_loss']:>14.4f}")
    say(f"{'test log loss':<22}{baseline['test_log_loss']:>14.4f}{tuned['test_log_loss']:>14.4f}")
    say(f"{'test accuracy':<22}{baseline['test_accuracy']:>14.2%}{tuned['test_accuracy']:>14.2%}")
    if "nonzero_weights" in baseline:
        say(f"{'nonzero weights':<22}{baseline['nonzero_weights']:>14d}{tuned['nonzero_weights']:>14d}")
    say(f"{'inner solves':<22}{baseline['inner_solves']:>14d}{tuned['inner_solves']:>14d}")
    say(f"{'seconds':<22}{baseline['seconds']:>14.2f}{tuned['seconds']:>14.2f}")
    say(f"(learned λ = the best validated of {result.n_solves} solves, step {result.best_step}; "
        "seconds include JIT compilation)")
    unconverged = int(np.sum(~np.asarray(result.history["converged"], dtype=bool)))
    if unconverged:
        say(f"warning: {unconverged} of {result.n_solves} solves did not reach their tolerance "
            "(converged = NO above); the learned λ is chosen among converged solves when any "
            "converged.")

    lam0 = np.asarray(problem.lam0, dtype=float)
    best = np.asarray(result.best_lam, dtype=float)
    group = [i for i, n in enumerate(names) if n.startswith("class_")]
    scale = float(np.mean(best[group])) if group else 0.0
    scale0 = float(np.mean(lam0[group])) if group else 0.0
    say()
    if group and scale > 0 and scale0 > 0:
        say(f"{'λ':<10}{'baseline':>12}{'learned':>12}{'learned ÷ mean class weight':>30}")
        for i, n in enumerate(names):
            say(f"{n:<10}{lam0[i]:>12.4g}{best[i]:>12.4g}{best[i] / scale:>30.4g}")
        say("Only the ratios of λ matter (argmin is scale invariant); the last column rescales "
            "λ so the class weights average 1.")
    else:
        say(f"{'λ':<10}{'baseline':>12}{'learned':>12}")
        for i, n in enumerate(names):
            say(f"{n:<10}{lam0[i]:>12.4g}{best[i]:>12.4g}")
        say("Only the ratios of λ matter (argmin is scale invariant).")

    diff = tuned["test_log_loss"] - baseline["test_log_loss"]
    if diff < 0:
        say(f"The learned λ beat the baseline on test log loss: {tuned['test_log_loss']:.4f} vs "
            f"{baseline['test_log_loss']:.4f} ({-diff / baseline['test_log_loss']:.1%} lower).")
    else:
        say(f"The learned λ did NOT beat the baseline on test log loss: "
            f"{tuned['test_log_loss']:.4f} vs {baseline['test_log_loss']:.4f} "
            "(it was chosen on validation data only).")

    # ---- files
    if args.out is not None:
        record = {
            "problem": problem.name, "names": names, "lam0": lam0, "best_lam": best,
            "best_val_loss": result.best_val_loss, "best_step": result.best_step,
            "status": result.status, "steps": args.steps, "seed": args.seed,
            "dtype": "float32" if args.float32 else "float64",
            "baseline": baseline, "tuned": tuned, "history": result.history,
        }
        try:
            args.out.write_text(json.dumps(_jsonable(record), indent=2) + "\n")
        except OSError as e:
            raise CLIError(f"--out {args.out}: cannot write: {e.strerror or e}") from None
        say(f"wrote {args.out}")
    if args.plot is not None:
        _plot_history(result, baseline["val_log_loss"], problem.name, args.plot)
        say(f"wrote {args.plot}")
    return 0


def _plot_history(result, base_val: float, title: str, path: Path) -> None:
    import numpy as np

    plt = _require_matplotlib()
    val = np.asarray(result.history["val_loss"], dtype=float)
    ok = np.asarray(result.history["converged"], dtype=bool)
    steps = np.arange(len(val))
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        ax.plot(steps, val, marker="o", label="validation loss at step")
        ax.plot(steps, np.fmin.accumulate(np.where(ok, val, np.inf)) if ok.any() else
                np.fmin.accumulate(val), drawstyle="steps-post", label="best so far")
        if (~ok).any():
            ax.scatter(steps[~ok], val[~ok], marker="x", color="red", zorder=3,
                       label="unconverged solve")
        ax.axhline(base_val, color="gray", linestyle="--", label="baseline λ0")
        ax.set_xlabel("step (one inner solve each)")
        ax.set_ylabel("validation log loss")
        ax.set_title(f"lossopt tune: {title}")
        ax.legend()
        fig.tight_layout()
        try:
            fig.savefig(path, dpi=100)
        except OSError as e:
            raise CLIError(f"--plot {path}: cannot write: {e.strerror or e}") from None
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- main
DESCRIPTION = """\
lossopt learns the hyperparameters λ of linear losses L(θ; λ) = λ·f(θ): training minimizes
λ·f over the model θ, and lossopt finds the λ whose trained model does best on validation data,
using exact hypergradients (implicit differentiation, JAX)."""


def build_parser() -> argparse.ArgumentParser:
    from lossopt import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION,
        epilog="Run 'lossopt COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    _add_tune(subparsers)
    from lossopt.blackbox.commands import _add_recommend, _add_study

    _add_study(subparsers)
    _add_recommend(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lossopt`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except CLIError as e:
        sys.stdout.flush()
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback for the user, unless asked for
        if os.environ.get("LOSSOPT_DEBUG"):
            raise
        print(f"{PROG} {args.command}: error: {type(e).__name__}: {e}\n"
              "(set LOSSOPT_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
