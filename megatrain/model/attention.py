"""The attention core's kernel: which one runs, why, and a start-up check that it is not the slow one.

`model.attention_backend`:
- `auto` (default): causal attention through SDPA's fast kernels; packed-document (block-causal) masks
  without any [s, s] tensor -- FlexAttention with a block mask built from `doc_ids` on CUDA, one causal
  SDPA call per document on the CPU (FlexAttention has no backward on the CPU). On CUDA `check_attention`
  runs a tiny SDPA probe with only the fast kernels enabled (flash or cuDNN for bf16/fp16, memory-efficient
  for fp32) and fails at start, with the reason, if only the math kernel would run.
- `math`: the reference: a dense [b, 1, s, s] boolean mask and whatever SDPA picks, the O(s^2)-memory
  math kernel included; use it to debug or where no fast kernel exists.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatrain.config import ConfigError, ModelConfig

FLEX_BLOCK = 128  # FlexAttention's tile: the block mask holds (s / 128)^2 entries per sample
# SDPA kernels allowed per dtype under `auto`: flash or cuDNN for 16-bit, memory-efficient for fp32.
FAST_SDPA = {torch.bfloat16: ("flash", "cudnn"), torch.float16: ("flash", "cudnn"), torch.float32: ("efficient",)}
_compiled_flex = None  # FlexAttention compiled once per process: eager flex materialises the scores


def document_kernel(backend: str, device_type: str) -> str:
    """How a packed-document mask is applied: 'flex' (CUDA), 'segments' (CPU) or 'dense' (math)."""
    if backend == "math":
        return "dense"
    return "flex" if device_type == "cuda" else "segments"


@dataclass
class DocumentMask:
    """Block-causal attention over the documents packed in each row, in the form its kernel needs."""

    kernel: str
    dense: torch.Tensor | None = None  # [b, 1, s, s] bool: 'dense' only
    block_mask: object = None  # flex_attention's BlockMask: 'flex' only
    segments: list[list[tuple[int, int]]] | None = None  # (start, end) of each document per row: 'segments'

    @classmethod
    def build(cls, doc_ids: torch.Tensor, backend: str) -> DocumentMask:
        """`doc_ids` [b, s]: each token's document index, non-decreasing along the row."""
        kernel = document_kernel(backend, doc_ids.device.type)
        if kernel == "dense":
            s = doc_ids.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
            return cls(kernel, dense=(doc_ids[:, :, None] == doc_ids[:, None, :]).logical_and(causal).unsqueeze(1))
        if kernel == "flex":
            return cls(kernel, block_mask=document_block_mask(doc_ids))
        # One host read per forward (free on the CPU, where this path runs); every block reuses it.
        ends = [torch.unique_consecutive(row, return_counts=True)[1].cumsum(0).tolist() for row in doc_ids]
        return cls(kernel, segments=[list(zip([0, *row[:-1]], row)) for row in ends])


def document_block_mask(doc_ids: torch.Tensor, block: int = FLEX_BLOCK):
    """A FlexAttention BlockMask for block-causal attention, from per-tile document ranges in O((s/block)^2):
    create_block_mask would evaluate the mask on all s x s pairs. As doc ids never decrease along a row, a
    key tile j <= query tile i shares a document with it iff its last id >= the query tile's first id, and
    every pair of the two is allowed iff j < i and both tiles hold one and the same document."""
    from torch.nn.attention.flex_attention import BlockMask

    b, s = doc_ids.shape
    n = -(-s // block)
    padded = torch.cat([doc_ids, doc_ids[:, -1:].expand(b, n * block - s)], dim=1)  # the tail continues the last doc
    tiles = padded.view(b, n, block)
    first, last = tiles[:, :, 0], tiles[:, :, -1]
    lower = torch.ones(n, n, dtype=torch.bool, device=doc_ids.device).tril()
    touches = lower & (last[:, None, :] >= first[:, :, None])  # [b, q tile, kv tile]
    full = lower.tril(-1) & (first[:, None, :] == last[:, :, None])
    partial = touches & ~full

    def blocks(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Count and indices of the set kv tiles per query tile, set ones first (BlockMask's layout).
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)
        return m.sum(-1).to(torch.int32)[:, None], order.to(torch.int32)[:, None]

    def mask_mod(batch, head, q, kv):
        return (q >= kv) & (padded[batch, q] == padded[batch, kv])

    return BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(s, s))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask | None,
           dropout_p: float = 0.0) -> torch.Tensor:
    """Causal (mask None) or block-causal attention; q [b, h, s, d], k and v [b, kv_h, s, d] (GQA when fewer)."""
    gqa = k.shape[1] != q.shape[1]
    if mask is None or mask.kernel == "dense":
        dense = None if mask is None else mask.dense
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, is_causal=dense is None,
                                              dropout_p=dropout_p, enable_gqa=gqa)
    if mask.kernel == "flex":
        if dropout_p:  # check_attention refuses this at start; a direct caller learns it here
            raise ValueError("FlexAttention has no dropout: use model.dropout=0 or model.attention_backend=math")
        return _flex()(q, k, v, block_mask=mask.block_mask, enable_gqa=gqa)
    rows = []
    for row, documents in enumerate(mask.segments):  # causal within each document = block-causal
        rows.append(torch.cat([F.scaled_dot_product_attention(
            *(t[row:row + 1, :, a:e] for t in (q, k, v)), is_causal=True, dropout_p=dropout_p, enable_gqa=gqa)
            for a, e in documents], dim=2))
    return torch.cat(rows)


