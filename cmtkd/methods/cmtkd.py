"""``cmtkd``: Collaborative Multi-Teacher KD (Pham, Hoang, Do; WACV 2023) — jointly trained quantized teachers, importance-aware shared knowledge, mutual learning, attention transfer.

Read next to docs/method.md §4-§5 (equation numbers are the paper's, via the SECONDARY source):

* n teachers share the student's architecture, teacher i at ``b_i`` bits (weights and activations),
  and all n + 1 networks train jointly from scratch in one stage (PAPER §1).
* Eq. 1 — at each fusion point k teacher i's stage output ``A_k^i`` is quantized at its own bits and
  the results are fused into the shared knowledge ``F_k = sum_i softmax(theta_k)_i * Q(A_k^i, b_i)``
  (:meth:`CMTKD.quantize_stage_outputs`, :meth:`CMTKD.fuse`); F_k is the input of EVERY teacher's next stage, and the student's feature at k is pulled towards it by attention
  transfer (Eq. 4-5, :func:`cmtkd.losses.attention_loss`).
* Eq. 6-9 — mutual learning: the KDCL-MinLogit ensemble of the teacher logit and the student logit
  gives a constant target p; student and teachers each get ``T^2 KL(p || softmax(z/T))``.
* Eq. 10 — ``L = alpha (CE_S + CE_T) + beta (KL_S + KL_T) + gamma L_feat``.

Every choice the paper leaves open is an option below; ASSUMPTIONS.md says what we chose and why.
The ablations (``cmtkd-avg``, ``-noml``, ``-nofeat``, ``-1t``, ``-frozen``) are this class with one
switch changed. ``cmtkd-frozen`` loads its teachers and θ from a teachers-only run (``cmtkd-teachers``,
:class:`CMTKDTeachers`: the n teachers trained together with fusion and θ, without a student) and
freezes them, so it differs from CMT-KD in one thing only: no joint training with the student.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from cmtkd.errors import UserError
from cmtkd.losses import AtReduction, attention_loss, kd_kl, min_logit_ensemble, soft_targets
from cmtkd.methods.base import Method, check_loss_weights, check_nonnegative, cross_entropy
from cmtkd.quant import FULL_PRECISION, make_act_quantizer
from cmtkd.teachers import check_teacher_bits

FUSION_INPUTS = ("residual", "stage-input")  # what Eq. 1 fuses (ledger A5); "residual" is the default
FusionInput = Literal["residual", "stage-input"]
ThetaFrom = Literal["teachers", "all"]


def make_fusion_quantizers(act_quant: str, teacher_bits: list[int]) -> nn.ModuleList:
    """Q(., b_i) of Eq. 1 for each teacher: its activation quantizer at its own bits, identity for a
    full-precision teacher."""
    return nn.ModuleList(nn.Identity() if b == FULL_PRECISION else make_act_quantizer(act_quant, b)
                         for b in teacher_bits)


# Fusion-point presets per architecture. "stage-ends": ends of the residual stages before the last
# one (PAPER §4 reads "the last convolutional layer of each convolution block" as layer1..layer3).
FUSION_PRESETS = {
    "resnet18": {"stage-ends": ["layer1", "layer2", "layer3"],
                 "stage-ends+last": ["layer1", "layer2", "layer3", "layer4"]},
    # AlexNet is OPEN in the paper; ours mirrors ResNet: every interior conv stage except the last.
    "alexnet": {"stage-ends": ["conv2", "conv3", "conv4"],
                "stage-ends+last": ["conv2", "conv3", "conv4", "conv5"]},
}


def network_units(model: nn.Module, split_blocks: bool) -> list[tuple[str, nn.Module]]:
    """The model's stages in order; with ``split_blocks`` each residual stage is split into its blocks
    (named ``layer1.0``, ``layer1.1``, ...) so every block end can be a fusion point."""
    units = []
    for name, stage in model.stages.items():
        children = list(stage.children()) if isinstance(stage, nn.Sequential) else []
        if split_blocks and children and all(hasattr(c, "downsample") for c in children):
            units += [(f"{name}.{i}", c) for i, c in enumerate(children)]
        else:
            units.append((name, stage))
    return units


def _input_reader(unit: nn.Module) -> nn.Module | None:
    """The module of ``unit`` that splits at what it reads (``read_input``/``from_input``: a ResNet
    pre-activation block, the ResNet head), or None: the unit reads its input as it is."""
    first = unit[0] if isinstance(unit, nn.Sequential) and len(unit) else unit
    return first if hasattr(first, "read_input") else None


def read_unit_input(unit: nn.Module, x: torch.Tensor):
    """``(context, q)``: ``q`` is what ``unit`` reads of ``x`` (``quant1(bn0(x))`` for a stage opened by a
    pre-activation block, the head's ReLU/quantizer output, else ``x`` itself); ``context``: the rest
    of what the unit needs to compute its own output (:func:`run_from_input`)."""
    reader = _input_reader(unit)
    return (None, x) if reader is None else reader.read_input(x)


def run_from_input(unit: nn.Module, context, q: torch.Tensor) -> torch.Tensor:
    """``unit``'s output from what it reads: ``run_from_input(u, *read_unit_input(u, x)) == u(x)``.
    ``context`` None (a teacher reading the fused mixture): ``q`` feeds both the conv path and the
    downsample of a stage-opening block."""
    reader = _input_reader(unit)
    if reader is None:
        return unit(q)
    y = reader.from_input(context, q)
    if reader is not unit:
        for module in list(unit)[1:]:
            y = module(y)
    return y


def check_stage_input_points(units: list[tuple[str, nn.Module]], points: list[str]) -> None:
    """``fusion_input: stage-input`` fuses what each teacher's NEXT unit reads; a ResNet block with an
    identity shortcut also reads the raw residual, so it cannot follow a fusion point."""
    names = [name for name, _ in units]
    for point in points:
        name, unit = units[names.index(point) + 1]
        reader = _input_reader(unit)
        if reader is not None and getattr(reader, "downsample", True) is None:
            raise UserError(f"method_args.fusion_input=stage-input fuses the input of the unit after each fusion "
                            f"point, but {name} (after {point}) has an identity shortcut that also reads the "
                            f"unnormalised residual; use fusion_points stage-ends or stage-ends+last, or "
                            f"fusion_input=residual")


class _TeacherView:
    """Teacher i as seen at evaluation: the fused forward of all teachers, head i's logits (index
    None: z_T, the teachers' combined logit)."""

    def __init__(self, method: "CMTKD | FusedTeachers", index: int | None):
        self.method, self.index = method, index

    @property
    def training(self) -> bool:
        return self.method.training

    def train(self, mode: bool = True):
        self.method.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, images):
        logits = self.method.teachers_forward(images)[0]
        return self.method.teacher_logit(logits) if self.index is None else logits[self.index]


