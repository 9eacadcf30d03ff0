"""train.cooldown_rule: cooldown branches at multiples of a tokens-per-parameter ratio, checked before a run."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from megatrain.config import ConfigError, cooldown_tokens, validate
from megatrain.scaling.flops import param_counts
from tests.unit.test_config_lists import composed

WSD = ("optim.schedule=wsd", "train.global_batch_size=16", "train.seq_len=64", "model=tiny", "model.vocab_size=512")


def test_the_rule_gives_multiples_of_tokens_per_parameter_of_the_model() -> None:
    cfg = composed(*WSD, "train.steps=70000", "train.cooldowns=[65536]", "train.cooldown_rule.tokens_per_param=20")
    validate(cfg, 1)
    counts = param_counts(cfg.model)
    tokens = cooldown_tokens(cfg, asdict(counts))
    assert tokens == [65536, *(m * 20 * counts.total for m in (0.5, 1, 2, 4))]  # explicit ones kept, rule added
    cfg.train.cooldown_rule.params = "non_embedding"
    assert cooldown_tokens(cfg, asdict(counts))[1:] == [m * 20 * counts.non_embedding for m in (0.5, 1, 2, 4)]
    cfg.train.cooldown_rule.tokens_per_param = None
    assert cooldown_tokens(cfg, asdict(counts)) == [65536]


def test_a_rule_branch_longer_than_the_run_is_refused_naming_the_rule() -> None:
    cfg = composed(*WSD, "train.steps=100", "train.cooldown_rule.tokens_per_param=20")
    validate(cfg, 1)  # the rule's keys are fine; its lengths need the sized model
    with pytest.raises(ConfigError, match=r"^train.cooldown_rule 0.5x 20 tokens per parameter x .* total "
                                          r"parameters = .* steps: its decay must start within the stable phase"):
        cooldown_tokens(cfg, asdict(param_counts(cfg.model)))


@pytest.mark.parametrize(("overrides", "message"), [
    (("train.cooldown_rule.tokens_per_param=20", "optim.schedule=cosine"), "need optim.schedule=wsd"),
    (("train.cooldown_rule.tokens_per_param=-1",), r"^train.cooldown_rule.tokens_per_param=-1.0 must be a positive"),
    (("train.cooldown_rule.tokens_per_param=20", "train.cooldown_rule.multiples=[1,0]"),
     r"^train.cooldown_rule.multiples=\[1.0, 0.0\]: give one or more positive"),
    (("train.cooldown_rule.tokens_per_param=20", "train.cooldown_rule.params=embedding"),
     r"^train.cooldown_rule.params='embedding' is not allowed"),
    (("train.cooldown_rule.tokens_per_param=20", "train.fork_from=x", "optim.resume_schedule=stretch"),
     "a branch forks no branches of its own"),
])
def test_bad_rules_are_refused_before_anything_runs(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(composed(*WSD, "train.steps=100", *overrides), 1)


def test_a_wsd_sweep_refuses_a_rule_it_would_forward_to_its_branches() -> None:
    from megatrain.scaling import wsd

    cfg = composed(*WSD, "train.cooldown_rule.tokens_per_param=20", "sweep.wsd=true")
    with pytest.raises(ConfigError, match="sweep.wsd=true takes the branches' token counts from sweep.budgets"):
        wsd.split(cfg, [])
