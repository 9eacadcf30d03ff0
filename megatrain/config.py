"""Structured configs: the schema every Hydra config is validated against.

Every key has a type and a default here. Hydra rejects unknown keys and wrong types
before any process exists; `validate()` checks the relations between keys (batch sizes,
parallel layout, model shape) and derives the values that must never be typed twice.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key and what is allowed."""


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    """Raise a ConfigError naming `key` unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def as_list(key: str, value: Any, kind: type) -> list:
    """One value or a list of them as a list: Hydra reads `key=a` as a scalar and `key=[a,b]` as a list.

    Keys typed Any for this reason are normalised here, in their dataclass, so no caller sees a scalar.
    """
    items = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        ok = isinstance(item, (int, float)) and not isinstance(item, bool) if kind is float else isinstance(item, kind)
        if not ok:
            what = "a number" if kind is float else "a string"
            raise ConfigError(f"{key}={value!r}: each entry must be {what}; give one value or a list, "
                              f"e.g. {key}=x or {key}=[x,y]")
    return [float(i) for i in items] if kind is float else items


@dataclass
class MoEConfig:
    """Mixture of experts (docs/moe.md): experts > 0 replaces the MLP of every block after the first
    `first_dense_layers` with a router, `experts` routed SwiGLU/GELU FFNs and `shared_experts` always-on ones."""

    experts: int = 0  # routed experts per MoE layer; 0: a dense model
    top_k: int = 2  # experts each token is sent to; their weights are normalised to sum to 1
    shared_experts: int = 0  # always-on experts (DeepSeek style), one FFN of shared_experts x expert_ffn_hidden
    expert_ffn_hidden: Optional[int] = None  # None: model.ffn_hidden (its default when null)
    first_dense_layers: int = 0  # the first k blocks keep the dense MLP
    router: str = "softmax"  # softmax | sigmoid (DeepSeek-V3): how router logits become scores
    # Sequence-wise balance loss coef x E x sum_i f_i P_i per sequence (DeepSeek-V3); 0: off
    aux_loss_coef: float = 0.01
    # Auxiliary-loss-free balancing (DeepSeek-V3): after every step each expert's selection bias moves by
    # this much towards the mean load; 0: off
    bias_update_rate: float = 0.0
    z_loss_coef: float = 0.0  # router z-loss coef x mean logsumexp(logits)^2 (ST-MoE); 0: off


@dataclass
class ModelConfig:
    name: str = "tiny"
    # null: the data's tokenizer size, padded up to a multiple of vocab_multiple x parallel.tp
    vocab_size: Optional[int] = 8192
    vocab_multiple: int = 128
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: n_heads (MHA); fewer: GQA; 1: MQA
    ffn_hidden: Optional[int] = None  # None: 4*d (gelu) or 8/3*d rounded to 64 (swiglu)
    max_seq_len: int = 1024
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    position: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    activation: str = "swiglu"  # swiglu | gelu
    bias: bool = False
    tie_embeddings: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    # Tokens whose logits exist at once in the fused LM head + loss (memory: chunk x vocab/tp x 4 B,
    # about twice); null: all tokens of the micro-batch at once. Changes no result.
    loss_chunk_tokens: Optional[int] = 1024
    # auto: fast attention kernels only (flash/cuDNN/efficient SDPA; FlexAttention for document masks on
    # CUDA), checked at start on CUDA; math: allow SDPA's O(s^2) math kernel and a dense document mask.
    attention_backend: str = "auto"
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # read back from a checkpoint's state.json (asdict)
            self.moe = MoEConfig(**self.moe)

    @property
    def expert_ffn_dim(self) -> int:
        return self.moe.expert_ffn_hidden or self.ffn_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe.experts > 0 and layer >= self.moe.first_dense_layers

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.activation == "swiglu":
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallel: each sample's sequence split over cp ranks
    cp_mode: str = "ring"  # ring (K/V passed around the CP ring) | ulysses (DeepSpeed's all-to-all of heads)
    ep: int = 1  # expert parallel: experts split over ep of the data-parallel ranks
    zero_stage: int = 1
    sequence_parallel: bool = False
    # Blocks per pipeline stage, e.g. [5, 6, 5]; None balances training FLOPs (parallel/stages.py).
    pp_split: Optional[List[int]] = None
    # ZeRO gradient reduce bucket in elements; None: d_model^2 (config.reduce_bucket_elements).
    reduce_bucket_size: Optional[int] = None
    # ZeRO-3's parameter gathers: block (a block at a time, at most two gathered: bounded at any size) or model
    # (this rank's whole shard of the model in one gather per micro-batch, held through its backward: the fewest
    # collectives, for a model whose gathered copy fits; engine/deepspeed_config.py, docs/plan.md).
    zero3_gather: str = "block"


@dataclass
class CooldownRuleConfig:
    """train.cooldown_rule: cooldown branches at multiples of a tokens-per-parameter ratio, e.g. 0.5x/1x/2x/4x
    of Chinchilla's 20: each branch trains D = multiple x tokens_per_param x N tokens (docs/scaling.md)."""

    tokens_per_param: Optional[float] = None  # None: no rule (train.cooldowns alone)
    multiples: Any = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    params: str = "total"  # the N of the rule: total | non_embedding parameters

    def __post_init__(self) -> None:
        self.multiples = as_list("train.cooldown_rule.multiples", self.multiples, float)

    def tokens(self, n_params: int) -> list[float]:
        """The branches' token counts for a model of `n_params` (its `params` count); [] without a rule."""
        return [] if self.tokens_per_param is None else [m * self.tokens_per_param * n_params for m in self.multiples]


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: Optional[int] = None  # None: micro_batch_size x DP (no accumulation)
    seq_len: int = 256
    precision: str = "bf16"  # bf16 | fp32 | auto (bf16 on CUDA and on CPUs with native bf16, else fp32)
    # Under bf16: the dtype gradients are accumulated over micro-batches and reduced over DP in.
    # fp32 (Megatron's and torchtitan's default) or bf16 (half the gradient memory and DP traffic, lossy).
    grad_reduce_dtype: str = "fp32"  # fp32 | bf16
    seed: int = 1234
    activation_checkpointing: str = "none"  # none | full | selective
    grad_clip: float = 1.0
    log_interval: int = 1
    # Steps between polls of the preemption flag (a host-side all-reduce over gloo; it never waits for a GPU)
    signal_check_interval: int = 1
    eval_interval: int = 50  # 0: no eval
    eval_steps: int = 10
    save_interval: int = 0  # 0: save only at the end
    keep_last: int = 3
    portable_every: int = 1  # write the portable copy every k-th periodic save (always at the end)
    resume: str = "auto"  # auto | none | <checkpoint path>
    init_from: Optional[str] = None  # a Hugging Face directory (Llama / GPT-2) to start from; resume wins
    # optim.schedule=wsd: token counts of cooldown branches. The run saves a stable-phase checkpoint
    # under <run.dir>/cooldowns where each branch forks (docs/scaling.md); the sweep runs the branches.
    cooldowns: Any = field(default_factory=list)
    # ... or given as a rule of the model's size, resolved once its parameters are counted (cooldown_tokens)
    cooldown_rule: CooldownRuleConfig = field(default_factory=CooldownRuleConfig)
    # A cooldown branch: the checkpoint it forks from (its own checkpoints win, as train.resume=auto)
    fork_from: Optional[str] = None
    compile: bool = False
    profile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    # Before the engine is built: the planner's peak per rank against the memory free per rank.
    # refuse: exit 2 naming the shortfall and layouts that fit | warn: log it and go on | off
    memory_check: str = "refuse"
    # Divergence (engine/divergence.py), checked at log and save steps: a non-finite loss, grad norm or
    # weight, or a logged loss over spike_factor x the mean of the last spike_window logged losses (0: off).
    # stop: exit 65 naming the step and the last good checkpoint | rollback: reload that checkpoint, skip
    # the diverged span's batches and go on, at most max_rollbacks times (then stop)
    spike_factor: float = 10.0
    spike_window: int = 10
    on_divergence: str = "stop"  # stop | rollback
    max_rollbacks: int = 3
    sample_tokens: int = 0  # >0: print a sample of this many tokens at the end
    sample_prompt: str = "The"

    def __post_init__(self) -> None:
        self.cooldowns = as_list("train.cooldowns", self.cooldowns, float)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | linear | constant | wsd (warmup, stable at lr, linear decay to min_lr)
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps decays (cooldown branches fork before it)
    # When a run resumes with another train.steps: keep the saved schedule (and hold its final lr past
    # its end) or stretch it over the new length (the lr then jumps)
    resume_schedule: str = "keep"  # keep | stretch

    def stable_steps(self, total_steps: int) -> int:
        """wsd: steps before the decay of a `total_steps` run; any longer run is identical up to here,
        so a cooldown branch of `total_steps` forks from the stable run's checkpoint at this step."""
        return total_steps - round(self.decay_fraction * total_steps)


