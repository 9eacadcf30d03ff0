"""Bad configs fail in seconds, before any process group, naming the key and what is allowed."""

import pytest

from tests.e2e.conftest import ROOT, TRAIN, cli, torchrun


@pytest.mark.parametrize("override, message", [
    ("train.stepz=5", "train.stepz"),
    ("train.steps=many", "train.steps"),
    ("train.global_batch_size=7", "train.global_batch_size=7 is not a multiple of train.micro_batch_size"),
    ("parallel.tp=3", "model.n_heads=4 is not divisible by parallel.tp=3"),
    ("train.precision=fp16", "train.precision='fp16' is not allowed; choose one of bf16, fp32"),
])
def test_bad_config_exits_before_training_and_names_the_key(tmp_path, override, message):
    result = cli("launcher.train", *TRAIN, f"run.dir={tmp_path / 'run'}", f"data.path={tmp_path}", override)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "run").exists()


def _one_line_error(result, *needles: str) -> None:
    """The README's contract: exit 2, one line `error: ...` naming the key and what is allowed."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


STEPZ = ("train.stepz=5", ("train.stepz", "did you mean train.steps", "eval_steps"))
PRESET = ("model=gpt9", ("model=gpt9", "no such preset", "tiny", "llama-7b"))


@pytest.mark.parametrize("launcher, override, needles", [
    ("launcher.train", *STEPZ),
    ("launcher.train", "trian.steps=5", ("trian", "did you mean train", "optim")),
    ("launcher.train", "+train.extra=1", ("train.extra", "the keys of train are")),
    ("launcher.train", "train.steps=many", ("train.steps", "'many'", "Integer")),
    ("launcher.train", *PRESET),
    ("launcher.train", "train.steps=[1", ("train.steps=[1", "override_grammar")),
    *[(launcher, *case) for launcher in ("launcher.plan", "launcher.prepare", "launcher.export",
                                         "launcher.fit_scaling", "launcher.sweep") for case in (STEPZ, PRESET)],
])
def test_hydra_errors_are_one_line_exit_2_in_every_launcher(tmp_path, launcher, override, needles):
    _one_line_error(cli(launcher, f"run.dir={tmp_path / 'run'}", override), *needles)


@pytest.mark.parametrize("override, needles", [
    ("optim.lr=0", ("optim.lr=0.0", "finite number > 0")),
    ("optim.lr=nan", ("optim.lr=nan",)),
    ("train.eval_steps=0", ("train.eval_steps=0", "train.eval_interval=0 turns eval off")),
    ("train.global_batch_size=-4", ("train.global_batch_size=-4", "must be positive")),
    ("plan.num_gpus=0", ("plan.num_gpus=0", "must be positive")),
    ("train.on_divergence=retry", ("train.on_divergence='retry'", "stop", "rollback")),
    ("train.spike_factor=0.5", ("train.spike_factor=0.5", "0 (off) or a finite number > 1")),
    ("train.spike_window=0", ("train.spike_window=0", ">= 1")),
    ("model.attention_backend=flash", ("model.attention_backend='flash'", "auto, math")),
    ("parallel.ep=2", ("parallel.ep=2", "needs a mixture-of-experts model")),
    ("parallel.zero3_gather=all", ("parallel.zero3_gather='all'", "block, model")),
    ("parallel.zero3_gather=model", ("parallel.zero3_gather=model with parallel.zero_stage=1", "zero_stage=3")),
])
def test_bad_values_are_refused_by_the_planner_with_the_key(override, needles):
    _one_line_error(cli("launcher.plan", "model=tiny", "model.vocab_size=512", override), *needles)


@pytest.mark.parametrize("override, needles", [
    ("optim.lr=nan", ("optim.lr=nan", "finite number > 0")),
    ("run.dir=", ("run.dir is empty",)),
])
def test_bad_values_are_refused_by_train_before_anything_is_written(tmp_path, override, needles):
    result = cli("launcher.train", *TRAIN, f"run.dir={tmp_path / 'run'}", f"data.path={tmp_path}", override)
    _one_line_error(result, *needles)
    assert not (tmp_path / "run").exists() and not list(ROOT.glob("config.yaml"))


def test_resume_from_a_non_checkpoint_is_refused_by_name(tiny_data, tmp_path):
    not_checkpoint, wrong_meta = tmp_path / "photos", tmp_path / "step_00000002"
    not_checkpoint.mkdir()
    wrong_meta.mkdir()
    (wrong_meta / "meta.json").write_text("[1, 2]")  # valid JSON of the wrong type
    for path, why in ((not_checkpoint, "no meta.json"), (wrong_meta, "meta.json is unreadable")):
        result = cli("launcher.train", *TRAIN, f"run.dir={tmp_path / 'run'}", f"data.path={tiny_data}",
                     f"train.resume={path}")
        _one_line_error(result, f"train.resume={path} is not a checkpoint", why)
    assert not (tmp_path / "run").exists()


def test_under_torchrun_the_error_is_printed_once(tmp_path):
    result = cli("launcher.train", *TRAIN, f"run.dir={tmp_path / 'run'}", f"data.path={tmp_path}", "optim.lr=0",
                 launcher=torchrun(2))
    assert result.returncode != 0
    assert result.stderr.count("error: optim.lr=0.0 must be a finite number > 0") == 1, result.stderr


def test_plan_exits_3_when_nothing_fits_and_fit_errors_are_one_line():
    small_gpu = ("model=tiny", "model.vocab_size=512", "plan.gpu_memory_gb=0.001")
    result = cli("launcher.plan", *small_gpu)
    assert result.returncode == 3 and "DOES NOT FIT" in result.stdout
    result = cli("launcher.plan", *small_gpu, "plan.search=true", "plan.num_gpus=2")
    assert result.returncode == 3 and "no layout of tiny fits" in result.stdout
    assert cli("launcher.plan", "model=tiny", "model.vocab_size=512").returncode == 0
    _one_line_error(cli("launcher.fit_scaling", "fit.input=[]"), "fit.input is empty")


def test_a_model_too_large_for_this_host_is_refused_with_the_shortfall_before_anything_is_built(tiny_data, tmp_path):
    # llama-7b in fp32 in one CPU process: ~16 bytes per parameter, far beyond this host's memory
    args = [a for a in TRAIN if not a.startswith("model=")]
    result = cli("launcher.train", *args, "model=llama-7b", "train.precision=fp32", f"data.path={tiny_data}",
                 f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train.memory_check: the planner puts the peak per rank at" in result.stderr
    assert "short by" in result.stderr and "train.memory_check=warn starts anyway" in result.stderr
    assert not (tmp_path / "run").exists()
