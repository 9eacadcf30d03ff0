"""Checkpoints of any layout resume on another layout and export to Hugging Face with the same logits;
a Hugging Face directory starts a run (`train.init_from`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from megatrain.config import ModelConfig
from megatrain.export.hf import architecture
from megatrain.export.portable_format import PortableCheckpoint
from megatrain.model.transformer import Transformer
from tests.e2e.conftest import TRAIN, cli, losses, torchrun

ARGS = (*TRAIN, "train.precision=fp32", "train.eval_interval=0", "train.global_batch_size=4", "optim.warmup_steps=1")
GPT2 = ("model.norm=layernorm", "model.position=learned", "model.activation=gelu", "model.bias=true",
        "model.tie_embeddings=true", "model.n_kv_heads=null")
GPT2_ARGS = (*ARGS, *GPT2, "train.steps=4", "optim.lr=3e-3")


@pytest.fixture(scope="module")
def tp2_run(tiny_data, tmp_path_factory) -> Path:
    """TP2 x DP1, ZeRO-1, 4 steps (GQA, untied head), checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("tp2") / "run"
    result = cli("launcher.train", *ARGS, f"data.path={tiny_data}", f"run.dir={run}", "train.steps=4",
                 "train.save_interval=2", "parallel.tp=2", "parallel.zero_stage=1", launcher=torchrun(2))
    assert result.returncode == 0, result.stderr
    return run


