"""Global knowledge distillation (GKD) of a child from its parent: `run_gkd`, behind `puzzle distill`.

Puzzle (Bercovich et al. 2024) section 5 and Minitron (Sreenivas et al. 2024); docs/methods.md, "Global distillation".
The student (any block_configs: a realized, fused or pruned child) learns the frozen teacher's next-token
distributions and, unless `cosine_weight` is 0, its per-layer hidden states (gkd_loss.py). One code path
for every world size, through accelerate:

    puzzle distill CHILD --teacher PARENT --data corpus/ --out OUT --tokens 50000000      # CPU or one GPU
    accelerate launch -m puzzle distill CHILD --teacher PARENT --data corpus/ --out OUT   # DDP; --fsdp: FSDP2
    torchrun --nproc-per-node 8 -m puzzle distill CHILD --teacher PARENT --data corpus/ --out OUT

Every micro-step cuts one global batch of `batch_size * world_size` windows into the processes' shares, so
what an optimizer step sees depends only on the seed and the global batch. bf16 autocast on GPU with fp32
master weights and the teacher held in bf16; fp32 on CPU. The recipe has a fixed life (torchtune): set up
models, data, optimizer and state; evaluate; train with checkpoints (gkd_state.py); evaluate; write the
child atomically with `gkd.json` beside it. The teacher is replicated on every process, also under FSDP.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from puzzle.arch import Architecture
from puzzle.checkpoint import (
    build_model,
    decilm_config,
    fingerprint,
    finish_checkpoint_dir,
    load_architecture,
    load_model,
    normalized_config,
)
from puzzle.config import check_int, deep_merge, from_mapping, read_yaml, to_mapping
from puzzle.corpus import DataConfig
from puzzle.data import load_token_data, load_tokenizer
from puzzle.distill.gkd_loss import GKDLoss, held_out_sums
from puzzle.distill.gkd_state import STATE_DIR, TrainingState
from puzzle.distill.schedule import warmup_cosine
from puzzle.errors import ConfigError, InputError, OutputExistsError
from puzzle.files import atomic_output_dir, read_json, write_json_atomic
from puzzle.memory import free_bytes
from puzzle.metrics import QualitySums, quality_from
from puzzle.progress import Tracker, log, track

GKD_VERSION = 1
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True, kw_only=True)
class GKDConfig:
    """Every setting of a GKD run (YAML section `gkd`); defaults are for LLM-scale children on GPUs."""

    tokens: int = 1 << 27  # trained tokens; papers used billions (Puzzle 45B), a short run recovers most of the gap
    batch_size: int = 8  # windows per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    seq_len: int | None = None  # None: the data config's seq_len
    lr: float = 1e-4  # Minitron's peak LR for distillation
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.1  # cosine decay ends at lr * this (Minitron: 1e-5 / 1e-4)
    weight_decay: float = 0.0  # the child starts from the parent's weights; decay would pull it away
    grad_clip: float = 1.0
    temperature: float = 1.0  # Minitron found T = 1 best for LLM distillation
    kl_weight: float = 1.0
    cosine_weight: float = 1.0  # Puzzle's GKD adds sum_l (1 - cos); 0 = logits-only KL (Minitron's choice)
    # Teacher layer whose output student layer i's output is compared with (-1: none), for depth-pruned
    # students; None: the same index, which needs equal depths.
    layer_map: tuple[int, ...] | None = None
    checkpoint_every: int = 500  # optimizer steps between checkpoints in OUT/.gkd_state
    eval_tokens: int = 1 << 17  # held-out tokens for the metrics before and after
    logits_chunk: int = 4096  # positions whose logits exist at once (a 128k vocabulary at 16k positions is 8 GB)
    activation_checkpointing: bool = False  # recompute the student's layers in the backward (memory for time)
    seed: int = 0  # the order of the training windows
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU of this process when there is one
    fsdp: bool = False  # shard the student over the processes (FSDP2) instead of replicating it (DDP)
    # The most the teacher's weights may take on each GPU (GiB); its other layers stay in its safetensors files and
    # are read in per forward (same results, slower). None: the teacher is held whole.
    teacher_memory_gb: float | None = None
    trust_remote_code: bool = False  # run code shipped with the tokenizer (user's opt-in)

    def __post_init__(self) -> None:
        for name in ("tokens", "batch_size", "grad_accum", "checkpoint_every", "eval_tokens", "logits_chunk"):
            check_int(f"gkd.{name}", getattr(self, name))
        if self.teacher_memory_gb is not None and not self.teacher_memory_gb > 0:
            raise ConfigError(f"gkd.teacher_memory_gb must be a positive number of GiB, got {self.teacher_memory_gb!r}")
        check_int("gkd.seq_len", self.seq_len, minimum=2, optional=True)
        if not self.lr > 0 or not self.temperature > 0 or not self.grad_clip > 0:
            raise ConfigError("gkd.lr, gkd.temperature and gkd.grad_clip must be positive")
        if not 0 <= self.warmup_fraction < 1 or not 0 <= self.min_lr_fraction <= 1:
            raise ConfigError("gkd.warmup_fraction must be in [0, 1) and gkd.min_lr_fraction in [0, 1]")
        if self.weight_decay < 0 or self.kl_weight < 0 or self.cosine_weight < 0:
            raise ConfigError("gkd.weight_decay, gkd.kl_weight and gkd.cosine_weight must be >= 0")
        if self.kl_weight == 0 and self.cosine_weight == 0:
            raise ConfigError("gkd.kl_weight and gkd.cosine_weight are both 0: nothing to train on; set one > 0")
        if self.layer_map is not None and any(not isinstance(j, int) or j < -1 for j in self.layer_map):
            raise ConfigError(f"gkd.layer_map entries must be teacher layer indices or -1, got {list(self.layer_map)}")
        if self.precision not in ("auto", "fp32", "bf16") or self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("gkd.precision must be auto, fp32 or bf16 and gkd.device auto, cpu or cuda")


@dataclass(frozen=True, kw_only=True)
class HeldOutMetrics:
    """The student against the teacher on the fixed held-out windows (predicting positions)."""

    kl: float  # mean KL(teacher || student) per position at T = 1, nats
    lm_loss: float  # the student's next-token cross-entropy, nats
    top1: float  # fraction of positions where the student's argmax is the teacher's
    teacher_lm_loss: float  # the teacher's, for reference
    positions: int


@dataclass(frozen=True, kw_only=True)
class GKDResult:
    """What `run_gkd` did; saved as OUT/gkd.json."""

    path: str  # the distilled child
    student: str
    teacher: str
    before: HeldOutMetrics
    after: HeldOutMetrics
    tokens: int  # trained tokens: steps * global_batch * seq_len
    steps: int
    global_batch: int  # windows per optimizer step over all processes and micro-steps
    seq_len: int
    seconds: float  # training time, evaluation and checkpoints excluded, summed over resumes
    tokens_per_s: float
    resumed_from_step: int  # 0 unless this call resumed a killed run
    world_size: int
    device: str
    precision: str
    config: GKDConfig
    version: int = GKD_VERSION

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)

    @classmethod
    def load(cls, path: Path) -> GKDResult:
        data = read_json(path, "gkd.json")
        if data.get("version") != GKD_VERSION:
            raise InputError(f"{path}: gkd.json version {data.get('version')} is not {GKD_VERSION}; rerun puzzle distill")
        return from_mapping(cls, data, str(path))


def run_gkd(student_dir: Path, teacher_dir: Path, data_cfg: DataConfig, out_dir: Path,
            cfg: GKDConfig = GKDConfig(), *, overwrite: bool = False, info: dict[str, Any] | None = None) -> GKDResult:
    """Distil the student at `student_dir` from the teacher at `teacher_dir` into a checkpoint at `out_dir`.

    Both folders may be puzzle checkpoints or HF parents of a supported family; they must share the
    vocabulary (the student's tokenizer, else the teacher's, reads `data_cfg`). Metrics on the held-out
    split are measured before and after. Every `cfg.checkpoint_every` steps the full training state goes
    to `out_dir/.gkd_state`; calling again with the same arguments after a kill resumes from it and, on
    CPU with the same thread count, ends with the same weights as an uninterrupted run. The result is a
    standard checkpoint (tokenizer copied, `puzzle.json` extended with the GKD record) plus `gkd.json`,
    written atomically; `out_dir` may exist only as such a state folder unless `overwrite`. `info` is
    added to puzzle.json (e.g. the command line).
    """
    recipe = _Recipe(Path(student_dir), Path(teacher_dir), data_cfg, Path(out_dir), cfg, overwrite)
    recipe.setup()
    recipe.train()
    return recipe.finish(info or {})


def load_gkd_settings(config: Path | None, gkd: dict[str, Any], data: dict[str, Any]) -> tuple[GKDConfig, DataConfig]:
    """The YAML's `gkd` and `data` sections (both optional), overridden by the flags that were given (not None)."""
    raw = read_yaml(config) if config is not None else {}
    where = str(config) if config is not None else "options"
    unknown = sorted(set(raw) - {"gkd", "data"})
    if unknown:
        raise ConfigError(f"{where}: unknown section {unknown[0]!r}; a distill config has only `gkd` and `data`")
    gkd_raw = deep_merge(raw.get("gkd") or {}, {k: v for k, v in gkd.items() if v is not None})
    data_raw = deep_merge(raw.get("data") or {}, {k: v for k, v in data.items() if v is not None})
    if not data_raw.get("paths"):
        raise ConfigError(f"{where}: no training text; pass --data PATH (repeatable) or set data.paths in the config")
    return from_mapping(GKDConfig, gkd_raw, f"{where}: gkd"), from_mapping(DataConfig, data_raw, f"{where}: data")


