"""The mixture-of-experts block that stands in for the dense MLP of a block (docs/moe.md).

    scores  = softmax(x W_r^T) or sigmoid(x W_r^T)                (router, fp32)
    experts = top_k(scores + b)      b: the aux-loss-free selection bias (DeepSeek-V3), zeros when off
    weights = scores[experts] / sum(scores[experts])              (normalised top-k weights)
    y       = sum_k weights_k FFN_{experts_k}(x) + shared(x)      (shared: always-on experts)

Dropless: every routed copy of a token is computed, none is dropped for capacity. The copies are sorted by
expert into one buffer and each expert's GEMMs run on its contiguous slice. Under expert parallelism the
sorted buffer goes to the EP rank that computes each expert and comes back (parallel/experts.py).

Expert weights are stacked [experts, out, in] (the Hugging Face Qwen2-MoE layout); each EP rank holds only
its E / ep experts (`ep_dim=0`), replicated over the expert-data-parallel ranks, which reduce their gradients
(DeepSpeed's MoE parameter groups, engine/build.py; ZeRO-3: refused). Routed experts are not
TP-sharded: TP ranks compute them redundantly on the same tokens; the shared experts are a dense, TP-sharded
MLP.

Balancing: a sequence-wise auxiliary loss (DeepSeek-V3's, coef x E x sum_i f_i P_i per sequence, averaged
over sequences) -- per sequence, so it does not change with the DP size or micro-batch split -- and/or the
selection bias, moved after every step towards the mean load; plus an optional router z-loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatrain.config import ModelConfig
from megatrain.parallel.experts import Dispatch
from megatrain.parallel.layers import make_param
from megatrain.parallel.mappings import group_size
from megatrain.parallel.mesh import Mesh


class Experts(nn.Module):
    """This EP rank's E / ep FFNs as stacked weights [E / ep, out, in] (EP rank r holds experts
    [r E / ep, (r + 1) E / ep)); forward runs a contiguous slice of the sorted buffer through each."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh):
        super().__init__()
        e, d, f = cfg.moe.experts // mesh.ep, cfg.d_model, cfg.expert_ffn_dim
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.swiglu = cfg.activation == "swiglu"
        if self.swiglu:
            self.gate = make_param((e, f, d), ("normal", std), ep_dim=0)
        self.up = make_param((e, f, d), ("normal", std), ep_dim=0)
        self.down = make_param((e, d, f), ("normal", out_std), ep_dim=0)

    def forward(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """x: rows grouped by local expert, `sizes[e]` rows for local expert e."""
        outs = []
        for e, rows in enumerate(x.split(sizes)):  # empty slices too: every expert gets a (zero) gradient
            if self.swiglu:
                h = F.silu(F.linear(rows, self.gate[e])) * F.linear(rows, self.up[e])
            else:
                h = F.gelu(F.linear(rows, self.up[e]), approximate="tanh")
            outs.append(F.linear(h, self.down[e]))
        return torch.cat(outs)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh, sp: bool, dense_mlp: Callable[..., nn.Module]):
        super().__init__()
        moe = cfg.moe
        self.mesh, self.experts_n, self.top_k = mesh, moe.experts, moe.top_k
        self.sigmoid, self.rate = moe.router == "sigmoid", moe.bias_update_rate
        self.aux_coef, self.z_coef = moe.aux_loss_coef, moe.z_loss_coef
        self.router = make_param((moe.experts, cfg.d_model), ("normal", cfg.init_std))
        self.experts = Experts(cfg, mesh)
        self.shared = None
        if moe.shared_experts:  # one dense (TP-sharded) MLP as wide as all the shared experts together
            self.shared = dense_mlp(dataclasses.replace(cfg, ffn_hidden=moe.shared_experts * cfg.expert_ffn_dim),
                                    mesh, sp)
        self.register_buffer("expert_bias", torch.zeros(moe.experts))  # checkpointed with the module
        # Routed copies per expert: this step's (accumulating) and the last step's over the global batch
        self.register_buffer("load", torch.zeros(moe.experts), persistent=False)
        self.register_buffer("last_load", torch.zeros(moe.experts), persistent=False)
        self.counted: list | None = None  # the forward pass (its aux-loss list) whose load was last counted

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits, scores, chosen experts [n, k], their normalised weights [n, k]) in fp32."""
        logits = F.linear(tokens.float(), self.router.float())
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(-1)
        chosen = (scores.detach() + self.expert_bias).topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        return logits, scores, chosen, weights / weights.sum(-1, keepdim=True)

    def balance_loss(self, logits: torch.Tensor, scores: torch.Tensor, chosen: torch.Tensor,
                     batch: int) -> torch.Tensor:
        """Sequence-wise balance loss plus router z-loss for one micro-batch (0 when both are off)."""
        loss = logits.new_zeros(())
        if self.aux_coef:
            e = self.experts_n
            probs = scores / scores.sum(-1, keepdim=True) if self.sigmoid else scores
            p = probs.view(batch, -1, e).mean(1)  # [b, E]: mean routing probability per sequence
            hits = F.one_hot(chosen, e).sum(1).view(batch, -1, e).float()
            f = hits.mean(1) * e / self.top_k  # [b, E]: 1 everywhere when perfectly balanced
            loss = loss + self.aux_coef * (f * p).sum(-1).mean()
        if self.z_coef:
            loss = loss + self.z_coef * torch.logsumexp(logits, -1).square().mean()
        return loss

    def forward(self, x: torch.Tensor, aux_losses: list[torch.Tensor]) -> torch.Tensor:
        """x [b, s, d] -> [b, s, d]; appends this layer's balance loss to `aux_losses`."""
        b, s, d = x.shape
        tokens = x.reshape(-1, d)
        logits, scores, chosen, weights = self.route(tokens)
        aux_losses.append(self.balance_loss(logits, scores, chosen, b))
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)  # copies sorted by expert; ties keep token order (deterministic)
        token_of = order // self.top_k
        counts = torch.bincount(flat, minlength=self.experts_n)
        if self.training and self.counted is not aux_losses:  # full checkpointing runs forward twice: count once
            self.load += counts
            self.counted = aux_losses
        dispatch = Dispatch(counts, self.mesh.ep_group)
        grouped = dispatch.to_expert_major(dispatch.send_out(tokens[token_of]))
        out = self.experts(grouped, dispatch.expert_sizes())
        back = dispatch.send_back(dispatch.to_source_major(out))
        routed = tokens.new_zeros(tokens.shape).index_add(0, token_of, back * weights.reshape(-1)[order, None].to(
            back.dtype))
        y = routed.view(b, s, d)
        return y if self.shared is None else y + self.shared(x)

    @torch.no_grad()
    def after_step(self) -> None:
        """After each optimizer step: the step's load over the global batch (one all-reduce, no host read),
        and the selection bias update b_i += rate x sign(mean load - load_i)."""
        group = self.mesh.dp_cp_group
        if group_size(group) > 1:
            dist.all_reduce(self.load, group=group)
        self.last_load.copy_(self.load)
        self.load.zero_()
        if self.rate:
            self.expert_bias += self.rate * torch.sign(self.last_load.mean() - self.last_load)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def after_step(model: nn.Module) -> None:
    """Every MoE layer's end-of-step update (load statistics, selection bias); nothing for a dense model."""
    for layer in moe_layers(model):
        layer.after_step()


