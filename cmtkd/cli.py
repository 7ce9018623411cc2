"""Command line: ``cmtkd train``, ``cmtkd evaluate``, ``cmtkd export``, ``cmtkd list``."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import signal
import sys
import textwrap
import threading
import warnings

from cmtkd.errors import UserError, did_you_mean

EPILOG = textwrap.dedent("""\
    examples:
      cmtkd train --method qat --arch resnet18 --dataset digits --w-bits 2 --a-bits 2 \\
                  --epochs 2 --set model.width=0.25 --out runs/qat-w2a2
      cmtkd evaluate runs/qat-w2a2
      cmtkd train --config config/my-run.yaml --set optim.lr=0.05 --set method_args.temperature=2
      cmtkd list

    Settings are applied in order: defaults < --config FILE.yaml < flags < --set key=value.
    A run directory that already holds a checkpoint is resumed (same config required).
    """)


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train", allow_abbrev=False, help="train one run (any method) into a run directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Train one run. The run directory receives config.yaml (resolved), history.csv (one row
            per epoch with every loss term and validation accuracy), checkpoint.pt (full state,
            rewritten atomically every epoch), model.pt (the selected student alone) and metrics.json
            (test top-1/top-5 of the selected student, selected epoch, wall time, images/s, peak
            memory, environment fingerprint). Rerunning the same command after a crash resumes
            from the last finished epoch and gives the same result as an uninterrupted run."""),
        epilog=EPILOG)
    p.add_argument("--method", help="training method (see `cmtkd list`): fp, qat, kd, mtkd, dml, kdcl, kd-at, cmtkd, ...")
    p.add_argument("--arch", help="network: resnet18 | alexnet")
    p.add_argument("--dataset", help="digits (embedded, offline) | cifar100 | imagenet")
    p.add_argument("--data-root", help="dataset root (data.root)")
    p.add_argument("--w-bits", type=int, help="student weight bits: 1-8, or 32 for full precision")
    p.add_argument("--a-bits", type=int, help="student activation bits: 1-8, or 32 for full precision")
    p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--seed", type=int, help="random seed (same seed on CPU -> same numbers)")
    p.add_argument("--threads", type=int, help="torch threads (train.threads); match your job's cores")
    p.add_argument("--device", help="cpu | cuda | auto (train.device)")
    p.add_argument("--out", help="run directory (default: runs/<method>-<arch>-<dataset>-w<W>a<A>-s<seed>)")
    p.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                   help="YAML file of config keys (may repeat; later files win)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="override one config key, e.g. optim.lr=0.05, model.width=0.25, "
                        "method_args.teacher_bits=[8,6,4] (may repeat)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (train.compile=true)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def train_config(argv: list[str]):
    """The resolved config of ``cmtkd train ARGV`` (ARGV without ``train``), without training: what
    ``--print-config`` prints, as a RunConfig. argparse exits on malformed flags; config problems
    raise UserError."""
    return _config_from_args(parse_command_line(["train", *argv]))


def _config_from_args(args):
    from cmtkd.config import config_from_flags

    return config_from_flags(config_files=args.config, method=args.method, arch=args.arch, dataset=args.dataset,
                             data_root=args.data_root, w_bits=args.w_bits, a_bits=args.a_bits, epochs=args.epochs,
                             seed=args.seed, threads=args.threads, device=args.device, compile=args.compile,
                             sets=args.sets)


def cmd_train(args) -> int:
    import yaml
    from dataclasses import asdict

    cfg = _config_from_args(args)
    if args.print_config:
        from cmtkd.engine.footprint import check_method_builds, check_network_size

        # what `cmtkd train` would refuse: the workflow's pre-start check relies on both
        check_network_size(cfg)
        check_method_builds(cfg)
        print(yaml.safe_dump(asdict(cfg), sort_keys=False), end="")
        return 0
    from cmtkd.engine import train

    out = args.out or f"runs/{cfg.method}-{cfg.arch}-{cfg.data.name}-w{cfg.w_bits}a{cfg.a_bits}-s{cfg.seed}"
    train(cfg, out)
    return 0


def cmd_evaluate(args) -> int:
    from cmtkd.engine import evaluate_run

    result = evaluate_run(args.run_dir, split=args.split, threads=args.threads or 0, device=args.device)
    print(json.dumps({k: result[k] for k in ("top1", "top5", "n", "split")}))
    return 0


# Input size of an exported student, by dataset (the model itself is size-agnostic up to its stem).
EXPORT_IMAGE_SIZE = {"digits": 28, "cifar100": 32, "imagenet": 224}
# The exported program's height and width are fixed (only the batch is dynamic) and the export runs the
# model on its example: 1024 is 4.5x the largest size a run trains at (224); 100000 would need 80 GB.
MAX_EXPORT_IMAGE_SIZE = 1024


