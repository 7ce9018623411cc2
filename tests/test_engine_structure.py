"""The training engine reads top to bottom: short functions, and one object for the training state
that maps onto the checkpoint's keys in one place."""
from __future__ import annotations

import ast
from pathlib import Path

from cmtkd.checkpoint import CHECKPOINT_KEYS, CHECKPOINT_OPTIONAL_KEYS

ENGINE = Path(__file__).resolve().parents[1] / "cmtkd" / "engine"
MAX_FUNCTION_LINES = 60


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_engine_function_is_longer_than_60_lines():
    files = sorted(ENGINE.glob("*.py"))
    assert any(f.name == "trainer.py" for f in files)
    long = [f"{f.name}::{fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
            for f in files for fn in _functions(f) if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "split these functions: " + ", ".join(long)


def _method(cls: str, name: str) -> ast.FunctionDef:
    tree = ast.parse((ENGINE / "trainer.py").read_text())
    [klass] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    [fn] = [n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == name]
    return fn


def test_the_checkpoint_content_is_written_in_one_place_with_the_file_layers_keys():
    [ret] = [n for n in ast.walk(_method("Run", "checkpoint_content")) if isinstance(n, ast.Return)]
    assert isinstance(ret.value, ast.Dict)
    assert tuple(k.value for k in ret.value.keys) == CHECKPOINT_KEYS + CHECKPOINT_OPTIONAL_KEYS
    source = (ENGINE / "trainer.py").read_text()
    assert source.count("checkpoint.save_checkpoint(") == 1
    assert source.count("checkpoint.load_checkpoint(") == 1


def test_the_train_state_round_trips_through_the_checkpoint_content():
    from cmtkd.engine.trainer import Run, TrainState

    state = TrainState(epoch=3, history=[{"epoch": 1}], best={"epoch": 2, "val_top1": 5.0, "student_state": {}},
                       train_seconds=1.5, train_images=96, peak_mem=12.0)

    class Stateful:
        def state_dict(self):
            return {}

        def load_state_dict(self, _):
            pass

    parts = {k: Stateful() for k in ("method", "optimizer", "scheduler", "scaler")}
    run = Run(cfg=None, cfg_dict={}, chash="h", out=Path("."), device=None, log=print, data=None, steps=1,
              state=state, **parts)
    content = run.checkpoint_content()
    assert set(content) == set(CHECKPOINT_KEYS + CHECKPOINT_OPTIONAL_KEYS)
    rng = content["rng"]
    fresh = Run(cfg=None, cfg_dict={}, chash="h", out=Path("."), device=None, log=print, data=None, steps=1, **parts)
    fresh.restore(content)
    assert fresh.state == state
    assert fresh.checkpoint_content()["rng"]["torch"].equal(rng["torch"])