@dataclass
class DataConfig:
    path: str = "data/demo"  # a directory written by launcher.prepare
    # Several prepared datasets mixed by weight: ["data/a:0.7", "data/b:0.3"]; overrides path.
    blend: List[str] = field(default_factory=list)
    # Trailing documents of every shard held out for eval (whole documents, at least this fraction).
    valid_fraction: float = 0.01
    valid_path: Optional[str] = None  # a separate prepared set for eval; then nothing is carved
    document_mask: bool = False  # no attention across documents packed in one window
    # Shards hashed again at every start although unchanged since a passed check (size + mtime), so a shard
    # altered with its mtime restored is caught within about 1/verify_fraction starts; 1: all, 0: none.
    verify_fraction: float = 0.02
    # Training batches built ahead in a background thread while the step runs (pinned memory on CUDA); 0: none;
    # null: 2 on CUDA, 0 on CPU (where the thread competes with the step for the cores).
    prefetch: Optional[int] = None


@dataclass
class TokenizerConfig:
    path: Optional[str] = None  # an existing tokenizer.json, or a directory with one (or vocab.json+merges.txt)
    vocab_size: int = 8192
    min_frequency: int = 2
    train_bytes: int = 0  # train on the first N bytes of text only; 0: all of the input
    eod_token: str = "<|endoftext|>"  # appended to every document
    bos_token: Optional[str] = None  # when set, prepended to every document
    pad_token: Optional[str] = None