FUSION_READING_DEFAULTS = {"fusion_input": "residual", "requantize_fused": False}


def fusion_reading(fusion_input: str, requantize_fused: bool, explicit: bool = False) -> dict:
    """The reading of Eq. 1 as model files and metrics.json record it: only what differs from the
    defaults (files written before the options existed, and default runs, stay byte for byte as they
    were), or every key with ``explicit``."""
    reading = {"fusion_input": fusion_input, "requantize_fused": bool(requantize_fused)}
    return reading if explicit else {k: v for k, v in reading.items() if v != FUSION_READING_DEFAULTS[k]}


class CMTKD(Method):
    @dataclass
    class Options:
        teacher_bits: list[int] = field(default_factory=lambda: [8, 6, 4])  # W = A = b_i per teacher
        fusion_points: list[str] = field(default_factory=lambda: ["stage-ends"])  # preset or unit names
        # What Eq. 1 fuses (ledger A5): "residual" Q_i(A_k^i), teacher i's stage output through its own
        # quantizer; "stage-input" what teacher i's next stage reads (ResNet: quant1(bn0(A_k^i)), the mixture
        # feeding both the conv path and the downsample), and the student's attention feature is then its own
        # next-stage input. The same on AlexNet, whose stage outputs are already quantized.
        fusion_input: FusionInput = "residual"  # what Eq. 1 fuses at each fusion point (see above; ledger A5)
        requantize_fused: bool = False  # teacher i's next unit reads Q_i(F_k) instead of F_k (ledger A19)
        theta_from: ThetaFrom = "teachers"  # "all": the student's feature loss reaches theta too (ledger A20)
        alpha: float = 1.0       # CE weight (PAPER §5, SECONDARY)
        beta: float = 0.5        # mutual-learning KL weight
        gamma: float = 100.0     # attention-transfer weight
        temperature: float = 4.0  # softmax temperature T of mutual learning; OPEN
        theta_init: Literal["uniform", "random"] = "uniform"  # theta = 0 | N(0, 0.01); OPEN
        theta_lr_mult: float = 0.1    # theta at lr/10 (SECONDARY)
        learn_theta: bool = True      # False: the paper's "Average teacher" row
        detach_shared: bool = True    # F_k is a constant target in the feature loss; OPEN
        at_reduction: AtReduction = "mean"  # attention-loss reduction (rescales gamma); OPEN
        teacher_logit: Literal["mean", "all"] = "mean"  # z_T: mean of the n heads | all heads enter MinLogit
        teacher_loss: Literal["combined", "per_teacher"] = "combined"  # CE_T/KL_T on z_T | mean over heads
        teacher_init: Literal["scratch", "checkpoints"] = "scratch"  # checkpoints: loaded, then trained jointly
        teacher_checkpoints: list[str] = field(default_factory=list)  # 1 (broadcast) or n run dirs/model.pt
        freeze_teachers: bool = False   # cmtkd-frozen: teachers and theta of teachers_run, no updates
        teachers_run: str = ""          # cmtkd-frozen: a cmtkd-teachers run directory (or its model.pt)

    @classmethod
    def check_options(cls, o, cfg):
        bits = o.teacher_bits
        check_teacher_bits(bits, cfg)
        check_loss_weights(o, ("alpha", "beta", "gamma"))
        check_nonnegative(o, "theta_lr_mult")
        if cfg.arch not in FUSION_PRESETS:
            raise UserError(f"cmtkd has no fusion-point presets for arch '{cfg.arch}'")
        needs_ckpt = o.teacher_init == "checkpoints"
        n_ckpt = len(o.teacher_checkpoints)
        if needs_ckpt and n_ckpt not in (1, len(bits)) or (n_ckpt and not needs_ckpt):
            raise UserError(f"method_args.teacher_checkpoints has {n_ckpt} entries; with teacher_init=checkpoints "
                            f"give 1 or {len(bits)} (one per teacher), otherwise none (frozen teachers come from "
                            f"method_args.teachers_run)")
        if o.freeze_teachers and (needs_ckpt or not o.teachers_run):
            raise UserError("frozen teachers are loaded, with theta, from one teachers-only run: set "
                            "method_args.teachers_run to a `cmtkd train --method cmtkd-teachers` run directory "
                            "with the same teacher_bits (and leave teacher_init at scratch)")
        if o.theta_from == "all" and not o.learn_theta:
            raise UserError("method_args.theta_from=all sends the student's feature loss to theta, but theta is "
                            "not learned here (learn_theta false: cmtkd-avg, cmtkd-frozen); leave theta_from at teachers")
        if o.teachers_run and not o.freeze_teachers:
            raise UserError("method_args.teachers_run is read by cmtkd-frozen only; remove it (or use "
                            "teacher_init=checkpoints to start joint training from pre-trained teachers)")

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        o = self.options
        self.teacher_bits = list(o.teacher_bits)
        self.student = self.build_network(cfg.w_bits, cfg.a_bits)
        self.teachers = nn.ModuleList(self.build_network(b, b) for b in self.teacher_bits)
        # Q(., b_i) of Eq. 1: teacher i's activation quantizer at its own bits (identity for a
        # full-precision teacher). With model.quant_layout=conv-inputs the stage outputs are full
        # precision, so this is where they get quantized; with block-outputs they already end in the same
        # quantizer and HWGQ is idempotent (ledger A5).
        self.fusion_quantizers = make_fusion_quantizers(cfg.model.act_quant, self.teacher_bits)
        self.teacher_paths: list[str] = []
        # SHA-256 of each teacher checkpoint, as a buffer so a resumed run reports the hash of the
        # weights it really started from (even if the file was replaced since).
        self.register_buffer("teacher_digests", torch.zeros(0, 32, dtype=torch.uint8))
        if o.teacher_init == "checkpoints":
            self._load_teachers(o.teacher_checkpoints)

        split_blocks = o.fusion_points == ["blocks"]
        self.unit_names = [name for name, _ in network_units(self.student, split_blocks)]
        self.split_blocks = split_blocks
        self.fusion_points = self._resolve_fusion_points(o.fusion_points)
        self.fusion_input, self.requantize_fused = o.fusion_input, o.requantize_fused
        if o.fusion_input == "stage-input":
            check_stage_input_points(network_units(self.student, split_blocks), self.fusion_points)
        n = len(self.teacher_bits)
        init = torch.zeros(len(self.fusion_points), n)
        if o.theta_init == "random":
            init.normal_(0.0, 0.01)
        # theta_k: one learnable logit per teacher per fusion point (Eq. 1); rows follow fusion_points.
        self.importance_logits = nn.Parameter(init, requires_grad=o.learn_theta)
        if o.freeze_teachers:
            self._load_teacher_set(o.teachers_run)

    # -- construction helpers ----------------------------------------------------------------
    def _resolve_fusion_points(self, spec: list[str]) -> list[str]:
        presets = FUSION_PRESETS[self.cfg.arch]
        if spec == ["blocks"]:
            # every residual block end except those of the last stage (mirrors "stage-ends")
            last = self.unit_names[-2].split(".")[0]
            return [u for u in self.unit_names if "." in u and not u.startswith(last + ".")] or \
                [u for u in self.unit_names[1:-2]]
        points = presets[spec[0]] if len(spec) == 1 and spec[0] in presets else list(spec)
        unknown = [p for p in points if p not in self.unit_names[:-1]]
        if unknown or not points:
            raise UserError(f"method_args.fusion_points {spec} names unknown points {unknown}; use a preset "
                            f"({', '.join(list(presets) + ['blocks'])}) or names from {self.unit_names[:-1]}")
        return sorted(points, key=self.unit_names.index)

    def _load_teachers(self, paths: list[str]) -> None:
        from cmtkd.checkpoint import digest_tensor
        from cmtkd.teachers import load_teacher, stand_ins

        if stand_ins():  # a config check: the checkpoints may not exist yet
            return

        if len(paths) == 1:
            paths = paths * len(self.teacher_bits)
        digests = []
        for teacher, bits, path in zip(self.teachers, self.teacher_bits, paths):
            source, digest = load_teacher(path, arch=self.cfg.arch, num_classes=self.info.num_classes,
                                          image_size=self.info.image_size)
            if source.quant_layout != teacher.quant_layout:  # AlexNet layouts share their parameter names
                raise UserError(f"teacher checkpoint {path} was trained with model.quant_layout="
                                f"{source.quant_layout}, this run uses {teacher.quant_layout}; set it to match")
            missing, unexpected = teacher.load_state_dict(source.state_dict(), strict=False)
            if unexpected or [m for m in missing if "quantizer" not in m]:
                raise UserError(f"teacher checkpoint {path} does not fit a {self.cfg.arch} at {bits} bits "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            self.teacher_paths.append(str(path))
            digests.append(digest_tensor(digest))
        self.teacher_digests = torch.stack(digests)

    def _load_teacher_set(self, path: str) -> None:
        """cmtkd-frozen: teachers and theta from a teachers-only run, checked to be the networks and
        fusion points this run would build, then frozen (no gradients; eval-mode BN in train())."""
        from cmtkd import checkpoint
        from cmtkd.files import sha256_bytes
        from cmtkd.teachers import stand_ins, teacher_file

        if stand_ins():  # a config check: the teachers-only run may not exist yet
            return
        file = teacher_file(path)
        what = "teachers-only run model file"
        fix = (f"train it with `cmtkd train --method cmtkd-teachers` (same dataset, --arch, model.* and "
               f"method_args.teacher_bits={self.teacher_bits}) and pass its run directory")
        data = checkpoint.read_bytes(file, what, fix)
        blob = checkpoint.decode(data, file, "model", fix, what)
        if not checkpoint.is_network_set(blob["arch_config"]):
            raise UserError(f"method_args.teachers_run: {file} holds one network (method {blob['method']}), not "
                            f"the fused teachers of a teachers-only run; {fix}")
        fused = FusedTeachers.from_model_file(blob, file, fix, what)
        expected = {checkpoint.NETWORK_SET_KEY: [self.arch_config(b, b) for b in self.teacher_bits],
                    "fusion_points": self.fusion_points, "split_blocks": self.split_blocks,
                    **fusion_reading(self.fusion_input, self.requantize_fused, explicit=True)}
        found = {k: blob["arch_config"].get(k, FUSION_READING_DEFAULTS.get(k)) for k in expected}
        if found != expected:
            raise UserError(f"method_args.teachers_run: {file} holds other teachers than this run uses "
                            f"({_set_difference(found, expected)}); {fix}")
        self.teachers.load_state_dict(fused.teachers.state_dict())
        self.fusion_quantizers.load_state_dict(fused.fusion_quantizers.state_dict())
        with torch.no_grad():
            self.importance_logits.copy_(fused.importance_logits)
        self.teachers.requires_grad_(False)
        self.fusion_quantizers.requires_grad_(False)
        self.importance_logits.requires_grad_(False)  # theta frozen too: no joint training of any part
        self.teacher_paths = [str(file.resolve())]
        self.teacher_digests = checkpoint.digest_tensor(sha256_bytes(data))[None]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.options.freeze_teachers:
            self.teachers.eval()  # frozen teachers keep their BN statistics
            self.fusion_quantizers.eval()
        return self

    # -- Eq. 1: importance-aware shared knowledge ---------------------------------------------
    def importance(self) -> torch.Tensor:
        """pi = softmax(theta) per fusion point, shape (fusion points, teachers)."""
        return torch.softmax(self.importance_logits, dim=1)

    def quantize_stage_outputs(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Q(A_k^i, b_i) for every teacher i."""
        return [q(a) for q, a in zip(self.fusion_quantizers, features)]

    @staticmethod
    def fuse(features: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """F_k = sum_i pi_k^i features_i (the features are the quantized stage outputs)."""
        shared = weights[0].to(features[0].dtype) * features[0]
        for w, a in zip(weights[1:], features[1:]):
            shared = shared + w.to(a.dtype) * a
        return shared

    # -- forward ---------------------------------------------------------------------------------
    def _units(self, model):
        return network_units(model, self.split_blocks)  # cheap: walks a handful of stages

    def teachers_forward(self, images, student_units=None):
        """Run all teachers unit by unit with fusion; optionally the student alongside (its features at
        the fusion points are returned for the feature loss). Returns (teacher logits list,
        {point: F_k}, {point: student feature}, student logits or None, {point: the n fused tensors}).

        ``fusion_input`` residual: F_k mixes Q_i(A_k^i) and is the input of every teacher's next unit.
        stage-input: F_k mixes what each teacher's next unit reads (``read_unit_input``) and each teacher's
        next unit runs from F_k (``run_from_input``); the student's feature is its own next-unit input."""
        teacher_units = [self._units(t) for t in self.teachers]
        pi = self.importance()
        xs = [images] * len(self.teachers)
        x_student = images
        shared, student_feats, parts = {}, {}, {}
        pending = None  # stage-input: (the teachers' inputs, the student's (context, input)) of the next unit
        for u, name in enumerate(self.unit_names):
            if pending is None:
                xs = [units[u][1](x) for units, x in zip(teacher_units, xs)]
                if student_units is not None:
                    x_student = student_units[u][1](x_student)
            else:
                xs = [run_from_input(units[u][1], None, x) for units, x in zip(teacher_units, pending[0])]
                if student_units is not None:
                    x_student = run_from_input(student_units[u][1], *pending[1])
                pending = None
            if name not in self.fusion_points:
                continue
            k = self.fusion_points.index(name)
            if self.fusion_input == "stage-input":
                feats = [read_unit_input(units[u + 1][1], x)[1] for units, x in zip(teacher_units, xs)]
                student_in = read_unit_input(student_units[u + 1][1], x_student) if student_units is not None else None
            else:
                feats = self.quantize_stage_outputs(xs)
                student_in = (None, x_student)
            fused = self.fuse(feats, pi[k])
            inputs = [q(fused) for q in self.fusion_quantizers] if self.requantize_fused else [fused] * len(xs)
            shared[name], parts[name], student_feats[name] = fused, feats, student_in[1] if student_in else None
            if self.fusion_input == "stage-input":
                pending = (inputs, student_in)
            else:
                xs = inputs  # F_k is the input of every teacher's next stage
        return xs, shared, student_feats, (x_student if student_units is not None else None), parts

    def teacher_logit(self, teacher_logits: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([z.float() for z in teacher_logits]).mean(dim=0)

    def forward_train(self, images, targets):
        o = self.options
        teacher_logits, shared, student_feats, z_s, parts = self.teachers_forward(images, self._units(self.student))
        z_t = self.teacher_logit(teacher_logits)
        losses = {}
        # Cross-entropy (Eq. 10, alpha term)
        ce_s = cross_entropy(z_s, targets)
        if o.teacher_loss == "combined":
            ce_t = cross_entropy(z_t, targets)
        else:
            ce_t = torch.stack([cross_entropy(z, targets) for z in teacher_logits]).mean()
        losses["ce_student"] = o.alpha * ce_s
        if not o.freeze_teachers:  # frozen teachers and theta: the teacher-side terms train nothing
            losses["ce_teachers"] = o.alpha * ce_t
        # Mutual learning, KDCL-MinLogit (Eq. 6-9)
        if o.beta > 0:
            members = [z_t, z_s] if o.teacher_logit == "mean" else [*teacher_logits, z_s]
            target = soft_targets(min_logit_ensemble(members, targets), o.temperature)
            kl_s = kd_kl(z_s, target, o.temperature)
            if o.teacher_loss == "combined":
                kl_t = kd_kl(z_t, target, o.temperature)
            else:
                kl_t = torch.stack([kd_kl(z, target, o.temperature) for z in teacher_logits]).mean()
            losses["kl_student"] = o.beta * kl_s
            if not o.freeze_teachers:
                losses["kl_teachers"] = o.beta * kl_t
        # Attention transfer towards the shared knowledge (Eq. 4-5)
        if o.gamma > 0:
            feat = sum(attention_loss(student_feats[p], self._feature_target(k, shared[p], parts[p]), o.at_reduction)
                       for k, p in enumerate(self.fusion_points))
            losses["feat"] = o.gamma * feat
        return z_s, losses

    def _feature_target(self, k: int, fused: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        """F_k as the student's attention target: detached (detach_shared); with theta_from=all the
        teachers' tensors are detached but pi_k is not, so the student's feature loss reaches theta."""
        o = self.options
        if not o.detach_shared:
            return fused
        if o.theta_from == "all":
            return self.fuse([a.detach() for a in parts], self.importance()[k])
        return fused.detach()

    # -- engine hooks --------------------------------------------------------------------------
    def param_groups(self):
        groups = [self.network_group("student", self.student, self.cfg.w_bits, self.cfg.a_bits)]
        if not self.options.freeze_teachers:
            # teacher i's fusion quantizer trains with teacher i (it has parameters only for PACT/LSQ)
            groups += [self.network_group(f"teacher{i}_w{b}a{b}", nn.ModuleList([t, q]), b, b)
                       for i, (t, q, b) in enumerate(zip(self.teachers, self.fusion_quantizers, self.teacher_bits))]
        if self.importance_logits.requires_grad:
            # theta at lr/10 and no weight decay (decay would pull pi towards uniform)
            groups.append({"name": "importance_logits", "params": [self.importance_logits], "weight_decay": 0.0,
                           "lr_mult": self.options.theta_lr_mult})
        return groups

    def eval_models(self):
        models = {"student": self.student}
        models.update({f"teacher{i}_w{b}a{b}": _TeacherView(self, i) for i, b in enumerate(self.teacher_bits)})
        # z_T, the teachers' combined logit (what CE_T and the MinLogit target use: with teacher_loss=combined
        # the heads are trained only through it). Frozen teachers: must equal what their teachers-only run logged
        models["teachers"] = _TeacherView(self, None)
        return models

    def log_scalars(self):
        pi = self.importance().detach().cpu()
        return {f"pi_{p}_{i}": float(pi[k, i]) for k, p in enumerate(self.fusion_points) for i in range(pi.shape[1])}

    def metadata(self):
        from cmtkd.checkpoint import digest_hex

        meta = {"teacher_bits": self.teacher_bits, "fusion_points": self.fusion_points,
                **fusion_reading(self.fusion_input, self.requantize_fused)}
        if self.options.freeze_teachers:
            meta["teachers_run"] = self.teacher_paths[0]
            meta["teachers_run_sha256"] = digest_hex(self.teacher_digests[0])
        elif len(self.teacher_digests):
            meta["teacher_checkpoints"] = self.teacher_paths
            meta["teacher_sha256"] = [digest_hex(d) for d in self.teacher_digests]
        return meta


def _set_difference(found: dict, expected: dict) -> str:
    """The first difference between two teacher-set descriptions, short enough for one error line."""
    from cmtkd.checkpoint import NETWORK_SET_KEY

    have, want = found[NETWORK_SET_KEY], expected[NETWORK_SET_KEY]
    if have != want:
        bits = lambda members: [m.get("w_bits") if isinstance(m, dict) else None for m in members or []]  # noqa: E731
        if bits(have) != bits(want):
            return f"teacher bits {bits(have)}, this run {bits(want)}"
        keys = sorted({k for h, w in zip(have, want) for k in {*h, *w} if h.get(k) != w.get(k)})
        key = keys[0]
        return f"{key} {[h.get(key) for h in have]}, this run {[w.get(key) for w in want]}"
    key = next(k for k in expected if found[k] != expected[k])
    return f"{key} {found[key]}, this run {expected[key]}"


# ----------------------------------------------------------------------------------- ablations
# Each is CMT-KD with options pinned (cmtkd.config.method_options applies the pins); listed in
# cmtkd/catalog.py under its own name.
class CMTKDAverage(CMTKD):
    """theta frozen at equal weights (the paper's 'Average teacher' row)"""
    pinned = {"learn_theta": False, "theta_init": "uniform"}


class CMTKDNoML(CMTKD):
    """without mutual learning (beta = 0)"""
    pinned = {"beta": 0.0}


class CMTKDNoFeat(CMTKD):
    """without the attention-transfer feature loss (gamma = 0)"""
    pinned = {"gamma": 0.0}


class CMTKDFrozen(CMTKD):
    """teachers and theta of a teachers-only run (cmtkd-teachers), frozen: CMT-KD without joint training"""
    pinned = {"freeze_teachers": True, "learn_theta": False}


class CMTKDOneTeacher(CMTKD):
    """one teacher: the first entry of teacher_bits (pi = 1: F_k is that teacher's Q(A_k), or its stage input)"""

    @classmethod
    def derive_options(cls, options, cfg):
        return replace(options, teacher_bits=options.teacher_bits[:1],
                       teacher_checkpoints=options.teacher_checkpoints[:1])


# ---------------------------------------------------------------------- teachers-only stage
class FusedTeachers(nn.Module):
    """n teachers and theta as one network: the fused forward of Eq. 1 (CMT-KD's own code), logits z_T.

    What a teachers-only run (``cmtkd-teachers``) trains and saves as its ``model.pt`` (state: the
    teachers' ``teachers.<i>.*`` and ``importance_logits``, the names CMT-KD uses), what ``cmtkd
    evaluate`` rebuilds from it and what ``cmtkd-frozen`` loads."""

    def __init__(self, teachers: list[nn.Module], fusion_points: list[str], split_blocks: bool,
                 fusion_quantizers: nn.ModuleList, fusion_input: str = "residual", requantize_fused: bool = False):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        if len(fusion_quantizers) != len(teachers):
            raise ValueError(f"{len(fusion_quantizers)} fusion quantizers for {len(teachers)} teachers")
        self.fusion_quantizers = fusion_quantizers  # Q(., b_i) of Eq. 1, as in CMT-KD
        self.split_blocks = split_blocks
        self.unit_names = [name for name, _ in network_units(self.teachers[0], split_blocks)]
        unknown = [p for p in fusion_points if p not in self.unit_names[:-1]]
        if unknown or not fusion_points:
            raise ValueError(f"fusion points {fusion_points} are not interior units of {self.unit_names}")
        self.fusion_points = list(fusion_points)
        if fusion_input not in FUSION_INPUTS:
            raise ValueError(f"fusion_input {fusion_input!r} is not one of {FUSION_INPUTS}")
        self.fusion_input, self.requantize_fused = fusion_input, bool(requantize_fused)
        if fusion_input == "stage-input":
            check_stage_input_points(network_units(self.teachers[0], split_blocks), self.fusion_points)
        self.importance_logits = nn.Parameter(torch.zeros(len(fusion_points), len(teachers)))

    # One implementation of the fused forward: CMT-KD's methods, which read only the attributes above.
    importance = CMTKD.importance
    fuse = staticmethod(CMTKD.fuse)
    quantize_stage_outputs = CMTKD.quantize_stage_outputs
    _units = CMTKD._units
    teachers_forward = CMTKD.teachers_forward
    teacher_logit = CMTKD.teacher_logit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher_logit(self.teachers_forward(images)[0])

    @classmethod
    def from_model_file(cls, blob: dict, path, fix: str, what: str = "model file") -> "FusedTeachers":
        from cmtkd.checkpoint import NETWORK_SET_KEY, build_network_set

        def assemble(networks, config):
            if not isinstance(config.get("fusion_points"), list) or not isinstance(config.get("split_blocks"), bool):
                raise ValueError("no fusion_points list / split_blocks flag")
            members = config[NETWORK_SET_KEY]
            quantizers = nn.ModuleList(make_fusion_quantizers(m["act_quant"], [m["a_bits"]])[0] for m in members)
            reading = {k: config.get(k, default) for k, default in FUSION_READING_DEFAULTS.items()}
            if reading["fusion_input"] not in FUSION_INPUTS or not isinstance(reading["requantize_fused"], bool):
                raise ValueError(f"fusion reading {reading} is not one this version knows")
            return cls(networks, config["fusion_points"], config["split_blocks"], quantizers, **reading)

        return build_network_set(blob, path, fix, assemble, what)


class CMTKDTeachers(Method):
    """teachers-only stage of CMT-KD: n fused teachers + theta, no student (what cmtkd-frozen loads)"""

    teachers_help = "the teachers and theta are all this run trains (no student); cmtkd-frozen loads them"

    default_bits = 32  # there is no student: W/A of the run are 32, the teachers' are teacher_bits

    @dataclass
    class Options:
        teacher_bits: list[int] = field(default_factory=lambda: [8, 6, 4])  # as CMT-KD
        fusion_points: list[str] = field(default_factory=lambda: ["stage-ends"])  # as CMT-KD
        fusion_input: FusionInput = "residual"  # as CMT-KD (cmtkd-frozen checks that its stage matches)
        requantize_fused: bool = False  # as CMT-KD
        theta_init: Literal["uniform", "random"] = "uniform"  # as CMT-KD
        theta_lr_mult: float = 0.1  # as CMT-KD
        learn_theta: bool = True  # as CMT-KD
        teacher_loss: Literal["combined", "per_teacher"] = "combined"  # CE on z_T | mean CE over heads

    @classmethod
    def check_options(cls, o, cfg):
        from cmtkd.quant import FULL_PRECISION, check_bits

        if (cfg.w_bits, cfg.a_bits) != (FULL_PRECISION, FULL_PRECISION):
            raise UserError(f"method cmtkd-teachers trains no student, but w_bits/a_bits are {cfg.w_bits}/"
                            f"{cfg.a_bits}; drop --w-bits/--a-bits (the teachers' bits are method_args.teacher_bits)")
        if not o.teacher_bits:
            raise UserError("method_args.teacher_bits is empty; give at least one teacher bit-width, e.g. [8, 6, 4]")
        for b in o.teacher_bits:
            try:
                check_bits(b)
            except UserError as exc:
                raise UserError(f"method_args.teacher_bits: {exc}") from None
        check_nonnegative(o, "theta_lr_mult")
        if cfg.arch not in FUSION_PRESETS:
            raise UserError(f"cmtkd-teachers has no fusion-point presets for arch '{cfg.arch}'")

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        o = self.options
        self.teacher_bits = list(o.teacher_bits)
        teachers = [self.build_network(b, b) for b in self.teacher_bits]
        # fusion points resolved exactly as CMT-KD resolves them (the same spec gives the same points)
        self.split_blocks = o.fusion_points == ["blocks"]
        self.unit_names = [name for name, _ in network_units(teachers[0], self.split_blocks)]
        points = CMTKD._resolve_fusion_points(self, o.fusion_points)
        try:
            self.student = FusedTeachers(teachers, points, self.split_blocks,  # the network this run trains
                                         make_fusion_quantizers(cfg.model.act_quant, self.teacher_bits),
                                         o.fusion_input, o.requantize_fused)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if o.theta_init == "random":
            with torch.no_grad():
                self.student.importance_logits.normal_(0.0, 0.01)
        self.student.importance_logits.requires_grad_(o.learn_theta)

    @classmethod
    def network_from_model_file(cls, blob, path, fix, what="model file"):
        return FusedTeachers.from_model_file(blob, path, fix, what)

    def forward_train(self, images, targets):
        """CMT-KD's teacher-side cross-entropy (Eq. 10, CE_T) only: KL_T needs the student's logit in its
        MinLogit target and the feature loss is the student's, so neither exists without a student."""
        teacher_logits = self.student.teachers_forward(images)[0]
        z_t = self.student.teacher_logit(teacher_logits)
        if self.options.teacher_loss == "combined":
            ce_t = cross_entropy(z_t, targets)
        else:
            ce_t = torch.stack([cross_entropy(z, targets) for z in teacher_logits]).mean()
        return z_t, {"ce_teachers": ce_t}

    def param_groups(self):
        fused = self.student
        groups = [self.network_group(f"teacher{i}_w{b}a{b}", nn.ModuleList([t, q]), b, b)
                  for i, (t, q, b) in enumerate(zip(fused.teachers, fused.fusion_quantizers, self.teacher_bits))]
        theta = self.student.importance_logits
        if theta.requires_grad:
            groups.append({"name": "importance_logits", "params": [theta], "weight_decay": 0.0,
                           "lr_mult": self.options.theta_lr_mult})
        return groups

    def eval_models(self):
        # "student" is the fused ensemble (z_T): the run selects its epoch by the teachers' accuracy
        models = {"student": self.student}
        models.update({f"teacher{i}_w{b}a{b}": _TeacherView(self.student, i) for i, b in enumerate(self.teacher_bits)})
        return models

    def student_arch_config(self):
        from cmtkd.checkpoint import NETWORK_SET_KEY

        return {"arch": self.cfg.arch, "num_classes": self.info.num_classes, "in_channels": self.info.in_channels,
                NETWORK_SET_KEY: [self.arch_config(b, b) for b in self.teacher_bits],
                "fusion_points": self.student.fusion_points, "split_blocks": self.student.split_blocks,
                **fusion_reading(self.student.fusion_input, self.student.requantize_fused)}

    def log_scalars(self):
        pi = self.student.importance().detach().cpu()
        points = self.student.fusion_points
        return {f"pi_{p}_{i}": float(pi[k, i]) for k, p in enumerate(points) for i in range(pi.shape[1])}

    def metadata(self):
        return {"teacher_bits": self.teacher_bits, "fusion_points": self.student.fusion_points,
                **fusion_reading(self.student.fusion_input, self.student.requantize_fused)}
