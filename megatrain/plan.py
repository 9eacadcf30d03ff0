"""What a config costs per GPU before anything runs: parameters, FLOPs, memory, step time.

No process group, no weights: every figure is arithmetic on the config. Parameter and FLOP
counts come from `megatrain.scaling.flops` (the single source); the memory model follows what
megatrain's model and DeepSpeed 0.19 actually allocate (measured on CPU, see docs/plan.md):

model states per rank, P = parameters on this TP/PP rank, d = DP size (the routed experts: P = this EP
rank's E / ep of them, d = DP / ep, the expert-DP group ZeRO partitions them over)
    bf16: weights 2P (ZeRO-3: /d), fp32 master 4P/d and Adam m, v 8P/d (ZeRO-0: 4P and 8P);
          grads (train.grad_reduce_dtype=fp32, the default) 4P/d at ZeRO-2/3, and at ZeRO-1 the bf16
          grads plus DeepSpeed's BF16_Optimizer's full fp32 copy, 6P; with bf16 reduction 2P (ZeRO-0:
          full; ZeRO-1/2/3 keep only the averaged partition, /d).
          ZeRO-1 with gradient accumulation keeps every full .grad between micro-batches (width x P).
    fp32: weights 4P (ZeRO-3: /d), grads 4P (/d as above), DeepSpeed's ZeRO optimizers keep
          a separate fp32 master copy 4P/d; Adam m, v 8P/d. ZeRO-0 is plain AdamW: 4+4+8.
peak: model states and buffers plus activations, less what exists only once backward has freed them
    (Memory.after_backward), or everything but the activations after backward, whichever is larger.
activations: what autograd saves per token per layer in megatrain's blocks (fp32 norms,
    SDPA with flash-style saving, so no seq x seq scores), the layout of Korthikanti et al. 2022.
    Under context parallelism (parallel.cp) each rank holds seq/cp tokens of every sample, and ZeRO
    partitions over DP x CP (parallel/context.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from megatrain import hardware
from megatrain.config import (
    Config,
    ConfigError,
    Layout,
    ModelConfig,
    grad_reduce_dtype,
    padded_vocab_size,
    reduce_bucket_elements,
    to_config,
    validate,
    validate_plan,
)
from megatrain.data.errors import DataError
from megatrain.data.manifest import vocab_from_data
from megatrain.parallel.stages import bubble_fraction, stage_layers
from megatrain.scaling.flops import ParamCounts, expert_params, param_counts, training_flops_per_token

GB = 1e9
CHECKPOINTING = ("none", "selective", "full")
BF16_OPTIMIZER_BUCKET = 500_000_000  # DeepSpeed engine.py MEMORY_OPT_ALLREDUCE_SIZE (elements)
# plan.search tries context parallelism only while each rank keeps at least this many tokens of a sample:
# below it the ring's K/V traffic outgrows the attention it hides behind (Megatron-Core's guidance: CP for 8k+).
MIN_CP_TOKENS = 4096
# A CPU rank's overhead (plan.overhead_gb on a CPU: no CUDA context): a DeepSpeed engine of a 1-block,
# 16-wide model grows the peak RSS by 26.5-26.9 MiB per rank over 2 steps here (ZeRO-1 and 3, bf16, 2026-12-04;
# 28.5-29.8 MiB with glibc's mmap threshold at 1 MiB, 72 MiB before DeepSpeed's Muon stopped loading inductor).
CPU_OVERHEAD_GB = 0.028


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU of one pipeline stage."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    comm_buffers: float
    overhead: float
    # Of gradients and comm_buffers, the bytes that exist only once backward has freed the activations
    # (DeepSpeed's BF16_Optimizer: bf16 .grads filled as activations go, then its flat all-reduce buffers).
    after_backward: float = 0.0

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        """The peak: in backward (activations held) or after it (every gradient and buffer), plus the overhead."""
        buffers = self.model_states + self.comm_buffers
        return max(buffers + self.activations - self.after_backward, buffers) + self.overhead


@dataclass(frozen=True)
class Plan:
    layout: Layout
    checkpointing: str
    params: ParamCounts
    stage_blocks: tuple[int, ...]  # blocks per pipeline stage, as the runtime cuts them
    stage_params: tuple[int, ...]  # parameters per TP rank of each stage, before ZeRO partitioning
    params_per_rank: int  # of the largest stage
    flops_per_token: float  # model FLOPs (6N + attention), recomputation not counted
    memory: Memory  # of the most loaded rank: the first or the last pipeline stage
    first_last_memory: tuple[Memory, Memory]  # first and last pipeline stage (the same one without PP)
    gpu_memory: float  # bytes
    step_time_s: float
    tokens_per_s: float
    mfu: float  # achieved model FLOPs / peak, after bubbles, recomputation and exposed comms

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.gpu_memory


# ---------------------------------------------------------------- parameters per rank


def _block_and_norm(model: ModelConfig) -> tuple[int, int]:
    """(parameters of one block, of one norm); derived from flops.param_counts, never recounted."""
    norm = param_counts(replace(model, n_layers=0)).non_embedding  # the final norm alone
    return param_counts(replace(model, n_layers=1)).non_embedding - norm, norm


def _routed_params(model: ModelConfig) -> int:
    """The routed experts of one MoE block (without the router): what EP splits (model/moe.py)."""
    return expert_params(model) - model.moe.experts * model.d_model


def _block_params_per_rank(model: ModelConfig, tp: int, layer: int = 0, ep: int = 1) -> int:
    if model.is_moe_layer(layer):  # router replicated, routed experts split over EP, both replicated over TP;
        moe = model.moe  # the rest as a dense block whose MLP is the shared experts' (TP-sharded)
        dense = replace(model, ffn_hidden=moe.shared_experts * model.expert_ffn_dim, moe=replace(moe, experts=0))
        return _block_params_per_rank(dense, tp) + expert_params(model) - _routed_params(model) \
            + _routed_params(model) // ep
    block, norm = _block_and_norm(model)
    replicated = 2 * norm + (2 * model.d_model if model.bias else 0)  # norms and row-parallel biases
    return (block - replicated) // tp + replicated


def blocks_per_stage(cfg: Config) -> list[int]:
    """Blocks per pipeline stage, as the runtime cuts them (parallel/stages.py)."""
    return stage_layers(cfg.model, cfg.parallel.pp, cfg.train.seq_len, cfg.parallel.pp_split)


def _stage_layers(cfg: Config) -> list[range]:
    counts = blocks_per_stage(cfg)
    return [range(sum(counts[:i]), sum(counts[:i + 1])) for i in range(len(counts))]


def stage_params(cfg: Config) -> list[int]:
    """Parameters held by one TP (and EP) rank of each pipeline stage (embedding on the first, head on the last)."""
    model, tp = cfg.model, cfg.parallel.tp
    _, norm = _block_and_norm(model)
    table = model.vocab_size * model.d_model // tp
    embed = table + (model.max_seq_len * model.d_model if model.position == "learned" else 0)
    head = norm + (0 if model.tie_embeddings else table)
    out = [sum(_block_params_per_rank(model, tp, layer, cfg.parallel.ep) for layer in layers)
           for layers in _stage_layers(cfg)]
    out[0] += embed
    out[-1] += head
    if model.tie_embeddings and len(out) > 1:
        out[-1] += table  # the last stage keeps its own copy of the tied table
    return out


def stage_expert_params(cfg: Config) -> list[int]:
    """Of stage_params, the routed experts: E / ep per MoE block, ZeRO-partitioned over expert DP (DP / ep)."""
    return [sum(_routed_params(cfg.model) // cfg.parallel.ep for layer in layers if cfg.model.is_moe_layer(layer))
            for layers in _stage_layers(cfg)]


# ---------------------------------------------------------------- memory


def _model_states(params: int, dp: int, zero: int, precision: str, grad_dtype: str, grad_accum: int = 1
                  ) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes for `params` parameters on one rank."""
    width = 2 if precision == "bf16" else 4
    if zero == 0:  # bf16: DeepSpeed's FP16_Optimizer, fp32 master + Adam; fp32: plain AdamW
        return width * params, width * params, (12 if precision == "bf16" else 8) * params
    weights = width * params / (dp if zero == 3 else 1)
    if precision == "bf16" and grad_dtype == "fp32" and zero == 1:
        # DeepSpeed's BF16_Optimizer: the bf16 gradients and an fp32 copy of all of them, not partitioned
        return weights, 6 * params, 12 * params / dp
    if zero == 1 and grad_accum > 1:
        # ZeRO-1 reduces only at the accumulation boundary: between micro-batches every parameter keeps its
        # full .grad (measured; ZeRO-2 reduces each micro-batch into its partition).
        return weights, width * params, 12 * params / dp
    return weights, (4 if grad_dtype == "fp32" else width) * params / dp, 12 * params / dp


