"""The configuration tree: plain dataclasses, validated in ``__post_init__``.

Library code only ever sees these dataclasses. ``ModelConfig`` describes a language model: an
embedding, a stack of blocks whose mixers follow a tiled layer *pattern*, a final norm and an LM
head. Each mixer family has its own sub-config; a model only uses the ones its pattern names.

Pattern letters: ``A`` attention, ``S`` sliding-window attention, ``m`` Mamba, ``M`` Mamba2,
``D`` DeltaNet, ``G`` Gated DeltaNet. The pattern is tiled over ``n_layers``: ``"GS"`` with
``n_layers=4`` is ``G S G S`` (Gated DeltaNet-H1), ``"MGS"`` is H2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIXER_LETTERS = {
    "A": "attention",
    "S": "sliding-window attention",
    "m": "mamba",
    "M": "mamba2",
    "D": "deltanet",
    "G": "gated_deltanet",
}
OP_BACKENDS = ("auto", "reference", "chunked", "triton")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class AttentionConfig:
    """Softmax attention (Transformer++): GQA, RoPE, optional sliding window for ``S`` layers."""

    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (MHA); fewer heads: GQA
    head_dim: int | None = None  # None: d_model // n_heads
    rope_theta: float = 10000.0
    window: int = 2048  # window of ``S`` layers, in tokens (the query attends to `window` keys)
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        _check(self.n_heads > 0, "model.attention.n_heads must be positive")
        kv = self.n_kv_heads if self.n_kv_heads is not None else self.n_heads
        _check(
            kv > 0 and self.n_heads % kv == 0,
            f"model.attention.n_kv_heads={kv} must divide n_heads={self.n_heads}",
        )
        _check(self.window > 0, "model.attention.window must be positive")


@dataclass
class MambaConfig:
    """Mamba (selective SSM), parameterised as mamba_ssm's ``Mamba`` module."""

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"  # "auto": ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        _check(
            self.dt_rank == "auto" or (isinstance(self.dt_rank, int) and self.dt_rank > 0),
            f"model.mamba.dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}",
        )
        _check(0 < self.dt_min <= self.dt_max, "model.mamba needs 0 < dt_min <= dt_max")


@dataclass
class Mamba2Config:
    """Mamba2 (SSD), parameterised as mamba_ssm's ``Mamba2`` module."""

    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    A_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False
    norm_before_gate: bool = False
    chunk_size: int = 256

    def __post_init__(self) -> None:
        self.A_init_range = tuple(self.A_init_range)  # type: ignore[assignment]
        _check(0 < self.A_init_range[0] <= self.A_init_range[1], "model.mamba2.A_init_range must be 0 < lo <= hi")
        _check(0 < self.dt_min <= self.dt_max, "model.mamba2 needs 0 < dt_min <= dt_max")
        _check(self.chunk_size > 0, "model.mamba2.chunk_size must be positive")


@dataclass
class DeltaNetConfig:
    """DeltaNet: q/k/v projections, short convs, L2-normalised q/k, beta gate, delta rule."""

    n_heads: int = 4
    head_dim: int = 64  # key (and query) head dim; value head dim = head_dim * expand_v
    expand_v: float = 1.0
    conv_size: int = 4
    use_short_conv: bool = True
    use_output_gate: bool = False
    chunk_size: int = 64

    def __post_init__(self) -> None:
        _check(self.n_heads > 0 and self.head_dim > 0, "model.deltanet: n_heads and head_dim must be positive")
        _check(
            float(self.head_dim * self.expand_v).is_integer(),
            "model.deltanet: head_dim * expand_v must be an integer",
        )


@dataclass
class GatedDeltaNetConfig:
    """Gated DeltaNet: DeltaNet plus a decay gate g = -exp(A_log) * softplus(W_a x + dt_bias)
    and an output gate. Value heads are ``expand_v`` times the key head dim (2 in the paper)."""

    n_heads: int = 4
    head_dim: int = 64
    expand_v: float = 2.0
    conv_size: int = 4
    use_short_conv: bool = True
    A_init_range: tuple[float, float] = (0.0, 16.0)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    chunk_size: int = 64

    def __post_init__(self) -> None:
        self.A_init_range = tuple(self.A_init_range)  # type: ignore[assignment]
        _check(self.n_heads > 0 and self.head_dim > 0, "model.gated_deltanet: n_heads and head_dim must be positive")
        _check(
            float(self.head_dim * self.expand_v).is_integer(),
            "model.gated_deltanet: head_dim * expand_v must be an integer",
        )