def export_example(model, in_channels: int, size: int, arch: str):
    """The example input of an export (two images of ``size`` x ``size``), checked: a size outside
    1..MAX_EXPORT_IMAGE_SIZE or one the network cannot take (its pooling shrinks it to nothing) is a
    one-line error."""
    import torch

    if not 1 <= size <= MAX_EXPORT_IMAGE_SIZE:
        raise UserError(f"--image-size must be in 1..{MAX_EXPORT_IMAGE_SIZE}, got {size}; leave it out for "
                        f"the run's own size")
    example = torch.zeros(2, in_channels, size, size)
    try:
        with torch.no_grad():
            model(example)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--image-size {size}: the {arch} student cannot take {size}x{size} images ({reason}); "
                        f"use a larger size, or leave it out for the run's own size") from None
    return example


def cmd_export(args) -> int:
    """Write the run's selected student as a self-contained torch.export program (.pt2): a plain
    quantized model that loads with ``torch.export.load(path).module()``, without cmtkd."""
    from pathlib import Path

    import torch

    from cmtkd.config import load_run_config
    from cmtkd.engine.trainer import load_student, refuse_run_in_use
    from cmtkd.files import atomic_write_bytes, sha256_file

    run_dir = Path(args.run_dir)
    refuse_run_in_use(run_dir)  # a run still in training has no model.pt yet: say so, not that it is missing
    cfg = load_run_config(run_dir)
    model, blob = load_student(run_dir, torch.device("cpu"))
    if "w_bits" not in blob["arch_config"]:
        raise UserError(f"{run_dir} is a teachers-only run ({blob['method']}: fused teachers, no student); "
                        f"export a run that trained a student")
    model.eval()
    size = args.image_size if args.image_size is not None else (
        cfg.data.image_size or EXPORT_IMAGE_SIZE.get(cfg.data.name, 32))
    example = export_example(model, blob["arch_config"]["in_channels"], size, blob["arch_config"]["arch"])
    if args.format == "onnx":
        return _export_onnx(run_dir, model, blob, example, Path(args.out or run_dir / "student.onnx"))
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    out = Path(args.out or run_dir / "student.pt2")
    # Serialised and checked in memory, then written atomically (a kill or a full disk leaves nothing).
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    data = buffer.getvalue()
    with warnings.catch_warnings():  # torch 2.11 warns that the archive's bytes are read-only: noise here
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        reloaded = torch.export.load(io.BytesIO(data)).module()
    if not torch.equal(reloaded(example), model(example)):
        raise UserError(f"the exported program of {run_dir} does not reproduce the model; please report this")
    atomic_write_bytes(out, data)
    print(json.dumps({"exported": str(out), "sha256": sha256_file(out), "input": list(example.shape[1:]),
                      "arch": blob["arch_config"]["arch"], "w_bits": blob["arch_config"]["w_bits"],
                      "a_bits": blob["arch_config"]["a_bits"]}))
    return 0


def _export_onnx(run_dir, model, blob, example, out) -> int:
    """``--format onnx``: the student as a QDQ ONNX graph (see :mod:`cmtkd.onnx_export`)."""
    import torch

    from cmtkd.engine.io import sha256_file
    from cmtkd.onnx_export import export_onnx, onnx_node_counts

    # A non-trivial example: the export checks the rewritten model against the trained one on it.
    example = torch.randn(example.shape, generator=torch.Generator().manual_seed(0))
    summary = export_onnx(model, example, out)
    counts = onnx_node_counts(out)
    print(json.dumps({"exported": str(out), "format": "onnx", "sha256": sha256_file(out),
                      "input": list(example.shape[1:]), "arch": blob["arch_config"]["arch"],
                      "w_bits": blob["arch_config"]["w_bits"], "a_bits": blob["arch_config"]["a_bits"],
                      "QuantizeLinear": counts.get("QuantizeLinear", 0),
                      "DequantizeLinear": counts.get("DequantizeLinear", 0), **summary}))
    return 0


def cmd_list(args) -> int:
    from cmtkd.data import DATASETS
    from cmtkd.models import ARCHS, POLICIES
    from cmtkd.quant import ACT_QUANTIZERS, WEIGHT_QUANTIZERS
    from cmtkd.options_doc import description, method_text
    from cmtkd.registry import get_method, method_names

    if args.method is not None:
        print(method_text(args.method))
        return 0
    print("methods:")
    for name in method_names():
        print(f"  {name:14s} {description(get_method(name))}")
    print("archs:             " + ", ".join(ARCHS))
    print("datasets:          " + ", ".join(DATASETS))
    print("policies:          " + ", ".join(POLICIES))
    print("weight quantizers: " + ", ".join(WEIGHT_QUANTIZERS))
    print("act quantizers:    " + ", ".join(ACT_QUANTIZERS))
    print("`cmtkd list METHOD`: how the method gets its teachers, and its options (type, default, meaning)")
    return 0


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a job scheduler's stop, a closed terminal), raised where the program is: it
    unwinds like Ctrl-C, through every cleanup (lock release, temp files), so the run stays resumable."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = ("SIGTERM", "SIGHUP")