def norm_bytes(model: ModelConfig, a: int, r: float) -> float:
    """Per token, what a norm keeps: its input (a bytes, width r) and fp32 statistics (RMSNorm 1/rms;
    LayerNorm mean, 1/std), of 1/TP of the tokens under SP (r = h/TP); the fp32 copies it computes in are
    transient (model/norms.py)."""
    return a * r + (4 if model.norm == "rmsnorm" else 8) * r / model.d_model


def layer_activation_bytes(model: ModelConfig, tp: int, sp: bool, precision: str, checkpointing: str) -> float:
    """Bytes autograd keeps per token for one block (without checkpointing, or with selective)."""
    # Korthikanti et al.'s symbols: a bytes per activation element, h hidden size, r residual width here.
    a = 2 if precision == "bf16" else 4
    h = model.d_model
    r = h / tp if sp else h  # the residual stream: sequence-sharded under SP
    dq, dkv, f = model.n_heads * model.head_dim / tp, model.kv_heads * model.head_dim / tp, model.ffn_dim / tp
    norm = norm_bytes(model, a, r)
    linear_in = a * r  # the input of q/k/v (and gate/up): under SP the shard, re-gathered in backward
    sdpa = a * (2 * dq + 2 * dkv) + 4 * model.n_heads / tp  # q, k, v, output, fp32 logsumexp
    if checkpointing == "selective":
        # Only the logsumexp goes: SDPA's output is o's saved input and q, k, v are saved anyway,
        # and SDPA never materialises the seq x seq scores that selective recomputation targets.
        sdpa -= 4 * model.n_heads / tp
    attn = norm + linear_in + sdpa
    mlp = norm + linear_in + (4 if model.activation == "swiglu" else 2) * a * f
    dropout = 2 * r if model.dropout > 0 else 0  # bool masks of the two residual dropouts
    return attn + mlp + dropout


