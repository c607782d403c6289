"""The black-box path: recommend λ from externally supplied observations (f(θ_i), V(θ_i)).

- :class:`Study` — ask/tell, in memory or in one SQLite file shared by several processes;
- :mod:`~lossopt.blackbox.files` — CSV / JSON Lines observation files;
- :mod:`~lossopt.blackbox.storage` — the in-memory and SQLite storages;
- :mod:`~lossopt.blackbox.recommend` — the LP recommender behind ``Study.ask``.
"""

from lossopt.blackbox._checks import MAX_K
from lossopt.blackbox.files import (ObservationsError, ObservationsNote, Observations,
                                    read_observations, write_observations)
from lossopt.blackbox.storage import InMemoryStorage, SQLiteStorage, Storage, Trial
from lossopt.blackbox.study import Study, Suggestion

__all__ = [
    "InMemoryStorage", "MAX_K", "Observations", "ObservationsError", "ObservationsNote",
    "SQLiteStorage", "Storage", "Study", "Suggestion", "Trial", "read_observations",
    "write_observations",
]