def test_tp2_zero1_checkpoint_resumes_in_one_process_with_the_same_losses(tp2_run, tiny_data, tmp_path):
    run = tmp_path / "one"
    shutil.copytree(tp2_run / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000002")
    result = cli("launcher.train", *ARGS, f"data.path={tiny_data}", f"run.dir={run}", "train.steps=4",
                 "parallel.zero_stage=0")
    assert result.returncode == 0, result.stderr
    assert "tp=2 pp=1 dp=1 zero_stage=1" in result.stderr and "loading its portable copy" in result.stderr
    # micro_batch x DP is 2 x 1 in both layouts: the data stream continues exactly
    reference = {step: loss for step, loss in losses(tp2_run).items() if step > 2}
    assert losses(run).keys() == reference.keys()
    for step, loss in losses(run).items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step


def _megatrain_logits(checkpoint: Path, ids: torch.Tensor) -> torch.Tensor:
    source = PortableCheckpoint(checkpoint / "portable")
    model = Transformer(source.model)
    model.load_state_dict(source.weights(), strict=True)
    return model.eval()(ids)


def _export(checkpoint_args: tuple[str, ...], out: Path) -> None:
    result = cli("launcher.export", *checkpoint_args, f"export.output={out}")
    assert result.returncode == 0, result.stderr


def _assert_same_logits(checkpoint: Path, out: Path, arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == arch
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer("To be, or not to be, that is the question:")["input_ids"]])
    assert ids.shape[1] > 5 and tokenizer.decode(ids[0]) == "To be, or not to be, that is the question:"
    with torch.no_grad():
        theirs = hf(ids).logits
        ours = _megatrain_logits(checkpoint, ids)
    diff = (theirs - ours).abs().max().item()
    print(f"{arch}: max |logits diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_tp2_checkpoint_exports_to_llama_with_the_same_logits(tp2_run, tmp_path):
    out = tmp_path / "hf"
    _export((f"run.dir={tp2_run}",), out)  # the latest checkpoint
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    _assert_same_logits(tp2_run / "checkpoints" / "step_00000004", out, "LlamaForCausalLM")


@pytest.fixture(scope="module")
def gpt2_pp2_run(tiny_data, tmp_path_factory) -> Path:
    """A GPT-2-style run over 2 pipeline stages, 4 steps, checkpoints at steps 2 and 4: its tied embedding is
    held on both stages (it is one parameter everywhere else)."""
    run = tmp_path_factory.mktemp("gpt2") / "run"
    result = cli("launcher.train", *GPT2_ARGS, f"data.path={tiny_data}", f"run.dir={run}", "train.save_interval=2",
                 "parallel.pp=2", launcher=torchrun(2))
    assert result.returncode == 0, result.stderr
    return run


@pytest.fixture(scope="module")
def gpt2_export(gpt2_pp2_run, tmp_path_factory) -> tuple[Path, Path]:
    """The pipeline run's last checkpoint and its export."""
    checkpoint, out = gpt2_pp2_run / "checkpoints" / "step_00000004", tmp_path_factory.mktemp("gpt2") / "hf"
    _export((f"export.checkpoint={checkpoint}",), out)
    return checkpoint, out


def test_tied_pp2_checkpoint_resumes_in_one_process_with_the_same_losses(gpt2_pp2_run, tiny_data, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(gpt2_pp2_run / "checkpoints" / "step_00000002", one / "checkpoints" / "step_00000002")
    result = cli("launcher.train", *GPT2_ARGS, f"data.path={tiny_data}", f"run.dir={one}")
    assert result.returncode == 0, result.stderr
    assert "loading its portable copy" in result.stderr
    reference = {step: loss for step, loss in losses(gpt2_pp2_run).items() if step > 2}
    assert losses(one).keys() == reference.keys()
    for step, loss in losses(one).items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step


def test_tied_pp2_checkpoint_exports_to_gpt2_with_the_same_logits(gpt2_export):
    _assert_same_logits(*gpt2_export, "GPT2LMHeadModel")


def test_safetensors_files_get_the_users_umask_not_0600(gpt2_export):
    mask = os.umask(0o022)  # read the umask the fixture's processes inherited
    os.umask(mask)
    if mask & 0o044:
        pytest.skip(f"umask {mask:03o} hides files from others anyway; run under umask 022")
    checkpoint, out = gpt2_export
    files = [out / "model.safetensors", *(checkpoint / "portable").glob("*.safetensors")]
    assert len(files) >= 2 and {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o666 & ~mask)}


def test_init_from_a_hugging_face_directory_starts_from_its_weights(gpt2_export, tiny_data, tmp_path):
    """The first loss of a run started from the export is the exported model's loss on that batch."""
    from transformers import AutoModelForCausalLM

    from megatrain.config import DataConfig
    from megatrain.data.dataset import build_loader

    _, out = gpt2_export
    run = tmp_path / "imported"
    result = cli("launcher.train", *ARGS, *GPT2, f"data.path={tiny_data}", f"run.dir={run}", "train.steps=1",
                 "parallel.tp=2", f"train.init_from={out}", launcher=torchrun(2))
    assert result.returncode == 0, result.stderr
    assert f"initialised the model from {out}" in result.stderr
    loader = build_loader(DataConfig(path=str(tiny_data)), split="train", seq_len=64,
                          micro_batch_size=2, dp_rank=0, dp_size=1, seed=1234)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = sum(hf(b["input_ids"]).logits.flatten(0, 1).log_softmax(-1).gather(
            1, b["labels"].reshape(-1, 1)).mean().neg().item() for b in (loader.next_batch(), loader.next_batch())) / 2
    assert losses(run)[1] == pytest.approx(expected, rel=1e-5)


def test_init_from_a_different_model_names_the_keys_that_differ(gpt2_export, tiny_data, tmp_path):
    _, out = gpt2_export
    result = cli("launcher.train", *ARGS, *GPT2, "model.d_model=128", f"data.path={tiny_data}",
                 f"run.dir={tmp_path / 'run'}", "train.steps=1", f"train.init_from={out}")
    assert result.returncode == 2
    assert "model.d_model=128 but" in result.stderr and "has 64" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before any process group, any file


@pytest.mark.parametrize("model, key", [
    (dict(norm="layernorm", position="rope", activation="gelu"), "model.position=rope"),
    (dict(norm="layernorm", position="learned", activation="gelu", n_heads=4, n_kv_heads=2), "model.n_kv_heads=2"),
])
def test_models_hugging_face_cannot_represent_fail_naming_the_key(model, key):
    with pytest.raises(ValueError, match=key):
        architecture(ModelConfig(**model))


def test_export_into_a_non_empty_dir_is_refused_unless_export_overwrite(gpt2_export, tmp_path):
    checkpoint, _ = gpt2_export
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    result = cli("launcher.export", f"export.checkpoint={checkpoint}", f"export.output={out}")
    assert result.returncode == 2, result.stderr
    assert f"export.output={out} exists and is not empty" in result.stderr and "export.overwrite=true" in result.stderr
    assert [p.name for p in out.iterdir()] == ["config.json"] and '"mine"' in (out / "config.json").read_text()
    _export((f"export.checkpoint={checkpoint}", "export.overwrite=true"), out)
    assert '"mine"' not in (out / "config.json").read_text() and (out / "model.safetensors").is_file()


def test_export_refuses_non_finite_weights_naming_the_tensor_and_checkpoint(gpt2_export, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    checkpoint = tmp_path / "diverged"
    shutil.copytree(gpt2_export[0], checkpoint)
    for shard in (checkpoint / "portable").glob("*.safetensors"):  # one per pipeline stage
        with safe_open(str(shard), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        if "blocks.0.mlp.up.weight" in tensors:
            break
    tensors["blocks.0.mlp.up.weight"][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata=meta)
    out = tmp_path / "hf"
    result = cli("launcher.export", f"export.checkpoint={checkpoint}", f"export.output={out}")
    assert result.returncode == 2, result.stderr
    assert "blocks.0.mlp.up.weight" in result.stderr and str(checkpoint) in result.stderr, result.stderr
    assert "NaN or inf" in result.stderr and not out.exists()


def test_init_from_a_directory_of_pickled_weights_is_refused_naming_the_file(gpt2_export, tiny_data, tmp_path):
    _, out = gpt2_export
    hostile = tmp_path / "hf"
    hostile.mkdir()
    shutil.copy(out / "config.json", hostile)
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"x": Payload()}, hostile / "pytorch_model.bin")
    result = cli("launcher.train", *ARGS, *GPT2, f"data.path={tiny_data}", f"run.dir={tmp_path / 'run'}",
                 "train.steps=1", f"train.init_from={hostile}")
    assert result.returncode == 2, result.stderr
    assert f"{hostile / 'pytorch_model.bin'} is a pickle, which megatrain never loads" in result.stderr
    assert not marker.exists() and not (tmp_path / "run").exists()
