"""Study: ask/tell bookkeeping, determinism, constraints, bad input, and a finite pool."""

import numpy as np
import pytest

import lossopt
from lossopt.blackbox import MAX_K, Study, Suggestion
from lossopt.constraints import box, fixed, nonnegative, simplex


def test_ask_tell_pending_and_distinct():
    study = Study(names=["a", "b", "c"])
    first = study.ask()
    assert isinstance(first, Suggestion) and first.id == 0
    assert first.lam.shape == (3,) and first.names == ("a", "b", "c")
    assert first.params == dict(zip("abc", first.lam.tolist()))
    assert first.probabilities is None  # no simplex
    batch = study.ask(4)
    assert [s.id for s in batch] == [1, 2, 3, 4]
    lams = np.array([first.lam] + [s.lam for s in batch])
    # distinct: no two suggestions (pending ones included) coincide, even up to scale
    unit = lams / lams.sum(axis=1, keepdims=True)
    assert min(np.abs(unit[i] - unit[j]).max() for i in range(5) for j in range(i)) > 1e-6
    assert [t.state for t in study.trials] == ["pending"] * 5
    assert study.best is None

    assert study.tell([1.0, 2.0, 3.0], 0.7, id=batch[1].id) == 2
    trials = study.trials
    assert [t.state for t in trials] == ["pending", "pending", "complete", "pending", "pending"]
    assert trials[2].lam.tolist() == batch[1].lam.tolist()  # λ known from the suggestion
    assert study.best.id == 2 and study.best.value == 0.7

    # later suggestions avoid every λ asked so far
    more = study.ask(3)
    unit_more = np.array([s.lam / s.lam.sum() for s in more])
    assert np.min(np.abs(unit_more[:, None, :] - unit[None]).max(axis=2)) > 1e-6


def test_tell_twice_unknown_id_and_mismatched_lam_are_errors_that_lose_nothing():
    study = Study(k=2)
    s = study.ask()
    study.tell([1.0, 2.0], 0.5, id=s.id)
    with pytest.raises(ValueError, match=r"trial 0 was already told \(state 'complete', "
                                         r"value 0.5\)"):
        study.tell([3.0, 4.0], 0.1, id=s.id)
    with pytest.raises(ValueError, match="no trial with id 7"):
        study.tell([3.0, 4.0], 0.1, id=7)
    t = study.ask()
    with pytest.raises(ValueError, match=r"lam differs from the λ of suggestion 1 at '1'"):
        study.tell([3.0, 4.0], 0.1, id=t.id, lam=t.lam * [1.0, 2.0])
    with pytest.raises(TypeError, match="id must be an int"):
        study.tell([3.0, 4.0], 0.1, id="1")
    trials = study.trials
    assert [(x.state, x.value) for x in trials] == [("complete", 0.5), ("pending", None)]
    assert trials[0].features.tolist() == [1.0, 2.0]
    # the pending one can still be told (failed, without features)
    assert study.tell(None, None, id=t.id, failed=True) == 1
    assert study.trials[1].state == "failed" and study.trials[1].lam.tolist() == t.lam.tolist()


BAD_TELLS = [
    # (features, value, lam, exception, message fragment)
    ([1.0, np.nan, 3.0], 0.5, None, ValueError, r"features: component 'b' \(index 1\) is nan"),
    ([1.0, 2.0, np.inf], 0.5, None, ValueError, r"component 'c' \(index 2\) is inf"),
    ([1.0, 2.0, 3.0], np.nan, None, ValueError, r"value \(the validation loss\) is nan"),
    ([1.0, 2.0, 3.0], -np.inf, None, ValueError, r"is -inf, not a finite number"),
    ([1.0, 2.0, 3.0], None, None, TypeError, r"value .* is missing"),
    ([1.0, 2.0, 3.0], "0.5", None, TypeError, r"must be a real number"),
    ([1.0, 2.0, 3.0], True, None, TypeError, r"must be a real number"),
    ([1.0, 2.0], 0.5, None, ValueError, r"features has length 2, expected k = 3"),
    ([1.0, 2.0, 3.0, 4.0], 0.5, None, ValueError, r"has length 4, expected k = 3"),
    ([[1.0, 2.0, 3.0]], 0.5, None, ValueError, r"must be a 1-D vector"),
    ([1.0, "x", 3.0], 0.5, None, TypeError, r"component 'b' \(index 1\) is 'x', not a number"),
    ([1.0, None, 3.0], 0.5, None, TypeError, r"component 'b' \(index 1\) is None"),
    ([1.0, True, 3.0], 0.5, None, TypeError, r"component 'b' \(index 1\) is True"),
    ("1,2,3", 0.5, None, TypeError, r"got the string"),
    (None, 0.5, None, TypeError, r"only a failed trial"),
    ([1.0, 2.0, 3.0], 0.5, [1.0, np.nan, 1.0], ValueError, r"lam: component 'b'"),
    ([1.0, 2.0, 3.0], 0.5, [1.0, 1.0], ValueError, r"lam has length 2"),
]