@dataclass
class ModelConfig:
    """A language model: embedding → blocks (mixer [+ SwiGLU MLP]) tiled from ``pattern`` → norm → head.

    ``d_intermediate``: hidden size of each block's SwiGLU MLP; 0 makes mixer-only blocks (as
    mamba_ssm's pure Mamba stacks); None picks the Llama-style size, 8/3 · d_model rounded up to a
    multiple of 256.
    """

    name: str = "custom"
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    pattern: str = "G"
    d_intermediate: int | None = None
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    backend: str = "auto"  # op backend for every mixer: auto | reference | chunked | triton
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    deltanet: DeltaNetConfig = field(default_factory=DeltaNetConfig)
    gated_deltanet: GatedDeltaNetConfig = field(default_factory=GatedDeltaNetConfig)

    def __post_init__(self) -> None:
        _check(self.vocab_size > 0, "model.vocab_size must be positive")
        _check(self.d_model > 0, "model.d_model must be positive")
        _check(self.n_layers > 0, "model.n_layers must be positive")
        _check(len(self.pattern) > 0, "model.pattern must name at least one mixer")
        bad = sorted(set(self.pattern) - set(MIXER_LETTERS))
        _check(
            not bad,
            f"model.pattern={self.pattern!r} has unknown letter(s) {bad}; "
            f"allowed: {', '.join(f'{k}={v}' for k, v in MIXER_LETTERS.items())}",
        )
        _check(self.backend in OP_BACKENDS, f"model.backend={self.backend!r}; allowed: {', '.join(OP_BACKENDS)}")
        _check(self.d_intermediate is None or self.d_intermediate >= 0, "model.d_intermediate must be >= 0")

    @property
    def layer_types(self) -> list[str]:
        """The mixer letter of every layer: the pattern tiled to ``n_layers``."""
        return [self.pattern[i % len(self.pattern)] for i in range(self.n_layers)]

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU hidden size (0 = no MLP)."""
        if self.d_intermediate is not None:
            return self.d_intermediate
        return 256 * math.ceil(8 * self.d_model / 3 / 256)


# ----------------------------------------------------------------------------------------------
# The rest of the tree: run, data, train, parallel, log, and the root ``Config``.
# Loading from YAML / ``key=value`` overrides and dumping back live in ``mixlab.configio``.
# ----------------------------------------------------------------------------------------------

SCHEDULES = ("cosine", "constant", "linear")
PRECISIONS = ("auto", "bf16", "fp32")
RESUME_MODES = ("auto", "never")
PARALLEL_STRATEGIES = ("none", "ddp", "fsdp")
PARALLEL_BACKENDS = ("auto", "nccl", "gloo")
AC_MODES = ("none", "full", "selective")
DATA_FORMATS = ("auto", "text", "jsonl", "parquet", "hf")
MODEL_VOCAB_POLICIES = ("fit", "grow", "keep")
WANDB_MODES = ("offline", "online", "disabled")


AC_FORMS = "none, full, selective, selective:N (N blocks) or selective:F (a fraction 0 <= F < 1 of the blocks)"


def ac_selective_arg(mode: str) -> float | None:
    """The N or F of an activation checkpointing mode ``selective:N`` / ``selective:F``; None for a mode
    of ``AC_MODES``. Anything else raises ``ValueError`` naming the allowed forms (``AC_FORMS``)."""
    if mode in AC_MODES:
        return None
    head, _, arg = str(mode).partition(":")
    try:
        value = float(arg) if head == "selective" else -1.0
    except ValueError:
        value = -1.0
    if not (value >= 0 and (value < 1 or value.is_integer())):  # also rejects nan and inf
        raise ValueError(f"activation checkpointing mode {mode!r}; allowed: {AC_FORMS}")
    return value


@dataclass
class RunConfig:
    """Where a run lives and how it is seeded.

    ``dir``: the run directory; empty picks ``runs/<name>-<timestamp>``. ``name``: empty picks the
    model's name. ``seed`` seeds model init and the data order (the loader is a pure function of
    (seed, step, rank, world size)).
    """

    dir: str = ""
    name: str = ""
    seed: int = 0
    device: str = "auto"  # auto (cuda if present, else cpu) | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        _check(
            self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
            f"run.device={self.device!r}; allowed: auto, cpu, cuda, cuda:N, mps",
        )


@dataclass
class DataConfig:
    """Text source, tokenizer, token shards and sequence length.

    ``source``: ``"stdlib"`` (the embedded default corpus: the Python standard library's own
    ``.py`` sources, without test directories) or one or more paths / globs / directories of text
    files, ``.jsonl`` files (the ``text_field`` of each line), ``.parquet`` files (the
    ``text_field`` column) or a ``datasets`` dataset saved with ``save_to_disk``. ``format`` forces
    the kind instead of guessing it from the file name.

    ``tokenizer``: ``"byte"`` (256 bytes + EOS, no files) or a path to a ``tokenizer.json``, a
    SentencePiece ``.model``, a tiktoken ranks file, or a directory holding one of them (as written
    by ``mixlab data tokenizer``).

    Text is tokenised once into memory-mapped shards under ``cache_dir`` (empty:
    ``$MIXLAB_CACHE`` or ``~/.cache/mixlab``) and reused while the source, tokenizer and split are
    unchanged. ``val_fraction`` of the documents (at least ``val_min_tokens`` tokens) are held out.

    ``model_vocab``: ``fit`` sets ``model.vocab_size`` to the tokenizer's vocabulary rounded up to
    ``vocab_multiple`` (byte: 257 -> 320); ``grow`` does so only when the model's is smaller (a
    125m preset keeps its 32000 rows, as in published throughput figures); ``keep`` leaves the
    model's and fails if it is smaller than the tokenizer's.
    """

    source: str | list[str] = "stdlib"
    format: str = "auto"
    text_field: str = "text"
    tokenizer: str = "byte"
    seq_len: int = 256
    val_fraction: float = 0.01
    val_min_tokens: int = 16384
    cache_dir: str = ""
    shard_tokens: int = 1 << 28  # tokens per shard file at most
    model_vocab: str = "fit"  # fit | grow | keep: how model.vocab_size follows the tokenizer (see above)
    vocab_multiple: int = 64  # "fit"/"grow" round the tokenizer's vocabulary up to this multiple

    def __post_init__(self) -> None:
        if isinstance(self.source, (list, tuple)):
            self.source = [str(s) for s in self.source]
            _check(len(self.source) > 0, "data.source must name at least one path (or be 'stdlib')")
        _check(self.format in DATA_FORMATS, f"data.format={self.format!r}; allowed: {', '.join(DATA_FORMATS)}")
        _check(self.seq_len > 0, "data.seq_len must be positive")
        _check(0.0 <= self.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")
        _check(self.val_min_tokens >= 0, "data.val_min_tokens must be >= 0")
        _check(self.shard_tokens > 0, "data.shard_tokens must be positive")
        _check(self.vocab_multiple > 0, "data.vocab_multiple must be positive")
        _check(
            self.model_vocab in MODEL_VOCAB_POLICIES,
            f"data.model_vocab={self.model_vocab!r}; allowed: {', '.join(MODEL_VOCAB_POLICIES)}",
        )

    @property
    def sources(self) -> list[str]:
        """``source`` as a list."""
        return list(self.source) if isinstance(self.source, list) else [self.source]


@dataclass
class TrainConfig:
    """The optimisation recipe.

    ``batch_size`` is the GLOBAL batch in sequences (of ``data.seq_len`` tokens) per optimizer
    step, over all ranks; each rank processes ``batch_size / world_size`` of them in micro-batches
    of ``micro_batch_size`` (0: the whole local batch at once), accumulating gradients.
    The learning rate warms up linearly over ``warmup_steps`` to ``lr`` and then follows
    ``schedule`` down to ``lr * min_lr_ratio`` at ``max_steps``.

    ``activation_checkpointing`` recomputes block activations in backward: ``full`` every block,
    ``selective`` every other block (blocks 0, 2, 4, ...: about half the activation memory of
    ``none`` for half the recompute of ``full``), ``selective:N`` N blocks spread over the depth
    (``selective:0.25`` a quarter of them); ``true`` / ``false`` mean ``full`` / ``none``.
    ``keep_states`` goes the other way for the delta-rule layers (DeltaNet, Gated DeltaNet) of blocks that are
    not checkpointed: their chunk states stay allocated from forward to backward instead of being recomputed
    there, one sequential pass less per layer and step for ``(K·V/64 + V)·H`` more values per token and layer
    (about 1 GB per Gated DeltaNet 1.3b layer at 32K tokens; ``mixlab bench train`` decides it by memory), in the
    layers where that pays: key head dims above 128, whose forward is not fused.
    ``compile`` compiles each block with ``torch.compile`` (not the whole model).
    """

    max_steps: int = 120
    batch_size: int = 8
    micro_batch_size: int = 0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    warmup_steps: int = 15
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # <= 0: no clipping (the norm is still logged)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU | bf16 | fp32
    activation_checkpointing: str | bool = "none"  # none | full | selective | selective:N; true = full
    keep_states: bool = False  # delta-rule layers keep their chunk states for backward (faster, more memory)
    compile: bool = False
    log_every: int = 1
    eval_every: int = 60  # 0: only at the end
    eval_batches: int = 8
    save_every: int = 60  # 0: only at the end
    keep_last: int = 3  # checkpoints kept (the newest ones); 0 keeps all
    save_final: bool = True  # checkpoint the last step (False: benchmarks that need no resume point)
    resume: str = "auto"  # auto (newest complete checkpoint of run.dir, if any) | never | a checkpoint dir
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    export: bool = True  # write config.json + model.safetensors to the run dir at the end

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        _check(self.max_steps > 0, "train.max_steps must be positive")
        _check(self.batch_size > 0, "train.batch_size must be positive")
        _check(self.micro_batch_size >= 0, "train.micro_batch_size must be >= 0 (0: no accumulation)")
        _check(self.lr > 0, "train.lr must be positive")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]")
        _check(self.schedule in SCHEDULES, f"train.schedule={self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        _check(self.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        _check(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas must be two values in [0, 1)")
        _check(self.precision in PRECISIONS, f"train.precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if isinstance(self.activation_checkpointing, bool):
            self.activation_checkpointing = "full" if self.activation_checkpointing else "none"
        try:
            ac_selective_arg(self.activation_checkpointing)
        except ValueError:
            raise ConfigError(
                f"train.activation_checkpointing={self.activation_checkpointing!r}; allowed: {AC_FORMS}"
            ) from None
        _check(self.log_every > 0, "train.log_every must be positive")
        _check(self.eval_every >= 0 and self.save_every >= 0, "train.eval_every / train.save_every must be >= 0")
        _check(self.eval_batches > 0, "train.eval_batches must be positive")
        _check(self.keep_last >= 0, "train.keep_last must be >= 0")
        _check(self.max_bad_steps > 0, "train.max_bad_steps must be positive")
        _check(bool(self.resume), "train.resume must be 'auto', 'never' or a checkpoint directory")


@dataclass
class ParallelConfig:
    """Multi-process training (``mixlab.train.distributed`` / ``mixlab.train.parallel``).

    ``strategy``: ``none`` (one process), ``ddp`` (replicated model, gradients all-reduced once
    per optimizer step) or ``fsdp`` (FSDP2 ``fully_shard`` per block and the root; bf16 parameters
    with float32 gradient reduction when training in bf16 on CUDA, float32 otherwise). Launch
    ``ddp`` / ``fsdp`` with ``torchrun`` (or ``srun``, one task per GPU); started as a plain
    process they run as a group of one.

    ``backend``: ``auto`` is NCCL on CUDA and gloo on the CPU. ``timeout_s`` bounds every
    collective (``init_process_group(timeout=...)``) and every training step: a rank that waits
    longer ends with an error naming the rank, the step and what to check. ``io_timeout_s``
    bounds host-side waits instead: token-shard preparation and checkpoint writes and reads.
    ``fsdp_reshard_after_forward``: free the gathered parameters after each block's forward
    (ZeRO-3; False keeps them until backward: ZeRO-2-like, faster, more memory).
    """

    strategy: str = "none"
    backend: str = "auto"
    timeout_s: float = 600.0
    io_timeout_s: float = 3600.0
    fsdp_reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        _check(
            self.strategy in PARALLEL_STRATEGIES,
            f"parallel.strategy={self.strategy!r}; allowed: {', '.join(PARALLEL_STRATEGIES)}",
        )
        _check(
            self.backend in PARALLEL_BACKENDS,
            f"parallel.backend={self.backend!r}; allowed: {', '.join(PARALLEL_BACKENDS)}",
        )
        _check(self.timeout_s > 0, "parallel.timeout_s must be positive (seconds)")
        _check(self.io_timeout_s > 0, "parallel.io_timeout_s must be positive (seconds)")


@dataclass
class LogConfig:
    """Metric sinks. ``metrics.jsonl`` in the run directory is always written."""

    progress: bool = True  # tqdm progress bar
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "mixlab"
    wandb_mode: str = "offline"
    peak_tflops: float = 0.0  # for MFU; 0: look the device up (H100/H200/A100 bf16 dense), else no MFU

    def __post_init__(self) -> None:
        _check(self.wandb_mode in WANDB_MODES, f"log.wandb_mode={self.wandb_mode!r}; allowed: {', '.join(WANDB_MODES)}")
        _check(self.peak_tflops >= 0, "log.peak_tflops must be >= 0")


TASKS = ("text", "mqar", "selective_copying")


@dataclass
class SyntheticConfig:
    """Settings of the synthetic tasks that ``task=mqar`` / ``task=selective_copying`` train on
    instead of the text corpus (``mixlab.data.synthetic``). The sequence length is
    ``data.seq_len``; the model's vocabulary follows ``vocab_size`` as ``data.model_vocab`` says.
    """

    vocab_size: int = 8192
    num_kv_pairs: int = 16  # mqar: key-value pairs per sequence
    power_a: float = 0.01  # mqar: query gaps drawn with p(g) ∝ (g + 1)^(a - 1)
    random_non_queries: bool = True  # mqar: blanks hold random tokens (else 0)
    num_tokens: int = 16  # selective_copying: tokens to copy
    eval_examples: int = 1000  # held-out sequences (val loss), a stream training never draws
    train_examples: int = 0  # > 0: train for epochs on a fixed set of this many sequences (Zoology); 0: fresh batches

    def __post_init__(self) -> None:
        _check(self.vocab_size >= 3, "synthetic.vocab_size must be >= 3")
        _check(self.num_kv_pairs > 0, "synthetic.num_kv_pairs must be positive")
        _check(self.power_a > 0, "synthetic.power_a must be positive")
        _check(self.num_tokens > 0, "synthetic.num_tokens must be positive")
        _check(self.eval_examples > 0, "synthetic.eval_examples must be positive")
        _check(self.train_examples >= 0, "synthetic.train_examples must be >= 0 (0: a fresh batch every step)")


@dataclass
class Config:
    """The root of the tree: everything ``mixlab train`` needs.

    ``Config()`` uses ``ModelConfig()``'s defaults; the command line and ``mixlab.configio`` start
    from the ``gated_deltanet-tiny`` preset instead (``model=<preset>`` picks another).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    log: LogConfig = field(default_factory=LogConfig)
    task: str = "text"  # text (data.source) | mqar | selective_copying (synthetic.*)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        _check(self.task in TASKS, f"task={self.task!r}; allowed: {', '.join(TASKS)}")
        _check(
            self.train.micro_batch_size == 0 or self.train.batch_size % self.train.micro_batch_size == 0,
            f"train.batch_size={self.train.batch_size} must be a multiple of "
            f"train.micro_batch_size={self.train.micro_batch_size}",
        )
