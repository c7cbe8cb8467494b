"""Weight-for-weight parity with Hugging Face `ImageGPT`, both directions."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling, ImageGPTForImageClassification  # noqa: E402

from igpt import Decoder, IGPTConfig  # noqa: E402
from igpt.convert import from_hf, hf_config_kwargs, hf_input_ids, to_hf  # noqa: E402

torch.set_num_threads(2)


def hf_config(**kw):
    base = dict(vocab_size=513, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)  # HF's dropout defaults: eval() must switch them off
    return ImageGPTConfig(**{**base, **kw})


def fill_random(model, seed=0, zero_biases=False):
    """HF initialises biases to 0 and norm gains to 1, which would hide transposes and swaps: randomise all."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            if zero_biases and name.endswith(".bias"):
                p.zero_()
    return model.eval()


def ids(n_ctx, B=3, seed=0):
    return torch.randint(0, 512, (B, n_ctx), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("with_bias", [True, False])
def test_from_hf_logits_match(with_bias):
    hf = fill_random(ImageGPTForCausalImageModeling(hf_config()), zero_biases=not with_bias)
    model = from_hf(hf).eval()
    assert model.cfg.bias is with_bias and model.cfg.resolution == 4
    x = ids(16)
    with torch.no_grad():
        ours = model(x)
        theirs = hf(hf_input_ids(x)).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # SOS is HF's wte row 512
    assert torch.equal(model.sos, hf.transformer.wte.weight[512])


def test_nonzero_biases_are_never_dropped():
    hf = fill_random(ImageGPTForCausalImageModeling(hf_config()))
    with pytest.raises(ValueError, match="non-zero biases"):
        from_hf(hf, bias=False)


@pytest.mark.parametrize("bias", [True, False])
def test_to_hf_loads_strictly_and_matches(bias):
    cfg = IGPTConfig(n_layer=2, n_embd=32, n_head=4, resolution=4, bias=bias)
    model = fill_random(Decoder(cfg), seed=1)
    hf = ImageGPTForCausalImageModeling(ImageGPTConfig(**hf_config_kwargs(cfg))).eval()
    hf.load_state_dict(to_hf(model), strict=True)
    x = ids(16)
    with torch.no_grad():
        torch.testing.assert_close(hf(hf_input_ids(x)).logits, model(x), rtol=0, atol=1e-5)
    # and back again, bit for bit
    back = from_hf(hf, bias=bias)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_classifier_parity_both_ways():
    hf = fill_random(ImageGPTForImageClassification(hf_config(num_labels=7)), seed=2)
    model = from_hf(hf).eval()
    assert model.cfg.n_classes == 7
    x = ids(16)
    with torch.no_grad():
        ours = model(x, return_classes=True).class_logits
        theirs = hf(hf_input_ids(x)).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    hf2 = ImageGPTForImageClassification(ImageGPTConfig(**hf_config_kwargs(model.cfg))).eval()
    hf2.load_state_dict(to_hf(model, classifier=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(hf2(hf_input_ids(x)).logits, ours, rtol=0, atol=1e-5)
    with torch.no_grad():
        model.clf_head.bias.fill_(0.5)
    with pytest.raises(ValueError, match="classifier bias"):
        to_hf(model, classifier=True)


def test_unsupported_hf_configs_are_rejected():
    for bad in (dict(activation_function="gelu"), dict(n_positions=20), dict(scale_attn_by_inverse_layer_idx=True)):
        with pytest.raises(ValueError, match="cannot be represented"):
            from_hf(ImageGPTForCausalImageModeling(hf_config(**bad)))