@dataclass
class PrepareConfig:
    # Files, directories or globs; a single string or a list ([a.txt,b.txt]), hence Any.
    input: Any = field(default_factory=list)
    format: str = "text"  # text | jsonl | parquet, or a HF `datasets` builder: json | csv | arrow
    text_field: str = "text"
    text_unit: str = "file"  # format=text: one document per file | paragraph | line
    output: str = "data/prepared"
    shard_tokens: int = 50_000_000  # upper bound on tokens per shard
    num_proc: int = 0  # tokenizer threads; 0: all cores
    on_bad_file: str = "fail"  # fail | skip (a non-UTF-8 file or a bad jsonl record is skipped and counted)


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"  # online | offline | disabled
    wandb_project: str = "megatrain"
    wandb_entity: Optional[str] = None
    progress: bool = True


@dataclass
class ObserveConfig:
    # Peak FLOP/s per device for MFU; None: the datasheet table (megatrain/hardware.py) for a known GPU,
    # and no MFU on a CPU or an unknown device
    peak_tflops: Optional[float] = None


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: Optional[str] = None


@dataclass
class PlanConfig:
    gpu: str = "H100"
    gpu_memory_gb: float = 80.0
    num_gpus: Optional[int] = None  # the world size; None: tp x pp (one model replica, DP = 1)
    mfu: float = 0.4
    search: bool = False
    peak_tflops: Optional[float] = None  # None: the datasheet peak of plan.gpu at train.precision
    overhead_gb: float = 2.0  # per GPU: CUDA context, NCCL communicators, allocator slack
    intra_node_gbps: float = 400.0  # GB/s per GPU inside a node (NVLink); TP and small DP groups
    inter_node_gbps: float = 50.0  # GB/s per GPU across nodes (e.g. 400 Gb/s InfiniBand)
    gpus_per_node: int = 8
    top: int = 10  # layouts printed by plan.search=true


@dataclass
class FitConfig:
    # Run/sweep directories, CSV files, globs or wandb:<entity/project>: one, or a list ([a,b]), hence Any.
    input: Any = field(default_factory=list)
    # 1 | 2 | 3 | all (loss laws) | hparams (learning-rate and batch laws) | data (data-constrained law, R_D*)
    approach: str = "all"
    output: str = "scaling"
    budget: Optional[float] = None
    # non_embedding | total | active_non_embedding | active_total: the N of every fit, of C = 6ND and of the
    # sweep's sizes (active: the parameters a token uses, for mixtures of experts)
    params: str = "non_embedding"
    # 6nd: C = 6 N D; measured: C = each run's training FLOPs (attention and lm head included, flops.py)
    compute: str = "6nd"
    bootstrap: int = 100  # resamples for the confidence intervals; 0: none
    loss: str = "eval"  # eval | train: which final loss of a run is fitted
    seed: int = 0

    def __post_init__(self) -> None:
        self.input = as_list("fit.input", self.input, str)
        check_choice("fit.approach", str(self.approach), ("1", "2", "3", "all", "hparams", "data"))
        check_choice("fit.params", self.params, ("non_embedding", "total", "active_non_embedding", "active_total"))
        check_choice("fit.compute", self.compute, ("6nd", "measured"))
        check_choice("fit.loss", self.loss, ("eval", "train"))