def activation_bytes(cfg: Config, micro_batch: int, grad_accum: int, checkpointing: str, stage: int = 0) -> float:
    """Peak activation bytes on pipeline stage `stage` (1F1B: stage i holds min(pp - i, accum) micro batches)."""
    model, par, train = cfg.model, cfg.parallel, cfg.train
    tp, sp, a = par.tp, par.sequence_parallel, (2 if train.precision == "bf16" else 4)
    tokens = micro_batch * train.seq_len // par.cp  # this rank's chunks of each sample
    layer = layer_activation_bytes(model, tp, sp, train.precision, checkpointing)
    layers = blocks_per_stage(cfg)[stage]
    in_flight = min(par.pp - stage, grad_accum)
    moe_layers = sum(model.is_moe_layer(i) for i in range(model.n_layers)) if par.pp == 1 else 0  # PP x MoE: refused
    dispatch = moe_dispatch_bytes(model, a)
    if checkpointing == "full":
        # Each block keeps its input; backward recomputes one block at a time.
        kept = (layers * in_flight * a * (model.d_model / tp if sp else model.d_model) + layer
                + min(moe_layers, 1) * dispatch)
    else:
        kept = layers * in_flight * layer + moe_layers * in_flight * dispatch
    # the last stage: the fused head + loss (under PP its loss runs in DeepSpeed's loss_fn, on whole logits)
    head = sum(head_activation_bytes(model, tp, sp, train.precision, tokens, par.pp > 1, grad_accum)) \
        if stage == par.pp - 1 else 0.0
    return tokens * kept + head


def moe_dispatch_bytes(model: ModelConfig, a: int) -> float:
    """Per token of a MoE layer, on top of its dense terms (whose MLP stands for the shared experts): the
    top_k routed copies kept for backward -- gathered, sent, regrouped, expert output, returned (5 x d) and
    the routed experts' hidden activations (3 x f with SwiGLU, else 2) -- plus fp32 router logits and scores.
    Routed experts are replicated over TP: no 1/tp."""
    k, f = model.moe.top_k, model.expert_ffn_dim
    hidden = 3 if model.activation == "swiglu" else 2
    return k * a * (5 * model.d_model + hidden * f) + 2 * 4 * model.moe.experts


