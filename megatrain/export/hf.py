"""Hugging Face `transformers` format: export a checkpoint, import a model to train from.

LLaMA-style models (RMSNorm, RoPE, SwiGLU) become `LlamaForCausalLM`, GPT-2-style ones (LayerNorm,
learned positions, tanh GELU) `GPT2LMHeadModel`, LLaMA-style mixtures of experts `Qwen2MoeForCausalLM`
(softmax router, normalised top-k, one shared-expert MLP: its sigmoid gate gets zero weights, i.e. 0.5,
and its down projection is doubled, which is exact in floating point). Both use the same RoPE layout (half split) and
the same attention scaling as megatrain, so weights map one to one; GPT-2's Conv1D layers store
weights transposed and fuse q, k, v. Export reads the checkpoint's portable copy: no process
group, no DeepSpeed, any training layout.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatrain.config import ModelConfig
from megatrain.data.manifest import with_umask_mode
from megatrain.export.portable_format import DIR, TOKENIZER, PortableCheckpoint

log = logging.getLogger("megatrain")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def architecture(m: ModelConfig) -> str:
    """"llama", "gpt2" or "qwen2_moe"; a model none can represent fails naming the keys that prevent it."""
    if m.moe.experts:
        if (m.norm, m.position, m.activation, m.bias) != ("rmsnorm", "rope", "swiglu", False) or \
                m.moe.router != "softmax" or m.moe.bias_update_rate:
            raise ValueError(f"model.moe.router={m.moe.router} model.moe.bias_update_rate={m.moe.bias_update_rate} "
                             f"model.bias={m.bias}: export writes mixtures of experts as Qwen2-MoE, which needs "
                             "model.moe.router=softmax, model.moe.bias_update_rate=0 (no selection bias), "
                             "rmsnorm+rope+swiglu and model.bias=false")
        return "qwen2_moe"
    if (m.norm, m.position, m.activation) == ("rmsnorm", "rope", "swiglu"):
        return "llama"
    if (m.norm, m.position, m.activation) == ("layernorm", "learned", "gelu"):
        if m.kv_heads != m.n_heads:
            raise ValueError(f"model.n_kv_heads={m.n_kv_heads} (grouped-query attention) has no GPT-2 "
                             f"representation: GPT2LMHeadModel needs model.n_kv_heads=model.n_heads={m.n_heads}")
        return "gpt2"
    raise ValueError(f"model.norm={m.norm} model.position={m.position} model.activation={m.activation}: Hugging "
                     "Face has no model for this mix; export supports rmsnorm+rope+swiglu (Llama) or "
                     "layernorm+learned+gelu (GPT-2)")


def hf_config(m: ModelConfig, eos_id: int | None = None):
    """The transformers config object of the same model."""
    import transformers
    from transformers import GPT2Config, LlamaConfig, Qwen2MoeConfig

    if int(transformers.__version__.split(".")[0]) < 5:
        # 4.x ignores rope_parameters and would save rope_theta=10000 whatever the model's is.
        raise ValueError(f"export needs transformers>=5.0 (its RoPE config keys), not {transformers.__version__}")

    if architecture(m) == "qwen2_moe":
        moe = m.moe
        return Qwen2MoeConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_dim,
                              num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                              num_key_value_heads=m.kv_heads, hidden_act="silu", max_position_embeddings=m.max_seq_len,
                              rms_norm_eps=m.norm_eps, rope_parameters={"rope_type": "default",
                                                                        "rope_theta": m.rope_theta},
                              tie_word_embeddings=m.tie_embeddings, decoder_sparse_step=1,
                              moe_intermediate_size=m.expert_ffn_dim,
                              shared_expert_intermediate_size=max(moe.shared_experts, 1) * m.expert_ffn_dim,
                              num_experts_per_tok=moe.top_k, num_experts=moe.experts, norm_topk_prob=True,
                              mlp_only_layers=list(range(moe.first_dense_layers)), qkv_bias=False,
                              bos_token_id=eos_id, eos_token_id=eos_id, architectures=["Qwen2MoeForCausalLM"])
    if architecture(m) == "llama":
        return LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_dim,
                           num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                           num_key_value_heads=m.kv_heads, head_dim=m.head_dim, hidden_act="silu",
                           max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
                           rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                           attention_bias=m.bias, mlp_bias=m.bias, tie_word_embeddings=m.tie_embeddings,
                           bos_token_id=eos_id, eos_token_id=eos_id, architectures=["LlamaForCausalLM"])
    return GPT2Config(vocab_size=m.vocab_size, n_positions=m.max_seq_len, n_embd=m.d_model, n_layer=m.n_layers,
                      n_head=m.n_heads, n_inner=m.ffn_dim, activation_function="gelu_new", resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=m.norm_eps,
                      tie_word_embeddings=m.tie_embeddings, bos_token_id=eos_id, eos_token_id=eos_id,
                      architectures=["GPT2LMHeadModel"])


def model_config_from_hf(config) -> dict:
    """ModelConfig fields that a transformers config fixes (everything that shapes the weights)."""
    if config.model_type == "llama":
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default" or config.hidden_act != "silu":
            raise ValueError(f"Llama with rope_type={rope.get('rope_type')} hidden_act={config.hidden_act}: "
                             "megatrain implements default RoPE and SiLU only")
        if config.attention_bias != config.mlp_bias:
            raise ValueError("Llama with attention_bias != mlp_bias: megatrain's model.bias covers both")
        if getattr(config, "head_dim", None) not in (None, config.hidden_size // config.num_attention_heads):
            raise ValueError(f"Llama head_dim={config.head_dim} != hidden_size / num_attention_heads")
        return dict(vocab_size=config.vocab_size, d_model=config.hidden_size, n_layers=config.num_hidden_layers,
                    n_heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                    ffn_dim=config.intermediate_size, norm="rmsnorm", norm_eps=config.rms_norm_eps,
                    position="rope", rope_theta=rope.get("rope_theta", 10000.0), activation="swiglu",
                    bias=config.attention_bias, tie_embeddings=config.tie_word_embeddings)
    if config.model_type == "gpt2":
        if config.activation_function not in GPT2_ACTIVATIONS or config.scale_attn_by_inverse_layer_idx:
            raise ValueError(f"GPT-2 with activation_function={config.activation_function} and "
                             f"scale_attn_by_inverse_layer_idx={config.scale_attn_by_inverse_layer_idx}: "
                             "megatrain implements tanh GELU and standard attention scaling")
        return dict(vocab_size=config.vocab_size, d_model=config.n_embd, n_layers=config.n_layer,
                    n_heads=config.n_head, kv_heads=config.n_head, ffn_dim=config.n_inner or 4 * config.n_embd,
                    max_seq_len=config.n_positions, norm="layernorm", norm_eps=config.layer_norm_epsilon,
                    position="learned", activation="gelu", bias=True, tie_embeddings=config.tie_word_embeddings)
    raise ValueError(f"model_type={config.model_type}: megatrain imports llama and gpt2 models")


def _renames(m: ModelConfig) -> dict[str, str]:
    """canonical name -> HF name, for the tensors that map one to one (GPT-2 attention is fused apart)."""
    names: dict[str, str] = {}
    if architecture(m) in ("llama", "qwen2_moe"):
        names["embed.tokens.weight"] = "model.embed_tokens.weight"
        names["head.norm.weight"] = "model.norm.weight"
        for i in range(m.n_layers):
            b, h = f"blocks.{i}", f"model.layers.{i}"
            names[f"{b}.attn_norm.weight"] = f"{h}.input_layernorm.weight"
            names[f"{b}.mlp_norm.weight"] = f"{h}.post_attention_layernorm.weight"
            parts = [("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"), ("attn.v", "self_attn.v_proj"),
                     ("attn.o", "self_attn.o_proj")]
            if not m.is_moe_layer(i):  # MoE blocks: _moe_to_hf
                parts += [("mlp.gate", "mlp.gate_proj"), ("mlp.up", "mlp.up_proj"), ("mlp.down", "mlp.down_proj")]
            for ours, theirs in parts:
                for kind in ("weight", "bias") if m.bias else ("weight",):
                    names[f"{b}.{ours}.{kind}"] = f"{h}.{theirs}.{kind}"
    else:
        names.update({"embed.tokens.weight": "transformer.wte.weight", "embed.positions": "transformer.wpe.weight",
                      "head.norm.weight": "transformer.ln_f.weight", "head.norm.bias": "transformer.ln_f.bias"})
        for i in range(m.n_layers):
            b, h = f"blocks.{i}", f"transformer.h.{i}"
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                names[f"{b}.{ours}.weight"], names[f"{b}.{ours}.bias"] = f"{h}.{theirs}.weight", f"{h}.{theirs}.bias"
            for ours, theirs in (("attn.o", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
                names[f"{b}.{ours}.weight"], names[f"{b}.{ours}.bias"] = f"{h}.{theirs}.weight", f"{h}.{theirs}.bias"
    if not m.tie_embeddings:
        names["head.proj.weight"] = "lm_head.weight"
    return names


def to_hf(m: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF state dict from canonical full weights. GPT-2 without biases gets zero biases (the same model)."""
    gpt2 = architecture(m) == "gpt2"
    out = {}
    for ours, theirs in _renames(m).items():
        value = weights.get(ours)
        if value is None and gpt2 and ours.endswith(".bias"):
            value = torch.zeros(weights[ours[: -len("bias")] + "weight"].shape[0])
        # GPT-2's Conv1D keeps weights as [in, out]
        out[theirs] = value.t() if gpt2 and value.dim() == 2 and ".h." in theirs else value
    if gpt2:
        for i in range(m.n_layers):
            b = f"blocks.{i}.attn"
            out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([weights[f"{b}.{x}.weight"] for x in "qkv"]).t()
            biases = [weights.get(f"{b}.{x}.bias", torch.zeros(m.d_model)) for x in "qkv"]
            out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(biases)
    if architecture(m) == "qwen2_moe":
        out.update(_moe_to_hf(m, weights))
    return {k: v.contiguous() for k, v in out.items()}