def _flex():
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


@dataclass(frozen=True)
class AttentionPlan:
    """What `check_attention` verifies on a device: the SDPA kernels allowed (None: nothing to probe)."""

    sdpa_backends: tuple[str, ...] | None
    error: str | None = None  # a known impossibility, said before any probe


def attention_plan(cfg: ModelConfig, dtype: torch.dtype, device_type: str, document_mask: bool) -> AttentionPlan:
    """The start-up decision, a pure function of the config: on CUDA under `auto`, SDPA may use only its fast
    kernels; a document mask goes through FlexAttention instead, which has no dropout."""
    if cfg.attention_backend == "math" or device_type != "cuda":
        return AttentionPlan(None)
    if document_mask:
        if cfg.dropout > 0:
            return AttentionPlan(None, f"model.attention_backend=auto with data.document_mask=true runs FlexAttention, "
                                       f"which has no dropout; set model.dropout=0 (got {cfg.dropout}) or "
                                       f"model.attention_backend=math")
        return AttentionPlan(None)
    return AttentionPlan(FAST_SDPA[dtype])


def math_fallback_reason(dtype: torch.dtype, head_dim: int, gqa: bool, torch_says: list[str]) -> str:
    """One line: why no fast SDPA kernel takes this dtype and shape (known limits, then torch's own words)."""
    known = []
    if dtype == torch.float32:
        known.append("fp32 runs only the memory-efficient kernel (flash and cuDNN need bf16/fp16)"
                     + (", which must also take GQA here" if gqa else ""))
    if head_dim > 256:
        known.append(f"head_dim {head_dim} > 256")
    if head_dim % 8:
        known.append(f"head_dim {head_dim} is not a multiple of 8")
    said = "; ".join(" ".join(line.split()) for line in torch_says)
    return "; ".join(known + ([f"torch: {said}"] if said else [])) or "no fast kernel accepted the probe"


def probe_sdpa(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, backends: tuple[str, ...]) -> str | None:
    """Run the model's attention call (causal, its heads and head_dim) forward and backward on a tiny
    probe with only `backends` enabled; None if one took it, else why none did."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    enum = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
    gqa = cfg.kv_heads != cfg.n_heads
    q = torch.randn(1, cfg.n_heads, 128, cfg.head_dim, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, cfg.kv_heads, 128, cfg.head_dim, device=device, dtype=dtype, requires_grad=True)
            for _ in range(2))
    with warnings.catch_warnings(record=True) as said, sdpa_kernel([enum[b] for b in backends]):
        warnings.simplefilter("always")
        try:
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).sum().backward()
            return None
        except RuntimeError:
            return math_fallback_reason(dtype, cfg.head_dim, gqa, [str(w.message) for w in said])


def check_attention(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, document_mask: bool) -> None:
    """Fail at start (ConfigError, before any process group) if the attention core would run SDPA's math kernel."""
    plan = attention_plan(cfg, dtype, device.type, document_mask)
    if plan.error:
        raise ConfigError(plan.error)
    reason = plan.sdpa_backends and probe_sdpa(cfg, dtype, device, plan.sdpa_backends)
    if reason:
        raise ConfigError(f"model.attention_backend=auto: SDPA would run the math kernel (O(s^2) memory) for "
                          f"{str(dtype).removeprefix('torch.')}, head_dim {cfg.head_dim}, causal mask, "
                          f"{cfg.n_heads}/{cfg.kv_heads} heads ({'/'.join(plan.sdpa_backends)} refused: {reason}); "
                          "set model.attention_backend=math to allow it")