def head_activation_bytes(model: ModelConfig, tp: int, sp: bool, precision: str, tokens: int,
                          whole_logits: bool = False, grad_accum: int = 1) -> tuple[float, float]:
    """(kept for backward, transient at the loss) bytes of the final norm and the fused LM head + loss
    for `tokens` tokens of a micro batch (parallel/cross_entropy.py: gradients made in forward)."""
    a = 2 if precision == "bf16" else 4
    r, vocab = (model.d_model / tp if sp else model.d_model), model.vocab_size / tp
    # The final norm, then the gradients of the head's input (full sequence) and of its weight.
    kept = tokens * (norm_bytes(model, a, r) + a * model.d_model) + a * vocab * model.d_model
    if whole_logits:
        # PP's loss_fn on the last stage: DeepSpeed keeps the logits (a bytes) to backward, the loss their fp32 copy
        # (the softmax), and at backward the gradient is cast from it (bf16: 2 more bytes; fp32: the copy itself).
        # With accumulation a second micro-batch's logits are live at that peak too (tracked tensor lifetimes,
        # 2026-12-04: two bf16 logits buffers at accumulation 2, one at 1; which reference holds it not traced).
        logits = a * (2 if grad_accum > 1 else 1)
        return kept, tokens * (logits + 4 + (2 if a == 2 else 0)) * vocab
    # One chunk's logits at a time: in fp32 (and their bf16 matmul output or gradient beside them).
    chunk = min(tokens, model.loss_chunk_tokens or tokens)
    return kept, chunk * (4 + (2 if a == 2 else 0)) * vocab


def uses_bf16_optimizer(cfg: Config, zero: int) -> bool:
    """ZeRO-1 with bf16 weights and fp32 gradient reduction: DeepSpeed swaps in its BF16_Optimizer."""
    return zero == 1 and cfg.train.precision == "bf16" and grad_reduce_dtype(cfg) == "fp32"


def after_backward_bytes(cfg: Config, params: int, layout: Layout) -> float:
    """Bytes of the gradients and buffers that never sit beside the activations (Memory.after_backward).

    BF16_Optimizer keeps the fp32 gradients all along, but the bf16 .grads fill as backward frees the activations
    and it all-reduces after backward, in flat buffers (DeepSpeed 0.19 bf16_optimizer.py, engine.py). Measured with
    every tensor's lifetime tracked (2 gloo ranks, 2026-12-04): at the peak, in backward, neither is held.
    With accumulation the bf16 .grads of the micro-batches before are held through the next backward."""
    if not uses_bf16_optimizer(cfg, layout.zero_stage):
        return 0.0
    lp_grads = 2 * params if layout.grad_accum == 1 else 0
    return lp_grads + comm_buffer_bytes(cfg, params, 0, layout.zero_stage)


def comm_buffer_bytes(cfg: Config, params: int, block_params: int, zero: int) -> float:
    """Gradient buckets (ZeRO-1/2/3) and ZeRO-3's gathered parameters."""
    width = 4 if grad_reduce_dtype(cfg) == "fp32" else 2
    if zero == 0:
        return 0.0
    if uses_bf16_optimizer(cfg, zero):
        # BF16_Optimizer: the engine all-reduces the fp32 gradients after backward in flat buffers of its
        # own MEMORY_OPT_ALLREDUCE_SIZE (5e8 elements, DeepSpeed 0.19 engine.py), whatever reduce_bucket_size says.
        return min(params, BF16_OPTIMIZER_BUCKET) * width
    # Gradients sit in reduce buckets (up to reduce_bucket_size elements) until they are reduced;
    # sized here by the gradients that fill them. ZeRO-1/2 with overlap_comm keep two (one filling while
    # the other is reduced; DeepSpeed 0.19 stage_1_and_2.py).
    bucket = min(params, reduce_bucket_elements(cfg)) * width * (2 if zero in (1, 2) else 1)
    if zero == 3:
        return bucket + zero3_gathered_bytes(cfg, params, block_params, bucket)
    return bucket


