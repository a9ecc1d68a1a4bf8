"""The embedded demo parent (README, "make demo"): a small Llama (or Mixtral) trained here, on CPU, in minutes.

No pretrained weights can be downloaded, so the demo makes its own parent from a corpus every machine has:
the Python standard library's own source files (test suites excluded). A byte-level BPE tokenizer is
trained with `tokenizers` on the train files, then a Llama (8 layers, hidden 256, 4 heads of 64, 4 KV heads
so KV-head reduction has room: 4 -> 2 -> 1) is trained for a fixed token budget with AdamW, warm-up and
cosine decay. Train and held-out files are split by `puzzle.data` with the config `demo_data_config(cfg)`
describes, so later stages see the same held-out files, never trained on.

    parent = build_demo_parent()          # ~/.cache/puzzle/demo/parent (or $PUZZLE_DEMO_DIR/parent)
    moe = build_demo_parent(moe_demo_config(), out=demo_dir() / "parent-moe")   # `puzzle demo --moe`
    parent.metrics.held_out_loss, parent.metrics.unigram_loss

The result is an ordinary HF Llama folder (config.json, model.safetensors, generation_config.json, tokenizer)
plus `demo.json` (config, metrics, fingerprint). It is written through a temporary folder renamed into
place, and reused while the config and the corpus are unchanged and its files are intact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from puzzle.config import check_int
from puzzle.corpus import DataConfig, iter_documents, source_fingerprint
from puzzle.data import TokenData, load_token_data
from puzzle.errors import ConfigError
from puzzle.files import atomic_output_dir, write_json_atomic
from puzzle.progress import log, quiet, track

DEMO_VERSION = 1  # bump when the build recipe changes, so cached parents are rebuilt
DEMO_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
_NOT_IN_FINGERPRINT = ("threads", "device", "max_shard_size", "save_dtype")  # how it is built and stored
_MOE_FIELDS = ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef")  # fingerprinted for MoE parents only


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Every choice of the demo parent; all but `threads` goes into the cache fingerprint."""

    # Corpus
    stdlib_dir: str | None = None  # None: this interpreter's sysconfig.get_paths()["stdlib"]
    # Test suites are huge, repetitive and partly not UTF-8; idlelib/lib2to3 are applications, site-packages
    # is third-party code that differs between machines.
    exclude: tuple[str, ...] = ("test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__")
    held_out_fraction: float = 0.05  # ~30 of ~600 files: enough held-out tokens for scoring
    split_seed: int = 0
    max_files: int | None = None  # a fixed sample of the files (tests use a handful)

    # Tokenizer: byte-level BPE, so any text round-trips; 4k tokens keeps the embedding small.
    vocab_size: int = 4096
    min_frequency: int = 2
    special_token: str = "<|endoftext|>"  # bos, eos and pad, GPT-2 style

    # Model: transformers' LlamaConfig names.
    num_hidden_layers: int = 8
    hidden_size: int = 256
    num_attention_heads: int = 4
    head_dim: int = 64
    num_key_value_heads: int = 4  # full MHA, so the search can halve KV heads twice
    intermediate_size: int = 768  # 3x hidden: the SwiGLU ratio of Llama, rounded to a multiple of 256
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    # > 0: a Mixtral with this many experts per layer, each a SwiGLU of `intermediate_size` (`puzzle demo --moe`),
    # instead of the Llama. Its load-balancing loss keeps every expert in use, so expert pruning has a real choice.
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02
    initializer_range: float = 0.02  # embeddings and LM head (HF's default)
    # Matrices inside the blocks start at 0.02 / sqrt(2 * layers) (GPT-2's residual scaling, applied to all
    # of them): at this budget it gave 0.3-0.5 nats lower held-out loss than 0.02 (3 seeds), because the
    # model leaves the unigram plateau sooner.
    block_init_std: float = 0.005

    # Training: fp32 on CPU, budget in tokens (deterministic), sized for <= 6 minutes on 2 cores.
    seq_len: int = 256
    # Few optimizer steps fit the budget, and here steps matter more than tokens per step: batch 8 (128
    # steps) ended 0.1-0.3 nats lower than batch 16 (64 steps) at ~10% lower CPU throughput.
    batch_size: int = 8
    train_tokens: int = 262_144  # 128 steps of 8 x 256: ~5 minutes at ~900 tokens/s on 2 cores
    learning_rate: float = 3e-3  # best of 1e-3 .. 1e-2 at this budget
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of learning_rate
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    # Evaluation: a fixed random sample of held-out windows; the whole split would take longer than training.
    eval_tokens: int = 32_768
    eval_batch_size: int = 16

    # None: os.cpu_count(). One is faster for tiny models or on a busy machine (idle OpenMP threads spin).
    # Not part of the fingerprint: it changes speed, and float results only in the last bits.
    threads: int | None = None
    # cpu trains in fp32; cuda (benchmarks' larger parents) in bf16 autocast with fp32 master weights. Not part
    # of the fingerprint either: a parent is reused whichever device built it.
    device: str = "cpu"
    max_shard_size: str = "5GB"  # safetensors shards; a benchmark parent that must travel uses smaller ones
    save_dtype: str = "float32"  # bfloat16 halves a benchmark parent's files (GPUs run it in bf16 anyway)

    def __post_init__(self) -> None:
        positive = (
            "vocab_size", "min_frequency", "num_hidden_layers", "hidden_size", "num_attention_heads", "head_dim",
            "num_key_value_heads", "intermediate_size", "max_position_embeddings", "seq_len", "batch_size",
            "train_tokens", "eval_tokens", "eval_batch_size",
        )
        for name in positive:
            check_int(f"DemoConfig.{name}", getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"DemoConfig.num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.seq_len > self.max_position_embeddings:
            raise ConfigError(f"DemoConfig.seq_len ({self.seq_len}) exceeds max_position_embeddings")
        check_int("DemoConfig.threads", self.threads, optional=True)
        if self.num_local_experts < 0 or (self.num_local_experts and not 1 <= self.num_experts_per_tok <= self.num_local_experts):
            raise ConfigError(f"DemoConfig: need num_local_experts >= 0 and 1 <= num_experts_per_tok <= num_local_experts, "
                              f"got {self.num_local_experts} and {self.num_experts_per_tok}")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"DemoConfig.save_dtype must be float32 or bfloat16, got {self.save_dtype!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"DemoConfig.device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.vocab_size < 257:
            raise ConfigError(f"DemoConfig.vocab_size must exceed the 256 byte tokens, got {self.vocab_size}")
        if self.train_tokens < self.batch_size * self.seq_len:
            raise ConfigError("DemoConfig.train_tokens must cover at least one batch (batch_size * seq_len)")
        if not self.initializer_range > 0 or not self.block_init_std > 0:
            raise ConfigError("DemoConfig.initializer_range and block_init_std must be positive")
        if not 0 <= self.warmup_fraction < 1 or not 0 <= self.min_lr_ratio <= 1 or self.learning_rate <= 0:
            raise ConfigError("DemoConfig: need 0 <= warmup_fraction < 1, 0 <= min_lr_ratio <= 1, learning_rate > 0")
        # held_out_fraction, max_files and exclude are checked by DataConfig in demo_data_config.
        demo_data_config(self)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DemoConfig:
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"demo: unknown field {key!r}; allowed fields are {', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True, kw_only=True)
class DemoMetrics:
    held_out_loss: float  # nats/token of the trained parent on held-out windows
    unigram_loss: float  # the same tokens under add-one-smoothed train-split unigram frequencies
    initial_loss: float  # train loss of the first step (about ln(vocab_size))
    final_train_loss: float  # mean train loss of the last 10 steps
    train_tokens: int  # tokens actually trained on (steps * batch * seq_len)
    steps: int
    eval_tokens: int  # predicted held-out tokens behind held_out_loss
    train_files: int
    held_out_files: int
    train_corpus_tokens: int
    held_out_corpus_tokens: int
    parameters: int
    threads: int
    train_time_s: float
    tokens_per_s: float  # training throughput
    wall_time_s: float  # the whole build: tokenizer, tokenization, training, evaluation, saving


@dataclass(frozen=True, kw_only=True)
class DemoParent:
    path: Path  # the HF folder
    metrics: DemoMetrics
    config: DemoConfig
    fingerprint: str
    cached: bool  # True when an existing build was reused


def demo_dir() -> Path:
    """`$PUZZLE_DEMO_DIR`, else `~/.cache/puzzle/demo`."""
    env = os.environ.get("PUZZLE_DEMO_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "puzzle" / "demo"


def demo_data_config(cfg: DemoConfig) -> DataConfig:
    """The corpus and split of the demo parent, for the stages that calibrate, distill and score on it."""
    return DataConfig(
        paths=(cfg.stdlib_dir or sysconfig.get_paths()["stdlib"],),
        patterns=("*.py",),
        exclude=cfg.exclude,
        seq_len=cfg.seq_len,
        held_out_fraction=cfg.held_out_fraction,
        seed=cfg.split_seed,
        max_documents=cfg.max_files,
    )


def build_demo_parent(cfg: DemoConfig = DemoConfig(), force: bool = False, out: Path | None = None) -> DemoParent:
    """Train the demo parent into `out` (default `demo_dir()/parent`), or return the cached one built from the
    same config.

    A folder whose demo.json fingerprint differs (other config, changed corpus, older recipe) or whose files
    are missing or truncated is rebuilt; `force` rebuilds anyway. Training is deterministic given the config
    and the thread count (on CPU).
    """
    out = Path(out) if out is not None else demo_dir() / "parent"
    data_cfg = demo_data_config(cfg)
    # A dense parent's fingerprint leaves out the MoE fields, so adding them did not invalidate cached parents.
    moe_free = _MOE_FIELDS if not cfg.num_local_experts else ()
    recipe = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IN_FINGERPRINT + moe_free}
    fingerprint = source_fingerprint(
        data_cfg, extra={"demo_version": DEMO_VERSION, "config": recipe, "stdlib": data_cfg.paths[0]}
    )
    if not force and (parent := _load_cached(out, fingerprint)) is not None:
        return parent
    started = time.perf_counter()
    with atomic_output_dir(out, overwrite=True) as tmp:
        metrics = _build(cfg, data_cfg, tmp)
        metrics = DemoMetrics(**{**asdict(metrics), "wall_time_s": round(time.perf_counter() - started, 2)})
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())
                 if p.name in DEMO_FILES or p.suffix == ".safetensors" or p.name.endswith(".index.json")}
        record = {
            "version": DEMO_VERSION, "fingerprint": fingerprint, "config": cfg.to_dict(),
            "metrics": asdict(metrics), "files": files,
        }
        write_json_atomic(tmp / "demo.json", record)
    log(
        f"demo parent: held-out loss {metrics.held_out_loss:.3f} vs unigram {metrics.unigram_loss:.3f} nats/token, "
        f"{metrics.train_tokens} tokens in {metrics.wall_time_s:.0f}s -> {out}"
    )
    return DemoParent(path=out, metrics=metrics, config=cfg, fingerprint=fingerprint, cached=False)


