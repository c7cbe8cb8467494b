"""igpt.memory's per-block saved bytes for the GPU code path (fused norm + flash attention), checked with the Triton
kernels running under the interpreter: what autograd saves for one FusedDecoder block, unique storages, parameters
left out. fp16 stands in for bf16 (same bytes; the interpreter's bf16 dot is broken)."""
import pytest
import torch

from igpt import FusedDecoder, IGPTConfig
from igpt.memory import measure_saved_bytes, saved_activation_bytes
from igpt_kernels.attention import launch_counts as attention_launches
from igpt_kernels.norm import launch_counts as norm_launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_block_saves_what_the_estimate_says(dtype):
    cfg = IGPTConfig.preset("tiny", resolution=8)
    torch.manual_seed(0)
    model = FusedDecoder(cfg).to(dtype)
    h = torch.randn(2, cfg.n_ctx, cfg.n_embd, dtype=dtype, requires_grad=True)
    before = (attention_launches["attn_fwd"], norm_launches["norm_fwd"])
    measured, _ = measure_saved_bytes(lambda: model.blocks[0](h), exclude=list(model.parameters()))
    assert attention_launches["attn_fwd"] > before[0] and norm_launches["norm_fwd"] > before[1]
    per_block = saved_activation_bytes(cfg, 2, param_dtype=dtype, norm="fused", attention="flash")["per_block"]
    assert sum(per_block.values()) == measured, per_block
