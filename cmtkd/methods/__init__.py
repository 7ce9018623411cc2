"""Methods that belong to the paper itself (CMT-KD and its ablations) live here; the comparison
methods live in ``cmtkd.baselines``. The contract is in :mod:`cmtkd.methods.base`; every method is
listed by name in :mod:`cmtkd.catalog`."""
from cmtkd.methods.base import Method, default_weight_decay  # noqa: F401