def _load_cached(out: Path, fingerprint: str) -> DemoParent | None:
    try:
        record = json.loads((out / "demo.json").read_text())
        if record.get("version") != DEMO_VERSION or record.get("fingerprint") != fingerprint:
            return None
        if any((out / name).stat().st_size != size for name, size in record["files"].items()):
            return None
        return DemoParent(
            path=out, metrics=DemoMetrics(**record["metrics"]), config=DemoConfig.from_dict(record["config"]),
            fingerprint=fingerprint, cached=True,
        )
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
        return None  # missing, incomplete or from another recipe: rebuild


def _build(cfg: DemoConfig, data_cfg: DataConfig, out: Path) -> DemoMetrics:
    train_texts, files = [], {"train": 0, "held_out": 0}
    for doc in iter_documents(data_cfg):
        files[doc.split] += 1
        if doc.split == "train":
            train_texts.append(doc.text)
    tokenizer = train_tokenizer(train_texts, cfg)
    del train_texts
    _save_tokenizer(tokenizer, out)
    data = load_token_data(data_cfg, tokenizer, cache_dir=out / ".tokens")
    with _torch_threads(cfg.threads or os.cpu_count() or 1) as threads:
        model = _new_model(cfg, tokenizer.eos_token_id).to(cfg.device)
        history, trained, train_time = _train(model, data, cfg)
        held_out_loss, unigram_loss, eval_tokens = _evaluate(model, data, cfg)
    with _quiet_transformers():
        model.to("cpu", getattr(torch, cfg.save_dtype)).save_pretrained(out, max_shard_size=cfg.max_shard_size)
    metrics = DemoMetrics(
        held_out_loss=round(held_out_loss, 4),
        unigram_loss=round(unigram_loss, 4),
        initial_loss=round(history[0], 4),
        final_train_loss=round(float(np.mean(history[-10:])), 4),
        train_tokens=trained,
        steps=len(history),
        eval_tokens=eval_tokens,
        train_files=files["train"],
        held_out_files=files["held_out"],
        train_corpus_tokens=data.num_tokens("train"),
        held_out_corpus_tokens=data.num_tokens("held_out"),
        parameters=sum(p.numel() for p in model.parameters()),
        threads=threads,
        train_time_s=round(train_time, 2),
        tokens_per_s=round(trained / train_time, 1),
        wall_time_s=0.0,  # filled in by the caller, which also counts saving
    )
    del data  # unmaps the token files before they are removed
    shutil.rmtree(out / ".tokens")
    return metrics


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' own tqdm bars when puzzle's are (PUZZLE_QUIET)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextmanager
def _torch_threads(n: int) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def train_tokenizer(texts: list[str], cfg: DemoConfig) -> Any:
    """A byte-level BPE `PreTrainedTokenizerFast` with one special token serving as bos, eos and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[cfg.special_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    special = cfg.special_token
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special, eos_token=special, pad_token=special,
        model_max_length=cfg.max_position_embeddings,
    )


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    tokenizer.save_pretrained(out)
    # transformers 5 writes its own class name (TokenizersBackend); the 4.x releases that vLLM may pin know
    # only PreTrainedTokenizerFast, which 5.x maps to the same class.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json_atomic(config_path, config)


def moe_demo_config() -> DemoConfig:
    """The MoE demo parent (`puzzle demo --moe`): a 4-layer Mixtral, 8 experts of width 256, 2 per token."""
    return DemoConfig(num_hidden_layers=4, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2)


def _new_model(cfg: DemoConfig, special_id: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    config_class, model_class, moe = LlamaConfig, LlamaForCausalLM, {}
    if cfg.num_local_experts:
        config_class, model_class = MixtralConfig, MixtralForCausalLM
        moe = dict(num_local_experts=cfg.num_local_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   output_router_logits=True, router_aux_loss_coef=cfg.router_aux_loss_coef, sliding_window=None)
    config = config_class(
        **moe,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False,
        initializer_range=cfg.initializer_range,
        bos_token_id=special_id,
        eos_token_id=special_id,
        pad_token_id=special_id,
    )
    with torch.random.fork_rng():  # seeded init without disturbing the caller's RNG
        torch.manual_seed(cfg.seed)
        model = model_class(config).float()
        with torch.no_grad():
            for layer in model.model.layers:
                for param in layer.parameters():
                    if param.dim() >= 2:  # q/k/v/o, gate/up/down (Mixtral: router, stacked experts); norms stay at 1
                        param.normal_(0.0, cfg.block_init_std)
    return model


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _lr_at(step: int, steps: int, cfg: DemoConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * learning_rate at the last step."""
    warmup = max(1, round(cfg.warmup_fraction * steps))
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _train(model: Any, data: TokenData, cfg: DemoConfig) -> tuple[list[float], int, float]:
    """Train in place; returns the loss of every step, the tokens trained on and the seconds spent."""
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices decay; norms do not (nanoGPT)
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8,
    )
    steps = data.num_batches("train", cfg.batch_size, n_tokens=cfg.train_tokens)
    batches = data.batches("train", cfg.batch_size, n_tokens=cfg.train_tokens, shuffle=True, seed=cfg.seed)
    history: list[float] = []
    trained = 0
    model.train()
    started = time.perf_counter()
    with track("training demo parent", total=steps) as bar:
        for step, input_ids in enumerate(batches):  # (B, T)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, cfg)
            input_ids = input_ids.to(model.device)
            with _autocast(model.device):
                loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append(loss.item())
            trained += input_ids.numel()
            bar.advance(1, loss=history[-1], tok_s=round(trained / (time.perf_counter() - started)))
    return history, trained, time.perf_counter() - started


