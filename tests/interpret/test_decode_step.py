"""FusedDecoder's sampling on the split-KV decode kernels, under the interpreter (fp32): the same tokens as the main
kernel, the decode kernels run in the per-token steps, a step makes no host sync, and it traces whole under
torch.compile(fullgraph=True) with the decode op in the graph (what compile_sampler's CUDA graphs need)."""
import collections
import functools
import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fused_parity import CountOps, randomized_pair  # noqa: E402

import igpt_kernels  # noqa: E402
from igpt import IGPTConfig  # noqa: E402
from igpt.sampling import KVCache, compile_sampler, decode_token  # noqa: E402
from igpt_kernels.attention import launch_counts  # noqa: E402

# the modules (igpt_kernels re-exports functions of the same names)
attention_module, embedding_module, norm_module = (importlib.import_module(f"igpt_kernels.{name}")
                                                   for name in ("attention", "embedding", "norm"))

PROMPT = torch.tensor([[5, 6]])
SYNC = "aten._local_scalar_dense.default"  # what .item(), int(t), bool(t) dispatch to: a device-to-host copy


def tiny_model():
    # the "tiny" preset's widths (4 layers, 4 heads of D = 32) on 4x4 images: 16 positions keep the interpreter quick
    return randomized_pair(IGPTConfig.preset("tiny", resolution=4))[1]


def sample(model):
    return model.generate(2, prompt=PROMPT, generator=torch.Generator().manual_seed(0))


@functools.lru_cache(maxsize=1)
def eager_split_kv_sample():
    return sample(tiny_model())


@pytest.fixture
def split_kv_off(monkeypatch):
    def off():  # FusedOps.attention imports igpt_kernels.attention at each call
        monkeypatch.setattr(igpt_kernels, "attention", functools.partial(attention_module.attention, split_kv=False))
    return off


def test_sampling_draws_the_same_tokens_with_and_without_split_kv(split_kv_off):
    model = tiny_model()
    n_layer, n_ctx = model.cfg.n_layer, model.cfg.n_ctx
    before = dict(launch_counts)
    with_split = sample(model)
    # every pass of sampling has <= 16 queries: the prompt pass (3) and each one-token step run the decode kernels
    steps = n_ctx - PROMPT.shape[1]
    assert launch_counts["attn_decode_split"] - before.get("attn_decode_split", 0) == n_layer * steps
    assert launch_counts["attn_decode_combine"] - before.get("attn_decode_combine", 0) == n_layer * steps
    assert launch_counts["attn_fwd"] == before.get("attn_fwd", 0)

    split_kv_off()
    before = dict(launch_counts)
    without = sample(model)
    assert launch_counts["attn_decode_split"] == before.get("attn_decode_split", 0)
    assert launch_counts["attn_fwd"] - before.get("attn_fwd", 0) == n_layer * steps
    assert torch.equal(with_split, without)
    assert torch.equal(with_split, eager_split_kv_sample())  # the same model and seed give the same draws


def _prefilled(model, n=2):
    cfg = model.cfg
    cache = KVCache(cfg.n_layer, n, cfg.n_head, cfg.n_ctx, cfg.head_dim, "cpu", torch.float32)
    model.decode(model.embed(torch.tensor([[1, 2, 3], [4, 5, 6]])), cache, last_only=True)
    return cache


@torch.no_grad()
def test_decode_step_has_no_host_sync(monkeypatch):
    model = tiny_model()
    cache = _prefilled(model)
    token = torch.tensor([[7], [8]])
    with CountOps() as step:
        decode_token(model, token, cache)
    assert step.ops["igpt.attention_decode.default"] == model.cfg.n_layer, step.ops
    assert step.ops["igpt.palette_embedding_fwd.default"] == 1
    assert step.ops[SYNC] == 0, f"the decode step syncs with the device: {step.ops}"

    # The counter sees a sync where there is one: the same step with the embedding's id range check on.
    with CountOps() as checked:
        model.decode(model.embed(token, pos_offset=cache.length, shift=False), cache)
    assert checked.ops[SYNC] > 0

    # The mode sees a custom op as one call: the launchers inside the step's ops, run under it directly, sync neither.
    launchers = {"attention": (attention_module, "_decode_forward"), "norm": (norm_module, "_forward"),
                 "embedding": (embedding_module, "_forward")}
    seen = collections.Counter()
    for name, (module, attr) in launchers.items():
        def counted(*args, _inner=getattr(module, attr), _name=name, **kwargs):
            with CountOps() as inner:
                out = _inner(*args, **kwargs)
            seen[_name] += 1
            assert inner.ops[SYNC] == 0, f"{_name} launcher syncs: {inner.ops}"
            assert sum(inner.ops.values()) > 0, f"{_name}: the counter saw nothing inside the launcher"
            return out
        monkeypatch.setattr(module, attr, counted)
    decode_token(model, token, cache)
    assert set(seen) == set(launchers), seen


@torch.no_grad()
def test_compiled_decode_step_traces_the_decode_op_whole():
    # What compile_sampler compiles (the one-token step, decode_token), fullgraph=True: any graph break is an
    # error; dynamic=True as compile_sampler, two steps (the cache grows). A recording backend runs the captured
    # graph as is (Inductor's own compile adds nothing to check here).
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager = tiny_model()
    compiled = compile_sampler(tiny_model(), freeze=False, fullgraph=True, backend=recording_backend)
    torch._dynamo.reset()
    eager_cache, compiled_cache = _prefilled(eager), _prefilled(compiled.model)
    before = launch_counts["attn_decode_split"]
    for token in (torch.tensor([[7], [8]]), torch.tensor([[9], [10]])):
        torch.testing.assert_close(compiled.decode_token(token, compiled_cache),
                                   decode_token(eager, token, eager_cache), rtol=1e-5, atol=1e-5)
    assert graphs, "torch.compile captured no graph"
    targets = [node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.igpt.attention_decode.default) == compiled.model.cfg.n_layer * len(graphs), targets
    assert torch.ops.igpt.attention_fwd.default not in targets
    assert launch_counts["attn_decode_split"] - before == 2 * 2 * compiled.model.cfg.n_layer  # both models, two steps