@pytest.mark.parametrize("features,value,lam,exc,message", BAD_TELLS)
def test_bad_tells_name_the_component_and_store_nothing(tmp_path, features, value, lam, exc,
                                                        message):
    study = Study(names=["a", "b", "c"], storage=tmp_path / "s.db")
    study.tell([0.1, 0.2, 0.3], 1.5)
    with pytest.raises(exc, match=message):
        study.tell(features, value, lam=lam)
    reopened = Study(storage=tmp_path / "s.db")
    assert [(t.id, t.value) for t in reopened.trials] == [(0, 1.5)]


def test_k_limits():
    with pytest.raises(ValueError, match=r"k = 1001 exceeds the black-box path's maximum of 1000"):
        Study(k=MAX_K + 1)
    with pytest.raises(ValueError, match=r"number of names = 1001 exceeds"):
        Study(names=[f"x{i}" for i in range(MAX_K + 1)])
    study = Study()  # k inferred from the first features told
    with pytest.raises(ValueError, match=r"length of features = 1001 exceeds"):
        study.tell(np.ones(MAX_K + 1), 0.5)
    assert study.k is None and study.trials == []
    with pytest.raises(ValueError, match="k is unknown"):
        study.ask()
    assert study.tell(np.ones(MAX_K), 0.5) == 0 and study.k == MAX_K
    for bad, exc in ((0, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="k must"):
            Study(k=bad)
    with pytest.raises(ValueError, match="names has 2 entries but k = 3"):
        Study(k=3, names=["a", "b"])
    with pytest.raises(ValueError, match=r"unique: 'a' is names\[0\] and names\[2\]"):
        Study(names=["a", "b", "a"])


def test_bad_constraints_are_clear_errors():
    with pytest.raises(ValueError, match=r"component 'b' \(index 1\): empty bounds: lower bound "
                                         r"3.0"):
        Study(names=["a", "b"], constraint=box(lower={"b": 3.0}, upper={"b": 1.0}))
    with pytest.raises(ValueError, match=r"simplex\(total=1.0\) is infeasible"):
        Study(names=["a", "b"], constraint=simplex() & fixed({"a": 2.0}))
    with pytest.raises(ValueError, match=r"fixed value -1.0 is below the lower bound 0.0 \(from "
                                         r"nonnegative\(\)\)"):
        Study(names=["a", "b"], constraint=nonnegative() & fixed({"a": -1.0}))
    with pytest.raises(ValueError, match="unknown component name 'z'"):
        Study(names=["a", "b"], constraint=fixed({"z": 1.0}))
    with pytest.raises(TypeError, match="constraint must be None or built from"):
        Study(k=2, constraint="nonnegative")
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        Study(k=2, seed=-1)


def _history(study, rounds, rng):
    out = []
    for _ in range(rounds):
        s = study.ask()
        f = rng.random(study.k)
        study.tell(f, float(f @ [1.0, -2.0, 0.5]), id=s.id)
        out.append(s.lam)
    return np.array(out)


def test_deterministic_for_a_seed_and_history_and_across_reopening(tmp_path):
    a = _history(Study(k=3, seed=3), 6, np.random.default_rng(0))
    b = _history(Study(k=3, seed=3, storage=tmp_path / "s.db"), 6, np.random.default_rng(0))
    assert np.array_equal(a, b)
    c = _history(Study(k=3, seed=4), 6, np.random.default_rng(0))
    assert not np.allclose(a, c)
    # a reopened study suggests what the uninterrupted one suggests next
    memory = Study(k=3, seed=3)
    _history(memory, 6, np.random.default_rng(0))
    assert np.array_equal(Study(storage=tmp_path / "s.db").ask().lam, memory.ask().lam)


@pytest.mark.parametrize("constraint,check", [
    (nonnegative() & fixed({"a": 1.0}), lambda lam: lam[0] == 1.0),
    (nonnegative() & box(lower={"b": 0.5}, upper={"b": 2.0, "c": 3.0}),
     lambda lam: 0.5 <= lam[1] <= 2.0 and lam[2] <= 3.0),
    (simplex(), lambda lam: abs(lam.sum() - 1) < 1e-12),
    (nonnegative() & simplex(2.0, over=["a", "b"]) & box(upper={"c": 1.0}),
     lambda lam: abs(lam[:2].sum() - 2) < 1e-12 and 0 <= lam[2] <= 1),
])
def test_suggestions_are_feasible(constraint, check):
    study = Study(names=["a", "b", "c"], constraint=constraint, seed=1)
    rng = np.random.default_rng(1)
    for round_ in range(4):
        for s in study.ask(3):
            study.constraint.check(s.lam)
            assert check(s.lam) and (s.lam >= 0).all()
            if study.constraint.sum_mask is not None:
                total = study.constraint.total
                names = [n for n, m in zip("abc", study.constraint.sum_mask) if m]
                assert list(s.probabilities) == names
                assert sum(s.probabilities.values()) == pytest.approx(1.0, abs=1e-12)
                assert s.probabilities["a"] == pytest.approx(s.lam[0] / total, rel=1e-15)
            else:
                assert s.probabilities is None
            f = rng.random(3)
            study.tell(f, float(np.sin(3 * f).sum()), id=s.id)


def test_cone_suggestions_are_normalized():
    from lossopt.blackbox.recommend import normalize

    study = Study(k=3)
    for s in study.ask(5):
        assert np.allclose(normalize(s.lam, study.constraint), s.lam, rtol=1e-12)
        assert s.lam.sum() == pytest.approx(1.0)


def test_failed_and_pending_trials_are_not_modelled_but_avoided(monkeypatch):
    import lossopt.blackbox.recommend as rec

    seen = {}
    real = rec.recommend

    def spy(features, values, bound, *, rng, n=1, avoid=None):
        seen.update(features=np.array(features), values=np.array(values), avoid=avoid)
        return real(features, values, bound, rng=rng, n=n, avoid=avoid)

    monkeypatch.setattr(rec, "recommend", spy)
    study = Study(k=2)
    pending = study.ask()
    study.tell([1.0, 2.0], 0.5, lam=[0.3, 0.7])
    study.tell([9.0, 9.0], None, lam=[0.9, 0.1], failed=True)
    study.tell([np.nan, 1.0], np.inf, failed=True)  # a diverged run: kept, never modelled
    study.tell([1.0, 2.0], 0.5, lam=[0.3, 0.7])  # a duplicate observation is accepted
    study.ask()
    assert seen["features"].tolist() == [[1.0, 2.0], [1.0, 2.0]]
    assert seen["values"].tolist() == [0.5, 0.5]
    assert seen["avoid"].tolist() == [pending.lam.tolist(), [0.3, 0.7], [0.9, 0.1], [0.3, 0.7]]
    states = [t.state for t in study.trials]
    assert states == ["pending", "complete", "failed", "failed", "complete", "pending"]
    assert np.isnan(study.trials[3].features[0]) and study.trials[3].value is None
    assert study.best.id == 1  # ties: the earliest


def test_to_dict_and_to_csv(tmp_path):
    study = Study(names=["a", "b"], constraint=nonnegative() & fixed({"a": 1.0}), seed=5)
    s = study.ask()
    study.tell([1.0, 2.0], 0.25, id=s.id)
    study.tell(None, None, failed=True)
    d = study.to_dict()
    assert d["k"] == 2 and d["names"] == ["a", "b"] and d["seed"] == 5 and d["best"] == 0
    assert d["constraint"] == {"lower": [1.0, 0.0], "upper": [1.0, None], "sum_mask": None,
                               "total": None}
    assert d["trials"][0] == {"id": 0, "state": "complete", "value": 0.25,
                              "lam": s.lam.tolist(), "features": [1.0, 2.0]}
    assert d["trials"][1]["state"] == "failed" and d["trials"][1]["features"] is None
    study.to_csv(tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "id,state,val_loss,f_a,f_b,lam_a,lam_b"
    assert lines[1] == f"0,complete,0.25,1.0,2.0,1.0,{float(s.lam[1])!r}"
    assert lines[2] == "1,failed,,,,,"


def test_exported_from_the_package():
    assert lossopt.Study is Study and lossopt.Suggestion is Suggestion


def _pool(seed, m=25):
    """Models on an arc: f_i = 1 − u_i with u_i ≥ 0 unit vectors, so model i is the exact argmin
    of λ·f over the pool for λ ∝ u_i — every model is reachable."""
    rng = np.random.default_rng(100 + seed)
    angles = np.sort(rng.uniform(0, np.pi / 2, m))
    u = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    target = rng.uniform(0, np.pi / 2)
    values = (angles - target) ** 2 + 0.05 * np.sin(9 * angles)
    return 1 - u, values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reaches_the_best_model_of_a_finite_pool(seed):
    features, values = _pool(seed)
    study = Study(names=["x", "y"], seed=seed)
    for step in range(1, 61):
        s = study.ask()
        i = int(np.argmin(features @ s.lam))  # "training": the exact argmin over the pool
        study.tell(features[i], values[i], id=s.id)
        if values[i] == values.min():
            break
    assert study.best.value == values.min(), f"not reached in {step} trainings"


def test_told_lam_must_be_nonnegative_where_the_constraint_requires_it():
    study = Study(names=["data", "l2"],
                  constraint=nonnegative() & fixed({"data": 1.0}) & box({"l2": 1e-6}, {"l2": 10}))
    with pytest.raises(ValueError) as info:
        study.tell([0.3, 9.0], 0.4, lam=[1.0, -1.0])
    assert "λ_l2 = -1.0" in str(info.value) and "'l2'" in str(info.value)
    assert ">= 0" in str(info.value)
    with pytest.raises(ValueError, match=r"lam: component 'l2' \(index 1\) is nan"):
        study.tell([0.3, 9.0], 0.4, lam=[1.0, float("nan")])
    assert study.trials == []  # nothing stored
    # off only by scale from the fixed component: the same trained model, accepted as told
    i = study.tell([0.3, 9.0], 0.4, lam=[2.0, 0.6])
    assert np.array_equal(study.trials[i].lam, [2.0, 0.6])
    # zero is not negative (off the box, an imported result)
    study.tell([0.2, 8.0], 0.5, lam=[1.0, 0.0])
    # where the constraint allows negative λ, a negative told λ is fine
    free = Study(names=["a", "b"], constraint=box({"a": -5.0}, {"a": 5.0}) & fixed({"b": 1.0}))
    free.tell([1.0, 2.0], 0.3, lam=[-1.0, 1.0])


def test_the_recommender_sees_told_lams_on_the_constraints_scale(monkeypatch):
    import lossopt.blackbox.recommend as R

    seen = {}
    real = R.recommend

    def spy(features, values, bound, *, rng, n=1, avoid=None, lams=None):
        seen["avoid"] = None if avoid is None else np.array(avoid)
        return real(features, values, bound, rng=rng, n=n, avoid=avoid, lams=lams)

    monkeypatch.setattr(R, "recommend", spy)
    study = Study(names=["data", "l2"], constraint=nonnegative() & fixed({"data": 1.0}))
    study.tell([0.3, 9.0], 0.4, lam=[2.0, 0.6])
    study.tell([0.5, 4.0], 0.3, lam=[1.0, 0.1])
    study.ask()
    assert np.allclose(seen["avoid"], [[1.0, 0.3], [1.0, 0.1]])
    assert np.isfinite(seen["avoid"]).all() and (seen["avoid"] >= 0).all()