@torch.no_grad()
def _evaluate(model: Any, data: TokenData, cfg: DemoConfig) -> tuple[float, float, int]:
    """(model loss, unigram loss, predicted tokens) on a fixed sample of held-out windows, in nats/token."""
    counts = np.bincount(np.asarray(data.tokens["train"]), minlength=cfg.vocab_size).astype(np.float64) + 1.0
    unigram_logp = torch.from_numpy(np.log(counts / counts.sum()))  # (V,) add-one smoothed
    model.eval()
    model_nll = unigram_nll = 0.0
    n = 0
    # Shuffled with a fixed seed: the same windows every time, spread over all held-out files.
    batches = data.batches("held_out", cfg.eval_batch_size, n_tokens=cfg.eval_tokens, shuffle=True, seed=0)
    total = data.num_batches("held_out", cfg.eval_batch_size, n_tokens=cfg.eval_tokens)
    with track("evaluating demo parent", total=total) as bar:
        for input_ids in batches:  # (B, T)
            with _autocast(model.device):
                logits = model(input_ids=input_ids.to(model.device)).logits[:, :-1].float().cpu()  # (B, T-1, V)
            targets = input_ids[:, 1:]  # (B, T-1)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            model_nll += nll.item()
            unigram_nll -= unigram_logp[targets].sum().item()
            n += targets.numel()
            bar.advance(1)
    return model_nll / n, unigram_nll / n, n
