"""Training engine: one loop for every method, exact resume, standalone evaluation."""
from cmtkd.engine.trainer import evaluate_model, evaluate_run, train  # noqa: F401
