"""The training loop: one function from a config to a finished (or preempted) run."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatrain.config import Config, config_warnings, cooldown_tokens, validate
from megatrain.data.dataset import TokenLoader, build_loader, check_data, load_tokenizer
from megatrain.data.manifest import vocab_from_data
from megatrain.data.prefetch import run_ahead
from megatrain.engine.build import build_engine, init_distributed, pick_device, resolve_precision
from megatrain.engine.checkpoint import Checkpointer, RunContext, hf_weights
from megatrain.engine.dist_env import export_dist_env, resolve_dist_env
from megatrain.engine.divergence import Diverged, Guard, roll_back
from megatrain.engine.memory_check import check_memory
from megatrain.engine.run_dir import (
    check_same_model,
    check_save_failure,
    lock_run_dir,
    release_run_dir,
    reset_metrics,
    resume_point,
    run_dir_of,
    write_config,
)
from megatrain.engine.schedule import on_resume
from megatrain.engine.step import eval_loss, train_step
from megatrain.hardware import host_allocator
from megatrain.model.attention import check_attention
from megatrain.model.moe import load_metrics
from megatrain.observe.logger import MetricsLogger, setup_console_logging
from megatrain.observe.meters import LossWatch, StepTimer, Throughput, memory_stats, peak_flops, process_memory, to_host
from megatrain.parallel.mesh import Mesh
from megatrain.parallel.stages import bubble_fraction
from megatrain.scaling.flops import param_counts, training_flops_per_token

log = logging.getLogger("megatrain")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved on a signal; the batch script requeues the job


class Preemption:
    """SIGTERM / SIGUSR1 (what SLURM sends before a time limit) ask for save-and-exit.

    The flag is agreed over a gloo group on host tensors: polling it never waits for a GPU.
    """

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._request)
        self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def _request(self, signum, frame) -> None:
        # Only a flag: a second signal during the save cannot interrupt it.
        self.requested = True

    def ignore_from_now(self) -> None:
        """After the save on a signal: the exit is 75 whatever arrives during the teardown (was 143)."""
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)

    def agreed(self) -> bool:
        """All ranks stop at the same step if any rank was signalled (collective)."""
        flag = torch.tensor([float(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.numpy()[0])  # a host tensor: no device read


def evaluate(engine, cfg: Config, mesh: Mesh, device: torch.device, loader: TokenLoader) -> float:
    """Eval loss on `train.eval_steps` batches of the validation split (the same batches every time)."""
    loader.rewind()
    return to_host(loss=eval_loss(engine, loader.next_batch, cfg.train.eval_steps, device, mesh.dp_group))["loss"]


def train(cfg: Config, raw: dict[str, Any]) -> int:
    """Run training to cfg.train.steps; returns the process exit code (0, or EXIT_PREEMPTED)."""
    env = resolve_dist_env()
    export_dist_env(env)
    setup_console_logging(env.rank)
    device = pick_device(cfg, env)
    if cfg.train.precision == "auto":
        cfg.train.precision = raw["train"]["precision"] = resolve_precision(device)
        log.info("train.precision=auto: %s on this %s", cfg.train.precision, device.type)
    elif cfg.train.precision == "bf16" and resolve_precision(device) == "fp32" and env.rank == 0:
        log.warning("train.precision=bf16 on a CPU without bf16 instructions (AVX512-BF16 / AMX): bf16 matmuls are "
                    "emulated, far slower than fp32 here; train.precision=auto picks fp32 on such a CPU")
    layout = validate(cfg, env.world_size)
    run_dir = run_dir_of(cfg)
    for warning in config_warnings(cfg) if env.rank == 0 else ():
        log.warning("%s", warning)
    if cfg.model.vocab_size is None:  # sized from the data's tokenizer, padded: divisible by TP
        vocab = vocab_from_data(cfg.data, cfg.model.vocab_multiple, cfg.parallel.tp)
        cfg.model.vocab_size = raw["model"]["vocab_size"] = vocab.vocab_size
        log.info("model.vocab_size=%d: the tokenizer of %s has %d tokens, padded by %d to a multiple of "
                 "model.vocab_multiple x parallel.tp = %d x %d", vocab.vocab_size, vocab.source,
                 vocab.tokenizer_vocab, vocab.padding, cfg.model.vocab_multiple, cfg.parallel.tp)
    counts = param_counts(cfg.model)
    cooldowns = cooldown_tokens(cfg, asdict(counts))  # train.cooldown_rule needs the sized model; checked here
    check_memory(cfg, env.world_size, device)  # before any process group or weight: train.memory_check
    check_attention(cfg.model, torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32, device,
                    cfg.data.document_mask)  # CUDA: never SDPA's math kernel unless model.attention_backend=math
    # Before any process group: a bad dataset costs seconds, not a queue wait. Rank 0 hashes the shards.
    data = check_data(cfg.data, cfg.tokenizer, seq_len=cfg.train.seq_len, model_vocab_size=cfg.model.vocab_size,
                      batch=layout.micro_batch_size * layout.dp, evaluate=cfg.train.eval_interval > 0,
                      hash_shards=env.rank == 0)
    start = resume_point(cfg, run_dir, env.rank)  # read-only, and the same on every rank
    if start.path is not None and env.rank == 0:
        check_same_model(run_dir, raw)
    init_weights = hf_weights(cfg.train.init_from, cfg.model) if cfg.train.init_from and start.path is None else None
    if start.step >= cfg.train.steps:  # every rank returns here: no process group waits for a missing rank
        if env.rank == 0:
            log.info("run.dir=%s is finished: %s is at step %d of train.steps=%d; nothing to train (raise "
                     "train.steps to continue it)", run_dir, start.path, start.step, cfg.train.steps)
        return 0
    lock = lock_run_dir(run_dir) if env.rank == 0 else None
    if env.rank == 0:  # every check has passed: only now does the run write into run.dir
        reset_metrics(run_dir, start.step)
        write_config(run_dir, raw)

    init_distributed(device)
    mesh = Mesh.build(layout)
    torch.manual_seed(cfg.train.seed)
    before_engine = process_memory()  # the planner's memory is what the engine and training add
    engine = build_engine(cfg, mesh, device, config_out=run_dir / "deepspeed.json" if env.rank == 0 else None)
    loader = run_ahead(build_loader(cfg.data, split="train", seq_len=cfg.train.seq_len,
                                    micro_batch_size=layout.micro_batch_size, dp_rank=mesh.dp_rank, dp_size=mesh.dp,
                                    seed=cfg.train.seed), cfg.data.prefetch, device)
    valid = None if not cfg.train.eval_interval else build_loader(  # built once, rewound at every eval
        cfg.data, split="valid", seq_len=cfg.train.seq_len, micro_batch_size=layout.micro_batch_size,
        dp_rank=mesh.dp_rank, dp_size=mesh.dp, seed=cfg.train.seed)

    checkpointer = Checkpointer(run_dir, cfg.train.keep_last, env.rank,
                                RunContext(cfg, mesh, data.tokenizer_path, data.eod_id))
    # Cooldown branches fork from stable-phase checkpoints kept apart from the rotation (keep_last).
    fork_steps = {cfg.optim.stable_steps(round(d / (layout.global_batch_size * cfg.train.seq_len)))
                  for d in cooldowns}
    forks = Checkpointer(run_dir / "cooldowns", 0, env.rank, checkpointer.context) if fork_steps else None
    if cfg.train.cooldown_rule.tokens_per_param is not None and env.rank == 0:  # where to fork the branches from
        log.info("train.cooldown_rule: branches of %s tokens fork at steps %s (%s)",
                 ", ".join(f"{d:,.0f}" for d in cooldowns), sorted(fork_steps), forks.root)
    step, tokens = 0, 0
    resume_from = start.path
    if resume_from is not None and cfg.train.resume == "auto" and resume_from.parent == checkpointer.root:
        # its sizes were checked before the process group; now the digests, each file read by one rank
        resume_from = checkpointer.find_latest() or (Path(cfg.train.fork_from) if cfg.train.fork_from else None)

    def reload(path: Path) -> dict[str, Any]:
        """Resume (or roll back to) a checkpoint: engine, LR schedule under this run's keys, data position."""
        state = checkpointer.load(engine, path)
        change = on_resume(engine.lr_scheduler, cfg.optim, cfg.train.steps)
        if change and env.rank == 0:
            log.warning("%s", change)
        loader.load_state_dict(state["data"])
        return state

    if resume_from is not None:
        state = reload(resume_from)
        step, tokens = state["step"], state["tokens"]
        log.info("resumed from %s at step %d (%d tokens)", resume_from, step, tokens)
    elif cfg.train.init_from:
        # checked before the process group unless a resume point was expected and every checkpoint was damaged
        checkpointer.init_from(engine, init_weights or hf_weights(cfg.train.init_from, cfg.model))
    if env.rank == 0 and step != start.step:  # a damaged newest checkpoint: it resumed from an older one
        reset_metrics(run_dir, step)

    if layout.pp > 1 and env.rank == 0:
        bubble = bubble_fraction(layout.pp, layout.grad_accum)
        log.log(logging.WARNING if layout.grad_accum < 2 * layout.pp else logging.INFO,
                "pipeline: %d stages, %d micro-batches per step -> %.0f%% of each step idle (1F1B bubble); "
                "raise train.global_batch_size for more micro-batches", layout.pp, layout.grad_accum, 100 * bubble)
    flops_per_token = training_flops_per_token(cfg.model, cfg.train.seq_len)
    peak, peak_source = peak_flops(device.type, torch.cuda.get_device_name(device) if device.type == "cuda" else "",
                                   cfg.train.precision, cfg.observe.peak_tflops)
    tokens_per_step = layout.global_batch_size * cfg.train.seq_len
    log.info("model %s: %s params (%s non-embedding) | layout tp=%d pp=%d dp=%d zero=%d sp=%s | global batch %d "
             "(micro %d x accum %d x dp %d) | %s", cfg.model.name,
             f"{counts.total:,}", f"{counts.non_embedding:,}", layout.tp, layout.pp, layout.dp,
             layout.zero_stage, "on" if layout.sequence_parallel else "off", layout.global_batch_size,
             layout.micro_batch_size, layout.grad_accum, layout.dp,
             f"peak {peak / 1e12:.1f} TFLOP/s/device ({peak_source})" if peak else f"MFU omitted ({peak_source})")
    if device.type == "cpu" and env.rank == 0 and host_allocator() == "glibc":
        log.info("CPU run on glibc's malloc, its mmap threshold held at 128 KiB so that freed tensors go back to the "
                 "OS and the RSS stays flat: they come back as page faults every step. A caching allocator "
                 "(LD_PRELOAD=libtcmalloc_minimal.so.4, Debian package libtcmalloc-minimal4) ran bench_peers' step "
                 "1.4x faster at +8% peak RSS (docs/benchmarks.md)")

    metrics = MetricsLogger(run_dir, enabled=env.rank == 0, total_steps=cfg.train.steps, start_step=step,
                            wandb_mode=cfg.logging.wandb_mode, wandb_project=cfg.logging.wandb_project,
                            wandb_entity=cfg.logging.wandb_entity, run_name=cfg.run.name, config=raw,
                            progress=cfg.logging.progress)
    preemption = Preemption()
    profiler = start_profiler(run_dir / "profile", env.rank) if cfg.train.profile else None
    timer, watch, window = StepTimer(device), LossWatch(device), Throughput()
    guard = Guard(cfg.train, resume_from, device)
    last_loss = last_eval = float("nan")

    def check_finite() -> float:
        """Read the loss (a sync: log and save steps only); stop at a non-finite loss since the last read."""
        loss, first_bad = watch.read()
        if first_bad:
            raise guard.diverged(first_bad, f"loss is not finite at step {first_bad} (read at step {step})")
        return loss

    def save(final: bool = False) -> None:
        # The portable copy doubles save time and size: every train.portable_every-th periodic save, always the last.
        every, interval = cfg.train.portable_every, cfg.train.save_interval
        portable = final or every == 1 or (interval > 0 and step % (interval * every) == 0)
        start = time.perf_counter()
        guard.check_weights(engine.module, step)  # never publish a NaN or inf
        try:
            path = checkpointer.save(engine, step, {"step": step, "tokens": tokens, "data": loader.state_dict()},
                                     with_portable=portable)
        except (OSError, RuntimeError) as err:  # torch reports a full disk as "unexpected pos" or an iostream error
            full = check_save_failure(err, checkpointer.root, step, env.rank)
            if full is None:
                raise
            raise full from err
        guard.saved(path)
        metrics.note(f"saved step {step} to {path} in {time.perf_counter() - start:.1f} s"
                     + ("" if portable else " (no portable copy: train.portable_every)"))

    exit_code = 0
    # Between log steps nothing here waits for the GPU: the loss stays on the device (LossWatch), phases are
    # timed with CUDA events, the preemption flag is agreed on the host. Log and save steps read them.
    while step < cfg.train.steps:
        try:
            loss, lr = train_step(engine, loader.next_batch, layout.grad_accum, device, mesh.dp_group, timer)
            step += 1
            guard.poison(engine.module, step)
            tokens += tokens_per_step
            watch.update(loss, step)
            window.step()

            row: dict[str, Any] = {}
            if step % cfg.train.log_interval == 0 or step == cfg.train.steps:
                last_loss = check_finite()
                grad_norm = _grad_norm(engine)
                guard.check_log(step, last_loss, None if engine.get_global_grad_norm() is None else grad_norm)
                elapsed = window.seconds()
                tps = tokens_per_step * window.steps / elapsed
                achieved = tps / layout.world * flops_per_token
                row = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens": tokens, "tokens_per_s": tps, "tokens_per_s_per_device": tps / layout.world,
                       "tflops_per_device": achieved / 1e12, **({"mfu": achieved / peak} if peak else {}),
                       "step_time_s": elapsed / window.steps, "restart_count": env.restart_count,
                       **{k: v / window.steps for k, v in timer.pop().items()}, **memory_stats(device),
                       **load_metrics(engine.module)}
                window.restart()
            if cfg.train.eval_interval and (step % cfg.train.eval_interval == 0 or step == cfg.train.steps):
                with window.excluded(device):  # eval time is not training throughput
                    last_eval = evaluate(engine, cfg, mesh, device, valid)
                row.update(step=step, eval_loss=last_eval, eval_ppl=math.exp(min(last_eval, 50.0)))
            if row:
                metrics.log(row)

            if profiler is not None:
                profiler.step()
            if forks is not None and step in fork_steps:  # before a preemption exit: a resume runs past it
                last_loss = check_finite()
                guard.check_weights(engine.module, step)
                with window.excluded(device):
                    forks.save(engine, step, {"step": step, "tokens": tokens, "data": loader.state_dict()},
                               with_portable=False)
            preempted = step % cfg.train.signal_check_interval == 0 and preemption.agreed()
            periodic = cfg.train.save_interval and step % cfg.train.save_interval == 0
            if preempted or step == cfg.train.steps or periodic:
                last_loss = check_finite()  # never publish a checkpoint after a non-finite loss
                with window.excluded(device):
                    save(final=step == cfg.train.steps and not preempted)
            if preempted:
                preemption.ignore_from_now()
                log.info("signal received: saved step %d, exiting with %d for requeue", step, EXIT_PREEMPTED)
                exit_code = EXIT_PREEMPTED
                break
        except Diverged as err:
            if not guard.may_roll_back(err):
                raise
            step, tokens = roll_back(reload, checkpointer, loader, guard, err, layout.grad_accum, metrics.note)
            watch = LossWatch(device)  # its first non-finite step is sticky
            window.restart()

    if exit_code == 0:
        if cfg.train.sample_tokens > 0 and layout.pp == 1:  # sampling through pipeline stages: not yet
            _print_sample(engine, cfg, data.tokenizer_path, device, env.rank)
        summary = {"params_total": counts.total, "params_non_embedding": counts.non_embedding,
                   "params_active": counts.active_total, "params_active_non_embedding": counts.active_non_embedding,
                   "vocab_size": cfg.model.vocab_size, "tokenizer_vocab_size": data.vocab_size,
                   "tokens": tokens, "flops": tokens * flops_per_token, "steps": step,
                   **dict(zip(("unique_tokens", "epochs"), loader.seen())),
                   "final_loss": last_loss, "final_eval_loss": last_eval,
                   "layout": layout.record(), "zero_stage": layout.zero_stage}
        ranks: list[Any] = [None] * env.world_size
        dist.all_gather_object(ranks, {"before_engine_rss": before_engine.get("rss"), **process_memory()})
        summary["memory_per_rank_bytes"] = ranks  # CPU: RSS before the engine and its high-water mark
        if env.rank == 0:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        metrics.summary(summary)
    if profiler is not None:
        profiler.stop()
    loader.close()
    metrics.close()
    dist.barrier()
    release_run_dir(lock)
    # Not enough on its own: gloo's threads can still abort a finished rank in the interpreter's teardown,
    # which launcher.train skips (launcher.common.exit_without_teardown).
    dist.destroy_process_group()
    return exit_code


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _print_sample(engine, cfg: Config, tokenizer_path: str, device: torch.device, rank: int) -> None:
    """A short continuation of a prompt; every rank runs the forward (ZeRO-3 / TP need them all)."""
    tokenizer = load_tokenizer(tokenizer_path)
    prompt = torch.tensor([tokenizer.encode(cfg.train.sample_prompt).ids], device=device)
    out = engine.module.generate(prompt, cfg.train.sample_tokens, seed=cfg.train.seed)
    if rank == 0:
        print(f"\n--- sample ---\n{tokenizer.decode(out[0].tolist())}\n--------------", flush=True)


def start_profiler(out: Path, rank: int) -> torch.profiler.profile:
    """A torch profiler trace of steps 3-5 (after warm-up) per rank, in `out` (train.profile: run.dir/profile/).

    Call `.step()` after each step and `.stop()` at the end."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(
        activities=activities, schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(out), worker_name=f"rank{rank}"),
        record_shapes=True, profile_memory=True)
    profiler.start()
    log.info("profiling steps 3-5 into %s (open in Perfetto or TensorBoard)", out)
    return profiler