def zero3_gathered_bytes(cfg: Config, params: int, block_params: int, bucket: float) -> float:
    """ZeRO-3's steady-state (step >= 2) transient beside the model states, the reduce bucket and the activations:
    the larger of its two backward peaks (checked against runs at d 1024 and 0.19B, docs/plan.md; DeepSpeed 0.19's
    partitioned_param_coordinator.py and stage3.py under engine/deepspeed_config.py's settings)."""
    a = 2 if cfg.train.precision == "bf16" else 4  # gathered parameters and their .grad: the training precision
    table = cfg.model.vocab_size * cfg.model.d_model / cfg.parallel.tp * a
    if cfg.parallel.zero3_gather == "model":
        # All of this rank's `params` gathered from the forward through the backward; beside them the larger of a
        # block's .grad with the reduce-scatter's flat copy of its bucket and the embedding's dense gradient (tied:
        # and its sum with the head's).
        return params * a + max(block_params * a + bucket, (2 if cfg.model.tie_embeddings else 1) * table)
    # A block's backward: the block computing and the next one prefetched (stage3_max_live_parameters = 2 blocks),
    # plus one vocab x d table: from step 2 the coordinator has a trace and the table's gather is issued ahead,
    # so its full buffer is allocated (in flight) through the blocks' backward (measured tied at d 1024 and 2048,
    # 2026-12-03; untied, the head's projection the second table, only the total was checked: 1% under). And the
    # bucket's reduce-scatter (reduce_scatter_coalesced) cats its gradients into one more flat buffer of its size.
    # Measured, the step-2+ peak is in the last block's backward.
    block_peak = 2 * block_params * a + table + bucket
    # The embedding's backward (every step): the table gathered and its dense gradient, and tied, the sum of that
    # and the head's gradient (the head's own is in the activations). Not measured as the peak: at d 1024 tied it
    # is the larger term, and the plan is 5% under the measured peak (in the block's backward) with it, 9.5% without.
    embed_peak = (3 if cfg.model.tie_embeddings else 2) * table
    return max(block_peak, embed_peak)


# ---------------------------------------------------------------- time


def _peak(cfg: Config) -> float:
    if cfg.plan.peak_tflops:
        return cfg.plan.peak_tflops * 1e12
    accelerator = hardware.by_name(cfg.plan.gpu)
    if accelerator is None:
        raise ConfigError(f"plan.gpu={cfg.plan.gpu!r} has no known peak; choose one of "
                          f"{', '.join(hardware.names())} or set plan.peak_tflops")
    peak = hardware.peak_flops(accelerator, cfg.train.precision)
    if peak is None:
        raise ConfigError(f"plan.gpu={cfg.plan.gpu} has no {cfg.train.precision} peak in megatrain's table; "
                          "set plan.peak_tflops")
    return peak


def context_parallel_bytes(cfg: Config, layout: Layout) -> float:
    """Bytes one rank sends per step for context parallelism (0 without it).

    ring: per block and micro batch, the forward passes K/V on cp - 1 hops, the backward K/V on cp - 1
    hops and dK/dV on cp (back to their owner), fp32 blocks of [micro, seq/cp, kv dim/tp] each.
    ulysses: 4 all-to-alls (q, k, v, output) forward and 4 backward, (cp - 1)/cp of each tensor leaving.
    """
    cp = layout.cp
    if cp == 1:
        return 0.0
    model, train = cfg.model, cfg.train
    tokens = layout.micro_batch_size * train.seq_len / cp
    per_micro_block = {
        "ring": (3 * cp - 2) * 2 * tokens * model.kv_heads * model.head_dim / layout.tp * 4,
        "ulysses": 2 * (cp - 1) / cp * tokens * (2 * model.n_heads + 2 * model.kv_heads) * model.head_dim
        / layout.tp * (2 if train.precision == "bf16" else 4),
    }[layout.cp_mode]
    return per_micro_block * model.n_layers / layout.pp * layout.grad_accum