@dataclass
class SweepConfig:
    """An IsoFLOP sweep: for every budget, model sizes in [min_params, max_params] (see docs/scaling.md)."""

    budgets: Any = field(default_factory=list)  # compute budgets C = 6ND in FLOPs: one, or a list
    min_params: float = 1e5
    max_params: float = 1e7
    sizes: int = 5  # model shapes, log-spaced between min_params and max_params
    head_dim: int = 64
    aspect: float = 64.0  # d_model / n_layers of the shape rule
    min_tokens_per_param: float = 1.0  # points below (too few tokens) or above the max are dropped
    max_tokens_per_param: float = 1000.0
    dir: str = "runs/sweep"  # point configs, runs/<point>, fit/ and command.sh go here
    launch: bool = False  # run the multirun now instead of only writing its command
    budget: Optional[float] = None  # set on each run of a sweep: the budget it belongs to
    # Learning-rate and batch laws (docs/scaling.md): [coefficient, exponent] of eta = a C^b and of
    # B = c C^d (B in tokens per step); [] = optim.lr and the global batch. No published law is a default.
    lr_law: Any = field(default_factory=list)
    batch_law: Any = field(default_factory=list)
    # Each point is run at every lr factor x batch factor of its centre (a grid per budget for the laws).
    lr_factors: Any = field(default_factory=lambda: [1.0])
    batch_factors: Any = field(default_factory=lambda: [1.0])
    tokens_per_param: Optional[float] = None  # set: one shape per budget, the one closest to this D/N
    # One stable run per shape (largest budget), the other budgets as cooldown branches of it (optim.schedule=wsd)
    wsd: bool = False
    # > 0 (with launch=true): after the sweep, fit it, train the predicted optimum at verify x the largest
    # budget and report predicted against measured loss (<dir>/verify.json); 4-10 tests an extrapolation
    verify: float = 0.0

    def __post_init__(self) -> None:
        self.budgets = as_list("sweep.budgets", self.budgets, float)
        for key in ("lr_law", "batch_law"):
            law = as_list(f"sweep.{key}", getattr(self, key), float)
            if law and (len(law) != 2 or law[0] <= 0):
                raise ConfigError(f"sweep.{key}={law}: give [coefficient, exponent] with coefficient > 0, "
                                  f"e.g. sweep.{key}=[0.3,-0.125], or [] for none")
            setattr(self, key, law)
        for key in ("lr_factors", "batch_factors"):
            factors = as_list(f"sweep.{key}", getattr(self, key), float)
            if not factors or min(factors) <= 0:
                raise ConfigError(f"sweep.{key}={factors}: give one or more positive factors, e.g. [0.5,1,2]")
            setattr(self, key, factors)
        if self.verify < 0:
            raise ConfigError(f"sweep.verify={self.verify}: a multiple of the largest budget (e.g. 4), or 0 for none")
        if self.tokens_per_param is not None and self.tokens_per_param <= 0:
            raise ConfigError(f"sweep.tokens_per_param={self.tokens_per_param} must be positive (or null)")