# ----------------------------------------------------------------------------------------------------------
# Checks that need no model in memory


def _model_config(path: Path, role: str) -> dict[str, Any]:
    if not path.is_dir():
        raise InputError(f"{role} {path}: no such folder; give a model folder (config.json + safetensors)")
    return normalized_config(path)


TRAINING_BYTES_PER_PARAM = 16  # fp32 master weight, gradient and AdamW's two moments
GKD_MEMORY_FRACTION = 0.8  # of a GPU's free memory for the student's training state and the teacher's weights


def gkd_sharding(fsdp: bool, student_params: int, teacher_bytes: int, free: int, world: int) -> bool:
    """Whether to shard the student over the processes (FSDP2): as asked, or by itself when the replicated
    student's training state and the teacher do not fit a GPU but their shards do; logged either way. A student
    that does not fit even sharded over every process is a one-line error naming the fix."""
    need = student_params * TRAINING_BYTES_PER_PARAM + teacher_bytes
    room = GKD_MEMORY_FRACTION * free
    sharded = student_params * TRAINING_BYTES_PER_PARAM / world + teacher_bytes
    mode = "FSDP2" if fsdp or need > room else "DDP"
    log(f"gkd: student training state {student_params * TRAINING_BYTES_PER_PARAM / 2**30:.1f} GiB + teacher "
        f"{teacher_bytes / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free per GPU, {world} process(es): {mode}")
    if teacher_bytes > room:
        raise ConfigError(f"gkd: the teacher alone ({teacher_bytes / 2**30:.1f} GiB) does not fit a GPU "
                          f"({room / 2**30:.1f} GiB usable); set gkd.teacher_memory_gb to hold part of it and read "
                          "the rest from its files per forward")
    if mode == "FSDP2" and sharded > room:
        raise ConfigError(
            f"gkd: the student sharded over {world} process(es) still needs {sharded / 2**30:.1f} GiB per GPU "
            f"({room / 2**30:.1f} GiB usable); run more: torchrun --nproc-per-node N (and --nnodes) -m puzzle distill "
            "... --fsdp, or slurm.nodes x slurm.distill_tasks_per_node with gkd.fsdp: true")
    if mode == "FSDP2" and not fsdp:
        log("gkd: the replicated student would not fit: sharding it with FSDP2 (gkd.fsdp: true says so up front)")
    return mode == "FSDP2"


