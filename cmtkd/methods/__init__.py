"""Methods that belong to the paper itself (CMT-KD and its ablations) live here; the comparison
methods live in the top-level ``baselines`` package. The contract is in :mod:`cmtkd.methods.base`."""
from cmtkd.methods.base import Method, default_weight_decay  # noqa: F401
from cmtkd.methods import cmtkd  # noqa: F401  (registers cmtkd and its ablations)