def _step_time(cfg: Config, layout: Layout, checkpointing: str, params: int) -> float:
    model, train, hw = cfg.model, cfg.train, cfg.plan
    tp, pp, dp, micro, accum = layout.tp, layout.pp, layout.dp, layout.micro_batch_size, layout.grad_accum
    act_bytes = 2 if train.precision == "bf16" else 4
    tokens = layout.global_batch_size * train.seq_len
    flops_per_token = training_flops_per_token(model, train.seq_len)
    recompute = {"none": 0.0, "full": 1 / 3,
                 "selective": 4 * model.n_layers * train.seq_len * model.n_heads * model.head_dim
                 / flops_per_token}[checkpointing]
    busy = 1 - bubble_fraction(pp, accum)  # 1F1B: pp - 1 idle micro-batch slots per step
    compute = tokens * flops_per_token * (1 + recompute) / (layout.world * _peak(cfg) * hw.mfu) / busy
    intra = hw.intra_node_gbps * GB
    # TP: 4 all-reduces (or all-gather + reduce-scatter) of [micro, seq, d] per block per micro
    # batch, on the critical path; +2 when blocks are recomputed.
    ops = 4 + (2 if checkpointing == "full" else 0)
    tp_bytes = ops * (model.n_layers / pp) * accum * micro * train.seq_len / layout.cp * model.d_model * act_bytes
    tp_time = 2 * (tp - 1) / tp * tp_bytes / intra if tp > 1 else 0.0
    dp_exposed = _exposed_dp_time(cfg, layout, params, act_bytes, compute) if dp > 1 else 0.0
    # CP: the ring's sends overlap the attention of the block held; whatever outlasts the compute shows.
    cp_bw = (hw.inter_node_gbps if tp * layout.cp > hw.gpus_per_node else hw.intra_node_gbps) * GB
    cp_exposed = max(0.0, context_parallel_bytes(cfg, layout) / cp_bw - compute)
    return compute + tp_time + dp_exposed + cp_exposed


def _exposed_dp_time(cfg: Config, layout: Layout, params: int, act_bytes: int, compute: float) -> float:
    """DP traffic the step waits for, under megatrain's DeepSpeed config (engine/deepspeed_config.py).

    Overlapped: at ZeRO-1/2/3 gradients are reduced bucket by bucket from backward hooks (overlap_comm) behind
    the backward still to run (2/3 of compute): ZeRO-1 at the last micro-batch only, ZeRO-2 and 3 at each;
    ZeRO-3's parameter gathers (forward and backward, every micro-batch; forward only with
    parallel.zero3_gather=model) are prefetched behind the block before. Not overlapped: the last bucket's
    reduction; at ZeRO-1/2 the all-gather of the updated parameters after the optimizer step; the whole
    all-reduce at ZeRO-0 and at ZeRO-1 with bf16 weights and fp32 gradients, where DeepSpeed swaps in its
    BF16_Optimizer, which reduces after backward.
    """
    dp, accum, hw = layout.dp, layout.grad_accum, cfg.plan
    ring = (dp - 1) / dp
    grad_width = 4 if grad_reduce_dtype(cfg) == "fp32" else 2
    grad_bytes, gather_bytes = ring * grad_width * params, ring * act_bytes * params
    last_bucket = ring * grad_width * min(params, reduce_bucket_elements(cfg))
    bandwidth = (hw.inter_node_gbps if layout.tp * layout.cp * dp > hw.gpus_per_node else hw.intra_node_gbps) * GB
    backward = compute * 2 / 3
    stage = layout.zero_stage
    if stage == 0:
        return 2 * grad_bytes / bandwidth
    if uses_bf16_optimizer(cfg, stage):
        return (2 * grad_bytes + gather_bytes) / bandwidth
    if stage == 3:
        gathers = 1 if cfg.parallel.zero3_gather == "model" else 2
        return max(last_bucket, (grad_bytes + gathers * gather_bytes) * accum - compute * bandwidth) / bandwidth
    reduced, behind = (grad_bytes, backward / accum) if stage == 1 else (grad_bytes * accum, backward)
    return (max(last_bucket, reduced - behind * bandwidth) + gather_bytes) / bandwidth


# ---------------------------------------------------------------- plans


def with_vocab(cfg: Config) -> Config:
    """`cfg` with model.vocab_size set: as given, or (null) sized from data.path's tokenizer as training sizes it;
    train.precision=auto plans bf16 (what it is on GPUs)."""
    if cfg.train.precision == "auto":
        cfg = replace(cfg, train=replace(cfg.train, precision="bf16"))
    if cfg.model.vocab_size is not None:
        return cfg
    try:
        tokenizer_vocab = vocab_from_data(cfg.data, cfg.model.vocab_multiple, 1).tokenizer_vocab
    except DataError as err:
        raise ConfigError(f"model.vocab_size is null (sized from the data's tokenizer) and the data cannot be read "
                          f"({err}); give model.vocab_size=<n> to plan without data") from None
    vocab = padded_vocab_size(tokenizer_vocab, cfg.model.vocab_multiple, cfg.parallel.tp)
    return replace(cfg, model=replace(cfg.model, vocab_size=vocab))