def _moe_to_hf(m: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen2-MoE's MoE blocks: router, fused gate/up experts [E, 2f, d], down [E, d, f], gated shared expert."""
    out = {}
    for i in (i for i in range(m.n_layers) if m.is_moe_layer(i)):
        b, h = f"blocks.{i}.mlp", f"model.layers.{i}.mlp"
        out[f"{h}.gate.weight"] = weights[f"{b}.router"]
        out[f"{h}.experts.gate_up_proj"] = torch.cat([weights[f"{b}.experts.gate"], weights[f"{b}.experts.up"]], 1)
        out[f"{h}.experts.down_proj"] = weights[f"{b}.experts.down"]
        f, d = m.expert_ffn_dim, m.d_model
        for ours, theirs, shape in (("gate", "gate_proj", (f, d)), ("up", "up_proj", (f, d)),
                                    ("down", "down_proj", (d, f))):
            # No shared experts: a zero MLP. Shared experts: always on, so sigmoid(0) = 0.5 times twice the output.
            value = weights[f"{b}.shared.{ours}.weight"] if m.moe.shared_experts else torch.zeros(shape)
            out[f"{h}.shared_expert.{theirs}.weight"] = 2 * value if ours == "down" else value
        out[f"{h}.shared_expert_gate.weight"] = torch.zeros(1, d)
    return out


def export_checkpoint(checkpoint: Path, output: Path, dtype: str = "float32") -> str:
    """Write a Hugging Face directory (config.json, model.safetensors, tokenizer) for `checkpoint`.

    Returns the architecture name. Needs only the checkpoint's files.
    """
    from transformers import PreTrainedTokenizerFast

    if dtype not in DTYPES:
        raise ValueError(f"export.dtype={dtype} is not allowed; choose one of {', '.join(DTYPES)}")
    source = PortableCheckpoint(Path(checkpoint) / DIR)
    m = source.model
    arch = architecture(m)
    tokenizer_file = source.directory / TOKENIZER
    eod = source.state.get("eod_token")
    tokenizer = None
    if tokenizer_file.is_file():
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=eod, bos_token=eod,
                                            model_max_length=m.max_seq_len)
    eos_id = tokenizer.eos_token_id if tokenizer is not None and eod else None
    weights = source.weights()
    # A diverged run's weights would load and generate garbage: refuse them by name.
    bad = [name for name, value in weights.items() if not torch.isfinite(value).all()]
    if bad:
        raise ValueError(f"checkpoint {checkpoint}: {len(bad)} of {len(weights)} weight tensors hold NaN or inf "
                         f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}): the run diverged before this "
                         "save; refusing to export it (export an earlier checkpoint with export.checkpoint=<path>)")
    state = {k: v.to(DTYPES[dtype]) for k, v in to_hf(m, weights).items()}
    output.mkdir(parents=True, exist_ok=True)
    save_file(state, str(output / "model.safetensors"), metadata={"format": "pt"})
    with_umask_mode(output / "model.safetensors")  # safetensors creates 0600
    config = hf_config(m, eos_id)
    config.dtype = dtype
    config.save_pretrained(output)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    else:
        log.warning("%s holds no tokenizer: exported the model only", source.directory)
    (output / "megatrain.json").write_text(json.dumps({"checkpoint": str(checkpoint), "step": source.state["step"],
                                                       "model": asdict(m)}, indent=1))
    return arch