def layer_pairs(layer_map: tuple[int, ...] | None, student_layers: int, teacher_layers: int) -> tuple[tuple[int, int], ...]:
    """(student layer, teacher layer) pairs of the cosine term."""
    if layer_map is None:
        if student_layers != teacher_layers:
            raise ConfigError(
                f"the student has {student_layers} layers and the teacher {teacher_layers}: set gkd.layer_map (the "
                "teacher layer for each student layer, -1 for none) or gkd.cosine_weight: 0 for logits-only KL"
            )
        return tuple((i, i) for i in range(student_layers))
    if len(layer_map) != student_layers:
        raise ConfigError(f"gkd.layer_map has {len(layer_map)} entries but the student has {student_layers} layers; "
                          "give one teacher layer (or -1) per student layer")
    if any(j >= teacher_layers for j in layer_map):
        raise ConfigError(f"gkd.layer_map {list(layer_map)} names a layer the teacher ({teacher_layers} layers) lacks")
    return tuple((i, j) for i, j in enumerate(layer_map) if j >= 0)


def _check_output(out: Path, teacher: Path, overwrite: bool) -> None:
    if out.resolve() == teacher.resolve():
        raise OutputExistsError(f"{out} is the teacher's folder; choose another output path")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; remove it or choose another output path")
    if not overwrite and any(p.name != STATE_DIR for p in out.iterdir()):
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it or choose another output path")


