"""LinearLoss: a loss that is linear in its hyperparameters, L(θ; λ) = λ·f(θ)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lossopt.prox import as_term


def default_names(k: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(k))


class LinearLoss:
    """The loss family L(θ; λ) = λ·f(θ, data) = Σ_j λ_j f_j(θ, data).

    Args:
      features: ``features(theta, data) -> array of shape (k,)``; ``theta`` and ``data`` are
        pytrees. Each component is one term of the loss (a regularizer's value, the training loss
        on one class, under one augmentation...).
      names: one name per component (default ``"0" .. "k-1"``). Constraints and reports use them.
      prox: ``{name or index (or a tuple / range of them): term}`` for nonsmooth components,
        e.g. ``{"l1": lossopt.prox.l1}`` (see :mod:`lossopt.prox`); stored as given. A loss with
        prox terms is solved by proximal gradient and differentiated through its proximal fixed
        point (:mod:`lossopt.implicit_prox`); ``features`` still returns those components' values.
    """

    def __init__(
        self,
        features: Callable[[Any, Any], jax.Array],
        names: Sequence[str] | None = None,
        prox: Mapping[Any, Any] | None = None,
    ):
        if not callable(features):
            raise TypeError(f"features must be a callable features(theta, data), got {type(features).__name__}")
        self.features = features
        if names is not None:
            if isinstance(names, str):
                raise TypeError("names must be a sequence of strings, not one string")
            names = tuple(str(n) for n in names)
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"duplicate feature names: {dup}")
        self.names = names
        self.prox = dict(prox or {})
        for key, term in self.prox.items():  # fail here, not at the first solve
            as_term(term, key)

    def __repr__(self) -> str:
        return f"LinearLoss({getattr(self.features, '__name__', self.features)!r}, names={self.names})"

    def value(self, lam, theta, data) -> jax.Array:
        """λ·f(θ, data)."""
        return jnp.vdot(lam, self.features(theta, data))

    def num_features(self, theta, data) -> int:
        """k, read from the shape ``features`` returns (no computation); checks it is 1-D."""
        try:
            out = jax.eval_shape(self.features, theta, data)
        except (TypeError, ValueError) as e:
            raise type(e)(f"features(theta, data) failed on the given theta and data: {e}") from e
        shape = getattr(out, "shape", None)
        if shape is None or len(shape) != 1:
            raise ValueError(
                f"features(theta, data) must return a 1-D array of length k; it returned "
                f"{'shape ' + str(tuple(shape)) if shape is not None else type(out).__name__}"
            )
        k = shape[0]
        if self.names is not None and k != len(self.names):
            raise ValueError(
                f"features(theta, data) returned {k} components but {len(self.names)} names were "
                f"given: {list(self.names)}"
            )
        if not jnp.issubdtype(out.dtype, jnp.floating):
            raise TypeError(f"features(theta, data) must return floats, got dtype {out.dtype}")
        return k

    def names_for(self, k: int) -> tuple[str, ...]:
        return self.names if self.names is not None else default_names(k)

    def check_lam(self, lam, k: int) -> None:
        """Check λ's shape against k and, when λ is concrete, that it is finite."""
        names = self.names_for(k)
        shape = np.shape(lam)
        if len(shape) != 1 or shape[0] != k:
            raise ValueError(
                f"lam must be a 1-D array of length k={k} (features {list(names)}), got shape {shape}"
            )
        if isinstance(lam, jax.core.Tracer):
            return  # inside a transformation: non-finite values show up in info instead
        arr = np.asarray(lam)
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"lam must be a floating-point array, got dtype {arr.dtype}")
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"lam[{i}] (feature {names[i]!r}) is {arr[i]}; every component must be finite")