@contextlib.contextmanager
def stop_signals_interrupt():
    """While the body runs, :data:`STOP_SIGNALS` raise :class:`Stopped` (their default would end the process
    at once, leaving the lock file and temp files to the next run and saying nothing); the previous handlers
    are restored afterwards. Only in the main thread (the only one Python delivers signals to); a signal that
    is ignored (``nohup`` ignores SIGHUP) stays ignored."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        def stop(signum, frame):
            raise Stopped(signum)

        for name in STOP_SIGNALS:
            signum = getattr(signal, name, None)  # (Windows has no SIGHUP)
            if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmtkd", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            cmtkd: Collaborative Multi-Teacher Knowledge Distillation (CMT-KD, WACV 2023) for low
            bit-width networks, with the baselines it is compared against, on one engine.
            Subcommands: train a run, evaluate a finished run standalone, export its student,
            list what is available."""),
        epilog=EPILOG)
    from cmtkd import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,export,list}")
    _train_parser(sub)
    p = sub.add_parser("evaluate", allow_abbrev=False, help="evaluate a finished run's saved student on the test set -> RUN_DIR/eval.json",
                       description="Rebuild the student from RUN_DIR/model.pt and evaluate it on the test split "
                                   "(or --split val). Writes RUN_DIR/eval.json and prints it. This standalone "
                                   "number, not the training log, is what the tables use.")
    p.add_argument("run_dir", help="directory written by `cmtkd train --out`")
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"),
                   help="where to evaluate (default: the run's train.device); --device cpu evaluates a GPU-trained "
                        "run on a machine without one (an fp16-autocast run then runs in fp32)")
    p = sub.add_parser("export", allow_abbrev=False, help="export a run's student alone as a torch.export program (.pt2) or QDQ ONNX",
                       description="Write the selected student of RUN_DIR (teachers and training state dropped) as a "
                                   "self-contained torch.export program (--format pt2, default; load it anywhere with "
                                   "torch.export.load(PATH).module()) or as an ONNX graph with QuantizeLinear/"
                                   "DequantizeLinear around every quantized activation and integer weights where "
                                   "exact (--format onnx; needs pip install 'cmtkd[onnx]'). Checks the export "
                                   "reproduces the model.")
    p.add_argument("run_dir", help="directory written by `cmtkd train --out`")
    p.add_argument("--format", choices=("pt2", "onnx"), default="pt2", help="pt2 (torch.export) or onnx (QDQ)")
    p.add_argument("--out", help="output file (default: RUN_DIR/student.pt2 or RUN_DIR/student.onnx)")
    p.add_argument("--image-size", type=int, help="input height/width, 1-1024 and at least what the network's "
                   "pooling needs (default: the run's data.image_size, else by dataset: digits 28, cifar100 32, "
                   "imagenet 224)")
    p = sub.add_parser("list", allow_abbrev=False, help="list methods, architectures, datasets, policies and quantizers",
                       description="Without METHOD: every method, architecture, dataset, policy and quantizer. With "
                                   "METHOD: what it is, how its teachers are given, and each of its options (type, "
                                   "default, meaning).")
    p.add_argument("method", nargs="?", metavar="METHOD", help="a method name: show its teachers and options")
    return parser


def parse_command_line(argv: list[str] | None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but an unknown flag is reported by the subcommand it was given to (its
    usage, not the top level's), with the closest flag it has; flags are never abbreviated."""
    parser = parser or build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        subparsers = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        target = subparsers.choices.get(args.command, parser) if subparsers else parser
        first = next((e for e in extra if e.startswith("-")), extra[0])
        hint = did_you_mean(first.split("=")[0], list(target._option_string_actions)) if first.startswith("-") else ""
        target.error(f"unrecognized argument{'s' if len(extra) > 1 else ''}: {' '.join(extra)}{hint}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_command_line(argv, parser)
    if args.command is None:
        parser.print_help()
        return 2
    handler = {"train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export, "list": cmd_list}[args.command]
    try:
        with stop_signals_interrupt():
            return handler(args)
    except UserError as exc:
        print(f"cmtkd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        again = ("rerun the same command to resume from the last finished epoch" if args.command == "train"
                 else "nothing was written; rerun the command")  # evaluate/export write atomically, at the end
        if isinstance(exc, Stopped):
            print(f"cmtkd: stopped by {signal.Signals(exc.signum).name}; {again}", file=sys.stderr)
            return 128 + exc.signum
        print(f"cmtkd: interrupted; {again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