def _tokenizer_source(student: Path, teacher: Path) -> Path:
    for folder in (student, teacher):
        if any((folder / name).is_file() for name in TOKENIZER_MARKERS):
            return folder
    raise InputError(f"neither {student} nor {teacher} has a tokenizer (tokenizer.json); copy the parent's tokenizer "
                     "files into the child folder")


# ----------------------------------------------------------------------------------------------------------
# The student and the loss as one module


class Distilled(nn.Module):
    """The student with the loss, so that DDP / FSDP see the whole forward, LM head included.

    The teacher's LM head is held outside the module tree: it is frozen and never wrapped. Evaluation goes
    through the same forward (`evaluate=True`) because under FSDP every forward must pass the wrapped root.
    """

    def __init__(self, student: nn.Module, loss: GKDLoss, teacher_head: nn.Module) -> None:
        super().__init__()
        self.student, self.loss = student, loss
        self._teacher_head = (teacher_head,)

    def forward(self, input_ids: torch.Tensor, teacher_states: tuple[torch.Tensor, ...] | None,
                teacher_final: torch.Tensor, evaluate: bool = False) -> tuple[torch.Tensor, ...] | torch.Tensor:
        out = self.student.model(input_ids=input_ids, use_cache=False,
                                 output_hidden_states=self.loss.needs_layer_states and not evaluate)
        if evaluate:
            return held_out_sums(out.last_hidden_state, teacher_final, input_ids, self.student.lm_head,
                                 self._teacher_head[0], self.loss.logits_chunk)
        return self.loss(out.hidden_states, teacher_states, out.last_hidden_state, teacher_final,
                         self.student.lm_head, self._teacher_head[0])


# ----------------------------------------------------------------------------------------------------------
# The recipe


