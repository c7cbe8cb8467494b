import pytest

from igpt import IGPTConfig
from igpt.config import PRESETS


@pytest.mark.parametrize("name, layers, width, heads, params_m", [
    ("s", 24, 512, 8, 76), ("m", 36, 1024, 8, 455), ("l", 48, 1536, 16, 1400), ("xl", 60, 3072, 16, 6800),
])
def test_presets_match_the_paper(name, layers, width, heads, params_m):
    cfg = IGPTConfig.preset(name)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_ctx) == (layers, width, heads, 1024)
    # the paper's parameter counts, within the rounding of its table (theirs include 48x48 contexts etc.)
    assert cfg.num_params() == pytest.approx(params_m * 1e6, rel=0.06)


def test_tiny_is_ci_sized_and_overrides_apply():
    cfg = IGPTConfig.preset("tiny", resolution=48, objective="bert", n_classes=10)
    assert 2 <= cfg.n_layer <= 4 and 64 <= cfg.n_embd <= 128
    assert (cfg.n_ctx, cfg.objective, cfg.n_classes, cfg.causal) == (2304, "bert", 10, False)
    assert IGPTConfig.preset("L").head_dim == 96 and IGPTConfig.preset("xl").head_dim == 192
    assert set(PRESETS) == {"tiny", "s", "m", "l", "xl"}


def test_dict_round_trip():
    cfg = IGPTConfig.preset("s", bias=True, n_classes=10)
    assert IGPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown IGPTConfig fields"):
        IGPTConfig.from_dict({**cfg.to_dict(), "dropout": 0.1})


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_embd=100, n_head=8), "not divisible by n_head"),
    (dict(n_embd=1024, n_head=2), "exceeds 256"),
    (dict(objective="mlm"), "objective must be one of"),
    (dict(resolution=0), "resolution must be a positive int"),
    (dict(n_layer=2.5), "n_layer must be a positive int"),
    (dict(n_classes=1), "n_classes"),
    (dict(norm_eps=0), "norm_eps"),
])
def test_bad_configs_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IGPTConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="choose one of"):
        IGPTConfig.preset("huge")
