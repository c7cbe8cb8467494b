"""The split-KV decode path on CPU: its launch plan (pure functions), the split_kv and check_range arguments, and that
sampling checks token ids once rather than at every step (numerics: tests/interpret/test_attention_decode.py)."""
import importlib.util
import types

import pytest
import torch

from fused_parity import CountOps, randomized_pair, tiny_config
from igpt_kernels import attention, attention_reference, palette_embedding

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
SYNC = "aten._local_scalar_dense.default"


@needs_triton
@pytest.mark.parametrize("batch_heads", [1, 4, 32, 512])
@pytest.mark.parametrize("n_k", [1, 15, 16, 17, 97, 1024, 4096])
@pytest.mark.parametrize("block_n", [16, 64])
@pytest.mark.parametrize("target", [3, 528])
def test_split_plan(batch_heads, n_k, block_n, target):
    from igpt_kernels._decode_triton import split_plan

    splits, per_split = split_plan(batch_heads, n_k, block_n, target)
    tiles = -(-n_k // block_n)
    assert per_split % block_n == 0 and per_split >= block_n  # whole tiles, at least one
    assert (splits - 1) * per_split < n_k <= splits * per_split  # every key covered, no empty split
    assert 1 <= splits <= tiles
    wanted = min(tiles, -(-target // batch_heads))
    assert splits * 2 > wanted  # at least half the programs asked for (splits are whole tiles)


@needs_triton
def test_split_plan_fills_an_h100_for_igpt_s():
    # iGPT-S (8 heads), 4 images, 1024 cached keys, 64-key tiles, 4 waves over 132 SMs: 16 splits of one tile each,
    # 512 programs instead of the 32 of a grid over (b, h) alone.
    from igpt_kernels._decode_triton import WAVES, split_plan

    assert split_plan(4 * 8, 1024, 64, WAVES * 132) == (16, 64)


@needs_triton
def test_sm_count_is_queried_once_per_device(monkeypatch):
    from igpt_kernels import _decode_triton as T

    queries = []

    def properties(index):
        queries.append(index)
        return types.SimpleNamespace(multi_processor_count=132 + index)

    monkeypatch.setattr(T, "_sm_counts", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert [T.sm_count("cuda"), T.sm_count("cuda:0"), T.sm_count(torch.device("cuda", 1)), T.sm_count("cuda:1")] == \
        [132, 132, 133, 133]
    assert queries == [0, 1]


@needs_triton
def test_decode_config_is_defined_for_every_launchable_call():
    from igpt_kernels._decode_triton import decode_config

    for arch in (80, 90):
        for element_size in (2, 4):
            for d in (1, 16, 17, 32, 40, 64, 96, 128):
                block_n, warps, stages = decode_config(arch, element_size, d)
                assert block_n >= 16 and warps in (4, 8) and stages >= 1


def _qkv(n_q=1, n_k=20, d=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 2, n_q, d, generator=g), torch.randn(1, 2, n_k, d, generator=g), \
        torch.randn(1, 2, n_k, d, generator=g)


def test_split_kv_argument():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="split_kv must be True, False or None"):
        attention(q, k, v, causal=True, split_kv="yes")
    with pytest.raises(ValueError, match="at most 16 queries"):
        attention(*_qkv(n_q=17), causal=True, split_kv=True)
    with pytest.raises(ValueError, match="no backward"):
        attention(q.requires_grad_(), k, v, causal=True, split_kv=True)
    with torch.no_grad():  # the CPU reference path accepts every valid choice
        ref = attention_reference(q, k, v, causal=True)
        for split_kv in (None, True, False):
            torch.testing.assert_close(attention(q, k, v, causal=True, split_kv=split_kv), ref)


def test_palette_embedding_check_range():
    wte, wpe = torch.randn(8, 4), torch.randn(6, 4)
    ids = torch.tensor([[1, 2, 7]])
    with pytest.raises(TypeError, match="check_range must be True or False"):
        palette_embedding(ids, wte, wpe, check_range=1)
    with pytest.raises(ValueError, match="ids must lie in 0"):
        palette_embedding(ids + 1, wte, wpe)
    with CountOps() as checked:
        h_checked, _ = palette_embedding(ids, wte, wpe)
    with CountOps() as unchecked:
        h, _ = palette_embedding(ids, wte, wpe, check_range=False)
    assert checked.ops[SYNC] > 0 and unchecked.ops[SYNC] == 0
    torch.testing.assert_close(h, h_checked)


@pytest.mark.parametrize("resolution", [3, 4])
def test_fused_generate_checks_token_ids_once(resolution):
    # The prompt's range check (Decoder._check_ids: its min and max) is the only host sync of sampling, however many
    # tokens are drawn: the per-token steps embed without the embedding's own check.
    _, fused = randomized_pair(tiny_config(resolution=resolution))
    with CountOps() as mode:
        fused.generate(2, prompt=torch.tensor([[5, 6]]), generator=torch.Generator().manual_seed(0))
    assert mode.ops["aten.multinomial.default"] == resolution ** 2 - 2  # the counter sees every step
    assert mode.ops[SYNC] == 2, mode.ops[SYNC]