def load_metrics(model: nn.Module) -> dict[str, float]:
    """The metrics.jsonl fields of the last step's expert load (one device-to-host read: log steps only):
    min / max / coefficient of variation per MoE block (`moe_load_cv_<module>`), the worst cv, and the
    tokens dropped (always 0: dropless). Empty for a dense model."""
    stats = load_stats(model)
    if stats is None:
        return {}
    names = [name.removesuffix(".mlp").replace("blocks.", "block") for name, m in model.named_modules()
             if isinstance(m, MoE)]
    row: dict[str, float] = {"moe_dropped_tokens": 0}
    for name, (low, high, cv) in zip(names, stats.tolist()):
        row.update({f"moe_load_min_{name}": low, f"moe_load_max_{name}": high, f"moe_load_cv_{name}": cv})
    row["moe_load_cv_max"] = max(v for k, v in row.items() if k.startswith("moe_load_cv_"))
    return row


def load_stats(model: nn.Module) -> torch.Tensor | None:
    """[MoE layers, 3] on the device: min, max and coefficient of variation of the last step's expert load
    (routed copies per expert over the global batch); None for a dense model."""
    layers = moe_layers(model)
    if not layers:
        return None
    load = torch.stack([layer.last_load for layer in layers])
    mean = load.mean(-1)
    return torch.stack([load.min(-1).values, load.max(-1).values, load.std(-1, correction=0) / mean], -1)