def plan(cfg: Config, world_size: int | None = None) -> Plan:
    """The plan of `cfg` as configured, on `world_size` ranks (default: plan.num_gpus or tp x pp)."""
    cfg = with_vocab(to_config(cfg))
    validate_plan(cfg.plan)
    train = cfg.train
    world = world_size or cfg.plan.num_gpus or cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp
    layout = validate(cfg, world)
    per_stage, experts = stage_params(cfg), stage_expert_params(cfg)
    params = max(per_stage)
    block = _block_params_per_rank(cfg.model, layout.tp)

    def stage_memory(stage: int) -> Memory:
        # ZeRO partitions dense states over DP x CP (weights are replicated across CP as across DP), the routed
        # experts' (this EP rank's E / ep) over their expert-DP group of DP / ep ranks (MoE refuses CP)
        states = [_model_states(n, dp, layout.zero_stage, train.precision, grad_reduce_dtype(cfg), layout.grad_accum)
                  for n, dp in ((per_stage[stage] - experts[stage], layout.dp * layout.cp),
                                (experts[stage], layout.dp // layout.ep))]
        weights, grads, optim = (sum(parts) for parts in zip(*states))
        return Memory(weights=weights, gradients=grads, optimizer=optim,
                      activations=activation_bytes(cfg, layout.micro_batch_size, layout.grad_accum,
                                                   train.activation_checkpointing, stage),
                      comm_buffers=comm_buffer_bytes(cfg, per_stage[stage], block, layout.zero_stage),
                      overhead=cfg.plan.overhead_gb * GB,
                      after_backward=after_backward_bytes(cfg, per_stage[stage], layout))

    # The first stage holds the embedding and the most micro batches, the last the head and the loss.
    stages = (stage_memory(0), stage_memory(layout.pp - 1))
    memory = max(stages, key=lambda m: m.total)
    step = _step_time(cfg, layout, train.activation_checkpointing, params)
    tokens_per_step = layout.global_batch_size * train.seq_len
    flops = training_flops_per_token(cfg.model, train.seq_len)
    return Plan(layout=layout, checkpointing=train.activation_checkpointing, params=param_counts(cfg.model),
                stage_blocks=tuple(blocks_per_stage(cfg)), stage_params=tuple(per_stage), params_per_rank=params,
                flops_per_token=flops, memory=memory, first_last_memory=stages, gpu_memory=cfg.plan.gpu_memory_gb * GB,
                step_time_s=step, tokens_per_s=tokens_per_step / step,
                mfu=tokens_per_step * flops / (step * world * _peak(cfg)))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(cfg: Config, num_gpus: int | None = None) -> list[Plan]:
    """Every layout that fits on `num_gpus` devices, best estimated tokens/s first.

    The global batch stays fixed: train.global_batch_size, else train.micro_batch_size x num_gpus.
    Sequence parallelism is on whenever TP > 1 (same traffic, less activation memory). Context
    parallelism (ring) is tried for long sequences: while each rank keeps >= MIN_CP_TOKENS tokens.
    """
    cfg = to_config(cfg)
    validate_plan(cfg.plan)
    n = num_gpus or cfg.plan.num_gpus or cfg.parallel.tp * cfg.parallel.pp
    global_batch = cfg.train.global_batch_size or cfg.train.micro_batch_size * n
    found = []
    for tp in _divisors(n):
        if tp > cfg.plan.gpus_per_node:
            continue  # TP traffic needs the intra-node links
        cps = [c for c in _divisors(n // tp) if c == 1 or cfg.train.seq_len // c >= MIN_CP_TOKENS]
        for cp, pp in ((c, pp) for c in cps for pp in _divisors(n // (tp * c))):
            dp = n // (tp * cp * pp)
            for zero, ckpt, micro in itertools.product((0, 1, 2, 3), CHECKPOINTING, (1, 2, 4, 8, 16)):
                if global_batch % (micro * dp):
                    continue
                candidate = replace(
                    cfg, parallel=replace(cfg.parallel, tp=tp, pp=pp, cp=cp, zero_stage=zero,
                                          sequence_parallel=tp > 1, pp_split=None,
                                          # the user's ZeRO-3 gathers for ZeRO-3; the others have no choice
                                          zero3_gather=cfg.parallel.zero3_gather if zero == 3 else "block"),
                    train=replace(cfg.train, micro_batch_size=micro, global_batch_size=global_batch,
                                  activation_checkpointing=ckpt))
                try:
                    candidate_plan = plan(candidate, n)
                except ConfigError:
                    continue  # e.g. heads not divisible by tp, ZeRO-2/3 with pp > 1
                if candidate_plan.fits:
                    found.append(candidate_plan)
    return sorted(found, key=lambda p: (-p.tokens_per_s, p.memory.total))


# ---------------------------------------------------------------- text


def _gb(x: float) -> str:
    return f"{x / GB:8.2f} GB"


def _layout(p: Plan) -> str:
    layout = p.layout
    sp = " sp" if layout.sequence_parallel else ""
    cp = f" cp={layout.cp} {layout.cp_mode}" if layout.cp > 1 else ""
    return (f"tp={layout.tp}{sp}{cp} pp={layout.pp} dp={layout.dp} zero={layout.zero_stage} ckpt={p.checkpointing} "
            f"micro={layout.micro_batch_size} x accum={layout.grad_accum}")


def describe(p: Plan, cfg: Config) -> str:
    """The plan as the text `python -m launcher.plan` prints."""
    cfg = to_config(cfg)
    train, mem = cfg.train, p.memory
    per_stage = ", ".join(f"{n:,}" for n in p.stage_params)
    blocks = ", ".join(map(str, p.stage_blocks))
    lines = [
        f"model {cfg.model.name}: {p.params.total:,} parameters ({p.params.non_embedding:,} non-embedding)",
        f"layout: {_layout(p)} on {p.world} x {cfg.plan.gpu} ({cfg.plan.gpu_memory_gb:g} GB), {train.precision}, "
        f"seq {train.seq_len}, global batch {p.layout.global_batch_size}",
        f"blocks per pipeline stage: {blocks}; parameters per TP rank of each stage: {per_stage}",
        f"training FLOPs per token: {p.flops_per_token:.4g}",
        "memory per GPU" + ("" if p.layout.pp == 1 else
                            f" (the most loaded stage: first {p.first_last_memory[0].total / GB:.2f} GB, "
                            f"last {p.first_last_memory[1].total / GB:.2f} GB)") + ":",
        f"  weights          {_gb(mem.weights)}",
        f"  gradients        {_gb(mem.gradients)}",
        f"  optimizer states {_gb(mem.optimizer)}",
        f"  activations      {_gb(mem.activations)}",
        f"  comm buffers     {_gb(mem.comm_buffers)}",
        f"  overhead         {_gb(mem.overhead)}",
        *([f"  after backward   {_gb(mem.after_backward)} of the gradients and buffers, never beside the "
           "activations"] if mem.after_backward else []),
        f"  total            {_gb(mem.total)} of {cfg.plan.gpu_memory_gb:g} GB: "
        + ("fits" if p.fits else "DOES NOT FIT"),
        *([f"context parallel ({p.layout.cp_mode}) traffic per rank and step "
           f"{_gb(context_parallel_bytes(cfg, p.layout))}"] if p.layout.cp > 1 else []),
        f"estimated step time {p.step_time_s:.3g} s, {p.tokens_per_s:,.0f} tokens/s "
        f"({p.tokens_per_s / p.world:,.0f} per GPU) at {cfg.plan.mfu:.0%} compute MFU "
        f"(overall MFU {p.mfu:.1%} after bubbles, recomputation and exposed communication)",
    ]
    return "\n".join(lines)


def describe_search(plans: list[Plan], cfg: Config, top: int) -> str:
    cfg = to_config(cfg)
    if not plans:
        return f"no layout of {cfg.model.name} fits on these GPUs ({cfg.plan.gpu_memory_gb:g} GB each)"
    head = f"{'#':>3} {'layout':<62} {'memory':>9} {'tokens/s':>11} {'MFU':>6}"
    rows = [f"{i + 1:>3} {_layout(p):<62} {p.memory.total / GB:7.1f}GB {p.tokens_per_s:11,.0f} {p.mfu:6.1%}"
            for i, p in enumerate(plans[:top])]
    return "\n".join([f"{len(plans)} layouts of {cfg.model.name} fit on {plans[0].world} x {cfg.plan.gpu} "
                      f"({cfg.plan.gpu_memory_gb:g} GB); best estimated throughput first:", head, *rows])