class _Recipe:
    def __init__(self, student: Path, teacher: Path, data_cfg: DataConfig, out: Path, cfg: GKDConfig, overwrite: bool):
        self.student_dir, self.teacher_dir, self.data_cfg, self.out, self.cfg = student, teacher, data_cfg, out, cfg
        self.overwrite = overwrite
        self.seq_len = cfg.seq_len or data_cfg.seq_len

    def setup(self) -> None:
        self._check_inputs()
        self._setup_accelerator()
        self._setup_models()
        self._setup_data()
        self._setup_optimizer()
        self._setup_state()

    def _check_inputs(self) -> None:
        """Everything that can be checked from the config files, before any weight is read."""
        cfg = self.cfg
        teacher = _model_config(self.teacher_dir, "teacher")
        student = _model_config(self.student_dir, "student")
        if student["vocab_size"] != teacher["vocab_size"]:
            raise InputError(
                f"{self.student_dir}: vocab_size {student['vocab_size']} differs from the teacher's {teacher['vocab_size']} "
                f"({self.teacher_dir}); distillation compares next-token distributions, so both need the same tokenizer"
            )
        self.pairs: tuple[tuple[int, int], ...] = ()
        if cfg.cosine_weight > 0:
            if student["hidden_size"] != teacher["hidden_size"]:
                raise ConfigError(
                    f"the student's hidden_size {student['hidden_size']} differs from the teacher's {teacher['hidden_size']}, "
                    "so their hidden states cannot be compared; set gkd.cosine_weight: 0 (logits-only KL)"
                )
            self.pairs = layer_pairs(cfg.layer_map, student["num_hidden_layers"], teacher["num_hidden_layers"])
        for role, config in (("student", student), ("teacher", teacher)):
            if self.seq_len > config["max_position_embeddings"]:
                raise ConfigError(f"seq_len {self.seq_len} exceeds the {role}'s max_position_embeddings "
                                  f"({config['max_position_embeddings']}); lower gkd.seq_len")
        _check_output(self.out, self.teacher_dir, self.overwrite)
        self.tokenizer_dir = _tokenizer_source(self.student_dir, self.teacher_dir)
        self.student_config = student

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator, FullyShardedDataParallelPlugin

        cfg = self.cfg
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("gkd.device is cuda but CUDA is not available; use device auto or cpu")
        cpu = cfg.device == "cpu" or not torch.cuda.is_available()
        self.precision = cfg.precision if cfg.precision != "auto" else ("fp32" if cpu else "bf16")
        fsdp = cfg.fsdp
        if not cpu:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            student = Architecture.from_config(self.student_config).total_params()
            teacher = load_architecture(self.teacher_dir).total_params() * (2 if self.precision == "bf16" else 4)
            if cfg.teacher_memory_gb is not None:
                teacher = min(teacher, int(cfg.teacher_memory_gb * 2**30))
            fsdp = gkd_sharding(cfg.fsdp, student, teacher, free_bytes(device), world)
        plugin = None
        if fsdp:
            plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                transformer_cls_names_to_wrap=["DeciLMDecoderLayer"], state_dict_type="SHARDED_STATE_DICT",
            )
        self.acc = Accelerator(cpu=cpu, mixed_precision="bf16" if self.precision == "bf16" else "no", fsdp_plugin=plugin)
        self.world = self.acc.num_processes

    def _setup_models(self) -> None:
        cfg, acc = self.cfg, self.acc
        teacher_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        budget = int(cfg.teacher_memory_gb * 2**30) if cfg.teacher_memory_gb is not None else None
        self.teacher = load_model(self.teacher_dir, dtype=teacher_dtype, device=acc.device, max_bytes=budget).requires_grad_(False)
        if self.teacher.offloaded_layers:
            log(f"gkd: the teacher's last {self.teacher.offloaded_layers} layers are read from {self.teacher_dir} per "
                f"forward (gkd.teacher_memory_gb: {cfg.teacher_memory_gb})")
        student = load_model(self.student_dir, dtype=torch.float32, device="cpu").train()  # fp32 master weights
        if cfg.activation_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = GKDLoss(temperature=cfg.temperature, kl_weight=cfg.kl_weight, cosine_weight=cfg.cosine_weight,
                       layer_pairs=self.pairs, logits_chunk=cfg.logits_chunk)
        self.model = Distilled(student, loss, self.teacher.lm_head)

    def _setup_data(self) -> None:
        cfg, acc = self.cfg, self.acc
        with acc.main_process_first():  # one process tokenizes; the others read its cache
            self.data = load_token_data(self.data_cfg, load_tokenizer(self.tokenizer_dir, cfg.trust_remote_code))
        self.global_batch = cfg.batch_size * self.world * cfg.grad_accum
        self.steps = max(1, math.ceil(cfg.tokens / (self.global_batch * self.seq_len)))
        eval_tokens = max(cfg.eval_tokens, self.seq_len)
        self.eval_batches = list(self.data.batches("held_out", cfg.batch_size, self.seq_len, n_tokens=eval_tokens,
                                                   shuffle=False))

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # norms never decay (nanoGPT)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
        # Not prepared: accelerate would step a prepared scheduler once per process. Not registered for
        # accelerate's checkpoints either (that state is a pickle): `TrainingState` keeps it as JSON.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(self.steps, cfg.warmup_fraction, cfg.min_lr_fraction))
        self.model, self.optimizer = self.acc.prepare(self.model, optimizer)  # one call: FSDP2 remaps the params

    def _setup_state(self) -> None:
        neutral = ("checkpoint_every", "trust_remote_code", "teacher_memory_gb")  # how it runs, not what it trains
        settings = {k: v for k, v in to_mapping(self.cfg).items() if k not in neutral}
        key = json.dumps({"gkd": settings, "student": fingerprint(self.student_dir),
                          "teacher": fingerprint(self.teacher_dir), "data": str(self.data.cache_path),
                          "seq_len": self.seq_len, "world": self.world, "precision": self.precision}, sort_keys=True)
        if self.acc.is_main_process:
            (self.out / STATE_DIR).mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        self.state = TrainingState(self.out, hashlib.sha256(key.encode()).hexdigest()[:20], self.acc)
        resume = self.state.find(self.overwrite)
        if resume is None:
            self.start_step, self.seconds, self.before = 0, 0.0, self.evaluate()
            return
        self.state.load(resume)
        self.scheduler.load_state_dict(resume.scheduler)
        self.start_step, self.seconds, self.before = resume.step, resume.seconds, HeldOutMetrics(**resume.before)
        if self.acc.is_main_process:
            log(f"resuming GKD at step {resume.step} of {self.steps} from {self.state.root}")

    # -- evaluation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> HeldOutMetrics:
        """Metrics over the fixed held-out windows; the processes take turns and their sums are added."""
        acc, n = self.acc, len(self.eval_batches)
        sums = QualitySums(acc.device).sums
        self.model.eval()
        for r in range(math.ceil(n / self.world)):
            i = r * self.world + acc.process_index
            ids = self.eval_batches[min(i, n - 1)].to(acc.device)  # a spare process repeats a batch (FSDP: lockstep)
            teacher_final = self.teacher.model(input_ids=ids, use_cache=False).last_hidden_state
            part = self.model(ids, None, teacher_final, evaluate=True)
            if i < n:
                sums += part
        self.model.train()
        q = quality_from(acc.reduce(sums, "sum"))
        return HeldOutMetrics(kl=q.kl, lm_loss=q.lm_loss, top1=q.top1, teacher_lm_loss=q.reference_lm_loss,
                              positions=q.tokens)

    # -- training ------------------------------------------------------------------------------------------

    def _micro_batches(self) -> Iterator[torch.Tensor]:
        """This process's rows of each global micro-batch, from the first micro-step not yet trained."""
        b, rank, accum = self.cfg.batch_size, self.acc.process_index, self.cfg.grad_accum
        rows = b * self.world
        for batch in self.data.batches("train", rows, self.seq_len, n_tokens=self.steps * accum * rows * self.seq_len,
                                       shuffle=True, seed=self.cfg.seed, start_step=self.start_step * accum):
            yield batch[rank * b:(rank + 1) * b]  # (B, T)

    def _loss(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            t = self.teacher.model(input_ids=ids, use_cache=False, output_hidden_states=bool(self.pairs))
        return self.model(ids, t.hidden_states, t.last_hidden_state)

    def train(self) -> None:
        cfg, acc = self.cfg, self.acc
        batches = self._micro_batches()
        tokens_per_step = self.global_batch * self.seq_len
        bar_cm = track("gkd", self.steps) if acc.is_main_process else nullcontext(Tracker(None, None))
        with bar_cm as bar:
            bar.advance(self.start_step)
            began = time.perf_counter()
            for step in range(self.start_step, self.steps):
                logged = torch.zeros(3, device=acc.device)
                for micro in range(cfg.grad_accum):
                    ids = next(batches).to(acc.device)
                    last = micro == cfg.grad_accum - 1
                    with nullcontext() if last else acc.no_sync(self.model):  # all-reduce once per step
                        loss, kl, cosine = self._loss(ids)
                        acc.backward(loss / cfg.grad_accum)
                    logged += torch.stack([loss.detach(), kl, cosine]).float() / cfg.grad_accum
                acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                done = step + 1
                elapsed = time.perf_counter() - began
                loss_v, kl_v, cos_v = logged.tolist()  # this process's share: enough for a progress bar
                bar.advance(1, loss=loss_v, kl=kl_v, cos=cos_v,
                            tok_s=round((done - self.start_step) * tokens_per_step / max(elapsed, 1e-9)))
                if done % cfg.checkpoint_every == 0 and done < self.steps:
                    paused = time.perf_counter()
                    self.state.save(done, self.seconds + paused - began, asdict(self.before), self.scheduler.state_dict())
                    began += time.perf_counter() - paused  # checkpoint time is not training time
            self.seconds += time.perf_counter() - began
        self.resumed_from = self.start_step

    # -- output --------------------------------------------------------------------------------------------

    def finish(self, info: dict[str, Any]) -> GKDResult:
        cfg, acc = self.cfg, self.acc
        after = self.evaluate()
        tokens = self.steps * self.global_batch * self.seq_len
        result = GKDResult(
            path=str(self.out), student=str(self.student_dir), teacher=str(self.teacher_dir), before=self.before,
            after=after, tokens=tokens, steps=self.steps, global_batch=self.global_batch, seq_len=self.seq_len,
            seconds=round(self.seconds, 3), tokens_per_s=round(tokens / max(self.seconds, 1e-9), 1),
            resumed_from_step=self.resumed_from, world_size=self.world, device=str(acc.device),
            precision=self.precision, config=cfg,
        )
        student = self._trained_student()
        if acc.is_main_process:
            self._write(student, result, info)
        acc.wait_for_everyone()
        if acc.is_main_process:
            log(f"GKD: held-out KL {result.before.kl:.4f} -> {after.kl:.4f}, LM loss {result.before.lm_loss:.4f} -> "
                f"{after.lm_loss:.4f}, top-1 {result.before.top1:.3f} -> {after.top1:.3f} ({result.tokens_per_s:.0f} tokens/s)")
        return result

    def _trained_student(self) -> nn.Module | None:
        """The trained student, whole, on the main process (None elsewhere)."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type != DistributedType.FSDP:  # FSDP also shards a world of one (torchrun)
            return self.acc.unwrap_model(self.model).student if self.acc.is_main_process else None
        state = self.acc.get_state_dict(self.model)  # gathers the shards (every process must call it)
        if not self.acc.is_main_process:
            return None
        student = build_model(decilm_config(self.student_config))
        missing, unexpected = student.load_state_dict({k.removeprefix("student."): v for k, v in state.items()}, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # a tied head may be left out
        student.tie_weights()
        return student

    def _write(self, student: nn.Module, result: GKDResult, info: dict[str, Any]) -> None:
        """The checkpoint in the student's stored dtype, puzzle.json extended, gkd.json: one atomic folder."""
        prior_path = self.student_dir / "puzzle.json"
        prior = read_json(prior_path) if prior_path.is_file() else {}
        record = {k: v for k, v in prior.items() if k not in ("puzzle_version", "created")}
        record.update(info)
        record["gkd"] = {"teacher": str(self.teacher_dir.resolve()), "student": str(self.student_dir.resolve()),
                         "before": asdict(result.before), "after": asdict(result.after), "tokens": result.tokens}
        dtype = getattr(torch, str(self.student_config.get("dtype") or "float32"), torch.float32)
        with atomic_output_dir(self.out, overwrite=True) as tmp:  # replaces OUT and its .gkd_state together
            student.to(dtype).save_pretrained(tmp, max_shard_size="5GB", safe_serialization=True)
            config = json.loads((tmp / "config.json").read_text())
            finish_checkpoint_dir(tmp, config, self.tokenizer_dir, record)
            write_json_atomic(tmp / "gkd.json", result.to_dict())