class HFWeights:
    """The canonical fp32 weights of a Hugging Face directory whose model must equal `m`, read by slices.

    Only the headers are read up front; `local` reads a TP rank's slice of one tensor through safetensors'
    get_slice, so a rank of a TP x PP run reads about its share of the files, not the whole model.
    """

    def __init__(self, directory: Path, m: ModelConfig):
        from transformers import AutoConfig

        self.directory = Path(directory)
        theirs = model_config_from_hf(AutoConfig.from_pretrained(str(directory)))
        mine = dict(asdict(m), kv_heads=m.kv_heads, ffn_dim=m.ffn_dim)
        if theirs["position"] == "rope":  # no weights depend on it
            mine.pop("max_seq_len")
        wrong = [f"model.{k}={mine[k]} but {directory} has {v}" for k, v in theirs.items()
                 if k in mine and mine[k] != v and not (isinstance(v, float) and abs(mine[k] - v) <= 1e-12)]
        if wrong:
            raise ValueError("the run's model differs from the one to import: " + "; ".join(wrong)
                             + " (kv_heads is model.n_kv_heads, ffn_dim model.ffn_hidden)")
        self.files = sorted(self.directory.glob("*.safetensors"))
        pickled = sorted(p for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in self.directory.glob(pattern))
        if not self.files and pickled:
            raise ValueError(f"{pickled[0]} is a pickle, which megatrain never loads (unpickling can run code), "
                             f"and {directory} holds no *.safetensors weights; convert it to safetensors where you "
                             "trust it")
        if not self.files:
            raise ValueError(f"{directory} holds no *.safetensors weights")
        self.bytes_read = 0  # tensor bytes read so far
        gpt2 = architecture(m) == "gpt2"
        stored: dict[str, tuple[Path, str, list[int]]] = {}  # HF name -> (file, key in it, shape)
        for path in self.files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    # checkpoints saved from GPT2Model (e.g. the original `gpt2`) lack the `transformer.` prefix
                    name = key if not gpt2 or key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
                    stored[name] = (path, key, list(f.get_slice(key).get_shape()))
        # canonical name -> (file, key, transposed, rows): `rows` is the range of the canonical dim 0 the tensor
        # takes of the stored one (GPT-2's fused q, k, v); GPT-2's Conv1D stores 2-D block weights as [in, out].
        self.entries: dict[str, tuple[Path, str, bool, tuple[int, int] | None]] = {}
        for ours, name in _renames(m).items():
            if name not in stored:
                raise ValueError(f"the Hugging Face weights have no {name} (needed for {ours})")
            path, key, shape = stored[name]
            self.entries[ours] = (path, key, gpt2 and len(shape) == 2 and ".h." in name, None)
        if gpt2:
            for i in range(m.n_layers):
                for kind in ("weight", "bias"):
                    fused = f"transformer.h.{i}.attn.c_attn.{kind}"
                    if fused not in stored:
                        raise ValueError(f"the Hugging Face weights have no {fused} (needed for blocks.{i}.attn)")
                    path, key, shape = stored[fused]
                    width = shape[-1] // 3
                    for j, x in enumerate("qkv"):
                        self.entries[f"blocks.{i}.attn.{x}.{kind}"] = (path, key, kind == "weight",
                                                                       (j * width, (j + 1) * width))
        self._stored_shapes = {(path, key): shape for path, key, shape in stored.values()}

    def shape(self, name: str) -> list[int]:
        """The canonical full shape, from the file headers."""
        path, key, transposed, rows = self.entries[name]
        shape = list(self._stored_shapes[(path, key)])
        shape = shape[::-1] if transposed else shape
        if rows is not None:
            shape[0] = rows[1] - rows[0]
        return shape

    def shapes(self) -> dict[str, list[int]]:
        return {name: self.shape(name) for name in self.entries}

    def local(self, name: str, tp_dim: int | None = None, tp: int = 1, tp_rank: int = 0) -> torch.Tensor:
        """fp32 slice `tp_rank` of `tp` along the canonical `tp_dim` (None: whole), reading only its bytes."""
        path, key, transposed, rows = self.entries[name]
        bounds = [(0, n) for n in self.shape(name)]
        if tp_dim is not None and tp > 1:
            full = bounds[tp_dim][1]
            bounds[tp_dim] = (tp_rank * full // tp, (tp_rank + 1) * full // tp)
        if rows is not None:
            bounds[0] = (rows[0] + bounds[0][0], rows[0] + bounds[0][1])
        index = tuple(slice(lo, hi) for lo, hi in (bounds[::-1] if transposed else bounds))
        with safe_open(str(path), framework="pt") as f:
            value = f.get_slice(key)[index]
        self.bytes_read += value.numel() * value.element_size()
        return (value.t() if transposed else value).float().contiguous()

    def file_bytes(self) -> int:
        """Bytes of every weight file: what reading the whole model costs."""
        return sum(p.stat().st_size for p in self.files)
