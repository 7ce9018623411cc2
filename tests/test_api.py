"""Public loading API (``cmtkd.load_student``, ``cmtkd.load_run``) and the torch.hub entry points."""
from __future__ import annotations

import pytest
import torch

import cmtkd
from cmtkd.data import build_data
from cmtkd.errors import UserError
from conftest import REPO_ROOT


def test_load_student_reproduces_the_runs_test_accuracy(reference_run):
    run = cmtkd.load_run(reference_run)
    assert not run.student.training
    assert run.config.method == "qat" and run.arch_config["w_bits"] == 2
    assert list(run.history["epoch"]) == [1, 2, 3]
    data = build_data(run.config.data, "cpu")
    correct = total = 0
    with torch.no_grad():
        for images, targets in data.eval_batches("test"):
            correct += int(run.student(images).argmax(1).eq(targets).sum())
            total += len(targets)
    assert total == run.metrics["test_images"]
    assert 100.0 * correct / total == pytest.approx(run.metrics["top1"], abs=1e-9)


def test_load_student_takes_the_directory_or_its_model_file(reference_run):
    by_dir = cmtkd.load_student(reference_run)
    by_file = cmtkd.load_student(reference_run / "model.pt")
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(by_dir(x), by_file(x))


@pytest.mark.parametrize("name", ["missing", "config.yaml"])
def test_load_student_errors_name_the_path(reference_run, tmp_path, name):
    path = tmp_path / name if name == "missing" else reference_run / name
    with pytest.raises(UserError, match="run directory"):
        cmtkd.load_student(path)


def test_torch_hub_local_student_and_networks(reference_run):
    model = torch.hub.load(str(REPO_ROOT), "student", source="local", run_dir=str(reference_run), trust_repo=True)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), cmtkd.load_student(reference_run)(x))
    net = torch.hub.load(str(REPO_ROOT), "resnet18", source="local", num_classes=10, w_bits=2, a_bits=2,
                         in_channels=1, width=0.125, trust_repo=True)
    assert net(x).shape == (2, 10)
    net = torch.hub.load(str(REPO_ROOT), "alexnet", source="local", num_classes=10, in_channels=1, width=0.125,
                         trust_repo=True)
    assert net(x).shape == (2, 10)
