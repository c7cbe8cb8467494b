"""FusedDecoder vs Decoder with the Triton kernels running under the interpreter (fp32): logits and every gradient,
AR and BERT, random and HF-imported weights; asserts the attention, norm and embedding kernels really ran."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fused_parity import assert_same_logits_and_grads, random_palette, randomized_pair, tiny_config  # noqa: E402

from igpt import FusedDecoder  # noqa: E402
from igpt_kernels.attention import launch_counts as attention_launches  # noqa: E402
from igpt_kernels.embedding import launch_counts as embedding_launches  # noqa: E402
from igpt_kernels.norm import launch_counts as norm_launches  # noqa: E402


def launches():
    return tuple(sum(c.values()) for c in (attention_launches, norm_launches, embedding_launches))


def assert_kernels_ran(before):
    after = launches()
    assert all(a > b for a, b in zip(after, before)), f"kernel launches (attention, norm, embedding): {before} -> {after}"


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_fused_matches_eager_under_interpreter(objective):
    cfg = tiny_config(objective=objective)
    eager, fused = randomized_pair(cfg)
    ids = torch.randint(0, 512, (2, cfg.n_ctx), generator=torch.Generator().manual_seed(1))
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.3 if objective == "bert" else None
    before = launches()
    assert_same_logits_and_grads(eager, fused, ids, mask)
    assert_kernels_ran(before)


def test_fused_matches_hf_imported_weights():
    transformers = pytest.importorskip("transformers")
    from igpt.convert import from_hf, hf_input_ids

    hf = transformers.ImageGPTForCausalImageModeling(transformers.ImageGPTConfig(
        vocab_size=513, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    eager = from_hf(hf)
    fused = FusedDecoder(eager.cfg)
    fused.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 512, (2, 16), generator=g)
    before = launches()
    assert_same_logits_and_grads(eager, fused, ids)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), hf(hf_input_ids(ids)).logits, rtol=1e-5, atol=2e-5)
    assert_kernels_ran(before)


def test_fused_pixels_quantize_inside_the_kernel():
    cfg = tiny_config()
    eager, fused = randomized_pair(cfg)
    pal = random_palette()
    eager.attach_palette(pal)
    fused.attach_palette(pal)
    pixels = torch.randint(0, 256, (2, cfg.n_ctx, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    before = embedding_launches["embed_fwd"]
    torch.testing.assert_close(fused.loss(pixels=pixels), eager.loss(pixels=pixels), rtol=1e-5, atol=1e-5)
    assert embedding_launches["embed_fwd"] > before


def test_fused_generate_with_kv_cache_under_interpreter():
    cfg = tiny_config()
    eager, fused = randomized_pair(cfg)
    before = attention_launches["attn_decode_split"]  # sampling's passes have <= 16 queries: the split-KV kernels
    a = eager.generate(2, prompt=torch.tensor([[5, 6]]), generator=torch.Generator().manual_seed(0))
    b = fused.generate(2, prompt=torch.tensor([[5, 6]]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)  # fp32 rounding may differ, but not enough to flip a draw on this tiny model
    assert attention_launches["attn_decode_split"] > before