@dataclass
class ExportConfig:
    output: str = "export"
    checkpoint: Optional[str] = None  # None: the latest checkpoint of run.dir
    dtype: str = "float32"  # float32 | bfloat16 | float16: the weights' dtype in the exported files
    overwrite: bool = False  # write into a non-empty export.output (its files of the same names are replaced)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    observe: ObserveConfig = field(default_factory=ObserveConfig)
    run: RunConfig = field(default_factory=RunConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def grad_reduce_dtype(cfg: Config) -> str:
    """fp32 | bf16: what gradients are accumulated and reduced in (always fp32 when training in fp32)."""
    return cfg.train.grad_reduce_dtype if cfg.train.precision == "bf16" else "fp32"


def reduce_bucket_elements(cfg: Config) -> int:
    """ZeRO's gradient bucket (elements): parallel.reduce_bucket_size, or d_model^2 (the rule of HF transformers'
    DeepSpeed "auto" values; 16.8M for d 4096) instead of DeepSpeed's 5e8: buckets fill and are reduced while
    backward still runs, and the bucket left for the end of backward is small."""
    return cfg.parallel.reduce_bucket_size or cfg.model.d_model ** 2


def register_configs() -> None:
    ConfigStore.instance().store(name="schema", node=Config)


@dataclass(frozen=True)
class Layout:
    """How the world is split and the batch that follows from it: derived once by `validate`, never typed.

    World = PP x DP x CP x TP, TP innermost; EP is carved out of DP. The mesh (parallel/mesh.py)
    builds its process groups from it, the planner reports it and every checkpoint records it.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    cp_mode: str = "ring"
    ep: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    grad_accum: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp

    def record(self) -> dict[str, Any]:
        """The layout as checkpoints and summaries store it (derived sizes included, for readers)."""
        return {**asdict(self), "world": self.world, "global_batch_size": self.global_batch_size}


def config_warnings(cfg: Config) -> list[str]:
    """What a valid config may not mean what was asked: the run goes on, the message says why it may not."""
    out = []
    optim, steps = cfg.optim, cfg.train.steps
    if optim.warmup_steps > steps:
        out.append(f"optim.warmup_steps={optim.warmup_steps} is more than train.steps={steps}: the run ends during "
                   f"warmup, before the learning rate reaches optim.lr={optim.lr:g}")
    return out


def padded_vocab_size(tokenizer_vocab: int, multiple: int, tp: int) -> int:
    """The smallest multiple of `multiple` x `tp` that holds every token id."""
    step = multiple * tp
    return -(-tokenizer_vocab // step) * step


def to_config(cfg: DictConfig | Config) -> Config:
    """A typed Config object from a Hydra DictConfig (or pass one through)."""
    if isinstance(cfg, Config):
        return cfg
    return OmegaConf.to_object(cfg)


def validate_model(model: ModelConfig, tp: int = 1) -> None:
    check_choice("model.norm", model.norm, ("rmsnorm", "layernorm"))
    check_choice("model.position", model.position, ("rope", "learned"))
    check_choice("model.activation", model.activation, ("swiglu", "gelu"))
    check_choice("model.attention_backend", model.attention_backend, ("auto", "math"))
    for key in ("vocab_size", "vocab_multiple", "d_model", "n_layers", "n_heads", "max_seq_len", "loss_chunk_tokens"):
        # vocab_size null: sized from the data; loss_chunk_tokens null: one chunk
        if getattr(model, key) is not None and getattr(model, key) <= 0:
            raise ConfigError(f"model.{key}={getattr(model, key)} must be positive")
    if model.d_model % model.n_heads:
        raise ConfigError(f"model.d_model={model.d_model} must be divisible by model.n_heads={model.n_heads}")
    if model.position == "rope" and model.head_dim % 2:
        raise ConfigError(f"RoPE needs an even head dim; d_model/n_heads={model.head_dim}")
    if model.n_heads % model.kv_heads:
        raise ConfigError(f"model.n_heads={model.n_heads} must be divisible by model.n_kv_heads={model.kv_heads}")
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError(f"model.dropout={model.dropout} must be in [0, 1)")
    validate_moe(model)
    for key, value in (("model.n_heads", model.n_heads), ("model.n_kv_heads", model.kv_heads),
                       ("model.ffn_hidden", model.ffn_dim), ("model.vocab_size", model.vocab_size or 0)):
        if value % tp:
            raise ConfigError(f"{key}={value} is not divisible by parallel.tp={tp}; "
                              f"tensor parallelism splits it evenly across ranks")


def validate_moe(model: ModelConfig) -> None:
    moe = model.moe
    if moe.experts < 0:
        raise ConfigError(f"model.moe.experts={moe.experts} must be >= 0 (0: a dense model)")
    if moe.experts == 0:
        return
    check_choice("model.moe.router", moe.router, ("softmax", "sigmoid"))
    if not 1 <= moe.top_k <= moe.experts:
        raise ConfigError(f"model.moe.top_k={moe.top_k} must be in [1, model.moe.experts={moe.experts}]")
    if not 0 <= moe.first_dense_layers < model.n_layers:
        raise ConfigError(f"model.moe.first_dense_layers={moe.first_dense_layers} must be in [0, "
                          f"model.n_layers={model.n_layers}): at least one block must be a MoE block")
    if moe.shared_experts < 0 or (moe.expert_ffn_hidden is not None and moe.expert_ffn_hidden <= 0):
        raise ConfigError(f"model.moe.shared_experts={moe.shared_experts} must be >= 0 and "
                          f"model.moe.expert_ffn_hidden={moe.expert_ffn_hidden} positive (or null)")
    for key in ("aux_loss_coef", "bias_update_rate", "z_loss_coef"):
        if not (math.isfinite(getattr(moe, key)) and getattr(moe, key) >= 0):
            raise ConfigError(f"model.moe.{key}={getattr(moe, key)} must be a finite number >= 0 (0: off)")


def validate_expert_parallel(model: ModelConfig, par: ParallelConfig) -> None:
    """What expert parallelism composes with (docs/moe.md says why)."""
    experts = model.moe.experts
    if par.ep > 1 and experts == 0:
        raise ConfigError(f"parallel.ep={par.ep} needs a mixture-of-experts model (model.moe.experts > 0, "
                          "e.g. model=tiny-moe); use parallel.ep=1 for a dense model")
    if par.ep > 1 and experts % par.ep:
        raise ConfigError(f"parallel.ep={par.ep} must divide model.moe.experts={experts}: each EP rank computes "
                          "an equal share of the experts")
    if experts and par.pp > 1:
        raise ConfigError(f"parallel.pp={par.pp} with model.moe.experts={experts}: the router losses are not carried "
                          "between pipeline stages in this version; use parallel.pp=1 (TP, DP, EP and ZeRO compose)")
    if experts and par.cp > 1:
        raise ConfigError(f"parallel.cp={par.cp} with model.moe.experts={experts}: the sequence-wise balance loss "
                          "needs whole sequences on a rank; use parallel.cp=1")
    if experts and par.zero_stage == 3:  # measured: the first loss already differs from one process (docs/moe.md)
        raise ConfigError(f"parallel.zero_stage=3 with model.moe.experts={experts}: not verified to compute the "
                          "same model in this version; use parallel.zero_stage=1 or 2 (optimizer states, and "
                          "gradients with 2, sharded over DP)")
    if par.ep > 1 and par.zero_stage == 0:  # DeepSpeed's non-ZeRO checkpoint keeps DP rank 0's weights only
        raise ConfigError(f"parallel.ep={par.ep} with parallel.zero_stage=0: each EP rank holds its own experts, "
                          "which only ZeRO's per-rank checkpoint files keep; use parallel.zero_stage=1 or 2")
    if experts and par.sequence_parallel:
        raise ConfigError(f"parallel.sequence_parallel=true with model.moe.experts={experts}: the sequence-wise "
                          "balance loss needs whole sequences on a rank; use parallel.sequence_parallel=false")


def validate_optim(optim: OptimConfig) -> None:
    if not (math.isfinite(optim.lr) and optim.lr > 0):
        raise ConfigError(f"optim.lr={optim.lr} must be a finite number > 0")
    if not (math.isfinite(optim.min_lr) and optim.min_lr >= 0):
        raise ConfigError(f"optim.min_lr={optim.min_lr} must be a finite number >= 0")
    if optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={optim.warmup_steps} must be >= 0")


def validate_plan(plan: PlanConfig) -> None:
    """The planner's hardware keys: counts and sizes of real GPUs."""
    if plan.num_gpus is not None and plan.num_gpus <= 0:
        raise ConfigError(f"plan.num_gpus={plan.num_gpus} must be positive, or null (parallel.tp x parallel.pp)")
    for key in ("gpu_memory_gb", "gpus_per_node", "top", "intra_node_gbps", "inter_node_gbps"):
        if not getattr(plan, key) > 0:
            raise ConfigError(f"plan.{key}={getattr(plan, key)} must be positive")
    if not 0 < plan.mfu <= 1:
        raise ConfigError(f"plan.mfu={plan.mfu} must be in (0, 1]")


def _check_branch(cfg: Config, tokens: float, entry: str) -> None:
    """A branch's decay must start inside this run's stable phase: it may not be longer than the run."""
    optim, train = cfg.optim, cfg.train
    steps = round(tokens / (train.global_batch_size * train.seq_len))
    if not 1 <= optim.stable_steps(steps) <= optim.stable_steps(train.steps):
        raise ConfigError(f"{entry} {tokens:g} tokens = {steps} steps: its decay must start within "
                          f"the stable phase of this run (steps 1-{optim.stable_steps(train.steps)}), i.e. the "
                          "branch may not be longer than the run")


def _validate_cooldowns(cfg: Config) -> None:
    optim, train, rule = cfg.optim, cfg.train, cfg.train.cooldown_rule
    if not 0.0 < optim.decay_fraction < 1.0:
        raise ConfigError(f"optim.decay_fraction={optim.decay_fraction} must be in (0, 1)")
    ruled = rule.tokens_per_param is not None
    if ruled:
        if not (math.isfinite(rule.tokens_per_param) and rule.tokens_per_param > 0):
            raise ConfigError(f"train.cooldown_rule.tokens_per_param={rule.tokens_per_param} must be a positive "
                              "number (e.g. 20), or null for no rule")
        if not rule.multiples or min(rule.multiples) <= 0:
            raise ConfigError(f"train.cooldown_rule.multiples={rule.multiples}: give one or more positive multiples "
                              "of tokens_per_param, e.g. [0.5,1,2,4]")
        check_choice("train.cooldown_rule.params", rule.params, ("total", "non_embedding"))
        if train.fork_from:  # a branch trains only its own decay; the rule belongs to its stable run
            raise ConfigError("train.cooldown_rule with train.fork_from: a branch forks no branches of its own; "
                              "set train.cooldown_rule.tokens_per_param=null for the branch")
    if (train.cooldowns or train.fork_from or ruled) and optim.schedule != "wsd":
        raise ConfigError(f"train.cooldowns / train.cooldown_rule / train.fork_from need optim.schedule=wsd (got "
                          f"{optim.schedule}): only a warmup-stable-decay run is identical to a shorter one up to "
                          "its decay")
    if train.fork_from and optim.resume_schedule != "stretch":
        raise ConfigError("train.fork_from: a branch decays over its own train.steps; "
                          "set optim.resume_schedule=stretch")
    if (train.cooldowns or ruled) and not train.global_batch_size:
        key = "train.cooldowns" if train.cooldowns else "train.cooldown_rule"
        raise ConfigError(f"{key}: set train.global_batch_size, the tokens per step that turn each "
                          "token count into a fork step")
    for tokens in train.cooldowns:
        _check_branch(cfg, tokens, "train.cooldowns entry")


def cooldown_tokens(cfg: Config, n_params: dict[str, int]) -> list[float]:
    """Token counts of every cooldown branch: train.cooldowns and those of train.cooldown_rule for a model of
    `n_params` ({"total": .., "non_embedding": ..}); a rule's branch longer than the run raises a ConfigError.
    Called once the model is sized (its vocab may come from the data), before any process group."""
    rule = cfg.train.cooldown_rule
    ruled = rule.tokens(n_params[rule.params])
    for multiple, tokens in zip(rule.multiples, ruled):
        _check_branch(cfg, tokens, f"train.cooldown_rule {multiple:g}x {rule.tokens_per_param:g} tokens per "
                                   f"parameter x {n_params[rule.params]:,} {rule.params} parameters =")
    return [*cfg.train.cooldowns, *ruled]


def _validate_context_parallel(cfg: Config) -> None:
    model, par, train = cfg.model, cfg.parallel, cfg.train
    check_choice("parallel.cp_mode", par.cp_mode, ("ring", "ulysses"))
    if par.cp == 1:
        return
    if train.seq_len % (2 * par.cp):
        raise ConfigError(f"train.seq_len={train.seq_len} must be divisible by 2 x parallel.cp = {2 * par.cp}: "
                          "each rank holds two of 2 x cp equal chunks (causal load balance)")
    if par.sequence_parallel and (train.seq_len // par.cp) % par.tp:
        raise ConfigError(f"train.seq_len / parallel.cp = {train.seq_len // par.cp} must be divisible by "
                          f"parallel.tp={par.tp} with sequence parallelism")
    if par.cp_mode == "ulysses":
        for key, heads in (("model.n_heads", model.n_heads), ("model.n_kv_heads", model.kv_heads)):
            if (heads // par.tp) % par.cp:
                raise ConfigError(f"{key}={heads} / parallel.tp={par.tp} is not divisible by parallel.cp={par.cp}: "
                                  "Ulysses splits each rank's heads over CP; use parallel.cp_mode=ring")
    refusals = ((par.pp > 1, f"parallel.pp={par.pp}", "pipeline stages do not carry the CP chunk split"),
                (cfg.data.document_mask, "data.document_mask=true", "the ring's causal blocks take no document mask"),
                (model.dropout > 0, f"model.dropout={model.dropout}", "ring attention has no attention dropout"))
    for refused, what, why in refusals:
        if refused:
            raise ConfigError(f"parallel.cp={par.cp} with {what} is not supported: {why}; use parallel.cp=1")


def validate(cfg: Config, world_size: int) -> Layout:
    """Check every relation between keys for a world of `world_size` ranks; derive the layout.

    The one place that checks lengths, batch sizes and the parallel layout: everything that
    can be known from the config fails here, before any process group exists.
    """
    model, par, train = cfg.model, cfg.parallel, cfg.train
    for key in ("tp", "pp", "cp", "ep"):
        if getattr(par, key) < 1:
            raise ConfigError(f"parallel.{key}={getattr(par, key)} must be >= 1")
    validate_model(model, par.tp)
    _validate_context_parallel(cfg)
    validate_expert_parallel(model, par)
    if par.reduce_bucket_size is not None and par.reduce_bucket_size < 1:
        raise ConfigError(f"parallel.reduce_bucket_size={par.reduce_bucket_size} must be a positive element count "
                          "(or null: d_model^2)")
    check_choice("parallel.zero_stage", par.zero_stage, (0, 1, 2, 3))
    check_choice("parallel.zero3_gather", par.zero3_gather, ("block", "model"))
    if par.zero3_gather == "model" and par.zero_stage != 3:
        raise ConfigError(f"parallel.zero3_gather=model with parallel.zero_stage={par.zero_stage}: it sets how ZeRO-3 "
                          "gathers parameters; ZeRO-0/1/2 hold them whole anyway. Use parallel.zero_stage=3 or "
                          "leave parallel.zero3_gather=block")
    check_choice("train.precision", train.precision, ("bf16", "fp32", "auto"))
    check_choice("train.grad_reduce_dtype", train.grad_reduce_dtype, ("fp32", "bf16"))
    if train.precision == "bf16" and train.grad_reduce_dtype == "fp32" and par.zero_stage == 0:
        raise ConfigError("parallel.zero_stage=0 with train.precision=bf16 and train.grad_reduce_dtype=fp32: DeepSpeed "
                          "0.19 accumulates gradients in fp32 only with ZeRO; use parallel.zero_stage=1 (fp32 "
                          "master weights and gradients) or train.grad_reduce_dtype=bf16")
    check_choice("train.activation_checkpointing", train.activation_checkpointing, ("none", "full", "selective"))
    check_choice("train.device", train.device, ("auto", "cpu", "cuda"))
    check_choice("train.memory_check", train.memory_check, ("refuse", "warn", "off"))
    check_choice("train.on_divergence", train.on_divergence, ("stop", "rollback"))
    if not (math.isfinite(train.spike_factor) and (train.spike_factor == 0 or train.spike_factor > 1)):
        raise ConfigError(f"train.spike_factor={train.spike_factor} must be 0 (off) or a finite number > 1")
    for key in ("spike_window", "max_rollbacks"):
        if getattr(train, key) < (1 if key == "spike_window" else 0):
            raise ConfigError(f"train.{key}={getattr(train, key)} must be >= {1 if key == 'spike_window' else 0}")
    check_choice("optim.schedule", cfg.optim.schedule, ("cosine", "linear", "constant", "wsd"))
    _validate_cooldowns(cfg)
    check_choice("optim.resume_schedule", cfg.optim.resume_schedule, ("keep", "stretch"))
    check_choice("logging.wandb_mode", cfg.logging.wandb_mode, ("online", "offline", "disabled"))
    model_parallel = par.tp * par.pp * par.cp
    if world_size % model_parallel:
        dims = [key for key in ("tp", "pp", "cp") if key != "cp" or par.cp > 1]  # cp named only when used
        raise ConfigError(f"world size {world_size} is not divisible by "
                          f"{' x '.join(f'parallel.{key}' for key in dims)} = "
                          f"{' x '.join(str(getattr(par, key)) for key in dims)}; "
                          f"launch a multiple of {model_parallel} processes")
    if par.pp > 1 and par.zero_stage > 1:
        raise ConfigError(f"parallel.zero_stage={par.zero_stage} with parallel.pp={par.pp}: DeepSpeed's pipeline "
                          "engine supports ZeRO-0/1 only; choose parallel.zero_stage=1 (optimizer states "
                          "sharded over DP) or parallel.pp=1 for ZeRO-2/3")
    if par.pp > model.n_layers:
        raise ConfigError(f"parallel.pp={par.pp} exceeds model.n_layers={model.n_layers}; each stage needs a block")
    if par.pp_split is not None and (len(par.pp_split) != par.pp or sum(par.pp_split) != model.n_layers
                                     or min(par.pp_split) < 1):
        raise ConfigError(f"parallel.pp_split={list(par.pp_split)} must list parallel.pp={par.pp} block counts, "
                          f"each >= 1, summing to model.n_layers={model.n_layers}")
    if par.sequence_parallel and par.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
    if par.sequence_parallel and train.seq_len % par.tp:
        raise ConfigError(f"train.seq_len={train.seq_len} must be divisible by parallel.tp={par.tp} "
                          "with sequence parallelism")
    if train.seq_len > model.max_seq_len:
        raise ConfigError(f"train.seq_len={train.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    for key in ("steps", "micro_batch_size", "seq_len", "log_interval", "portable_every", "signal_check_interval"):
        if getattr(train, key) <= 0:
            raise ConfigError(f"train.{key}={getattr(train, key)} must be positive")
    for key in ("eval_interval", "save_interval"):
        if getattr(train, key) < 0:
            raise ConfigError(f"train.{key}={getattr(train, key)} must be >= 0 (0: off)")
    if train.eval_interval and train.eval_steps <= 0:
        raise ConfigError(f"train.eval_steps={train.eval_steps} must be positive when eval is on "
                          f"(train.eval_interval={train.eval_interval}); train.eval_interval=0 turns eval off")
    if train.global_batch_size is not None and train.global_batch_size <= 0:
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} must be positive, or null "
                          "(micro_batch_size x DP)")
    validate_optim(cfg.optim)
    if cfg.observe.peak_tflops is not None and cfg.observe.peak_tflops <= 0:
        raise ConfigError(f"observe.peak_tflops={cfg.observe.peak_tflops} must be positive (TFLOP/s per device)")
    dp = world_size // model_parallel
    if dp % par.ep:
        raise ConfigError(f"parallel.ep={par.ep} must divide the data-parallel size {dp} (world {world_size} / "
                          f"(tp x pp x cp)): expert parallelism is carved out of data parallelism")
    per_step = train.micro_batch_size * dp
    global_batch = train.global_batch_size or per_step
    if global_batch % per_step:
        raise ConfigError(f"train.global_batch_size={global_batch} is not a multiple of "
                          f"train.micro_batch_size x DP = {train.micro_batch_size} x {dp} = {per_step}")
    return Layout(tp=par.tp, pp=par.pp, dp=dp, cp=par.cp, cp_mode=par.cp_mode, ep=par.ep, zero_stage=par.zero_stage,
                  sequence_parallel=par.sequence_parallel, micro_batch_size=train.micro_batch_size,
                  grad_accum=global_batch // per_step)
