"""One FLOP model, one peak table, one bf16 rule: the trainer and the benchmarks take them from igpt.flops, so their
MFUs for the same step are the same number."""
import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import igpt.train
from igpt import Decoder, IGPTConfig, flops

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    """bench/common.py, train.py and peer.py imported in this process (they import `common` by file name)."""
    sys.path.insert(0, str(BENCH))
    try:
        modules = {}
        for name in ("common", "train", "peer"):
            spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
            modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(modules[name])
    finally:
        sys.path.remove(str(BENCH))
    return argparse.Namespace(**modules)


def test_train_flops_counts_by_hand():
    """FLOP model by hand for 2 layers x 32 wide, 16 tokens, batch 3: the matmul parameters are the blocks' linears
    (12 C^2 per layer, no biases) and the head (C x 512); the attention term is 12 L N^2 C B, halved when causal."""
    cfg = IGPTConfig(n_layer=2, n_embd=32, n_head=2, resolution=4)
    model = Decoder(cfg)
    P = 2 * 12 * 32**2 + 32 * 512
    assert flops.matmul_params(cfg) == P
    assert sum(p.numel() for name, p in model.named_parameters()
               if p.dim() == 2 and not name.startswith(("wte.", "wpe."))) == P  # what the model really multiplies
    attention = 12 * 2 * 16**2 * 32 * 3
    assert flops.train_flops(cfg, 3 * 16, causal=False) == 6 * P * 3 * 16 + attention
    assert flops.train_flops(cfg, 3 * 16, causal=True) == 6 * P * 3 * 16 + attention / 2


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 PCIe", 756), ("NVIDIA H100 80GB HBM3", 989),
                                          ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835),
                                          ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312),
                                          ("NVIDIA L40S", 362), ("NVIDIA L4", 121), ("Tesla V100-SXM2-16GB", None)])
def test_gpu_peaks_by_device_name(name, tflops):
    assert flops.gpu_bf16_peak(name) == (None if tflops is None else tflops * 1e12)


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_trainer_and_bench_mfu_agree(bench, monkeypatch, objective):
    """The same config, batch and step time on an H100 PCIe: the trainer's MFU (as its loop computes it) equals
    bench/train.py's (as its main computes it). Before igpt.flops the trainer divided by 989 TFLOP/s there, the
    benchmark by 756, and peer.py's count never halved the causal attention term."""
    name = "NVIDIA H100 PCIe"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cfg = IGPTConfig.preset("tiny", resolution=16, objective=objective)
    batch, seconds, cuda = 8, 0.125, torch.device("cuda")
    tokens = batch * cfg.n_ctx

    trainer_peak = igpt.train.device_peak_flops(cuda)
    trainer_mfu = igpt.train.mfu(cfg, tokens, seconds, trainer_peak)
    bench_peak, _ = bench.train.peak_flops(argparse.Namespace(device=cuda, precision="bf16"), {"device": name})
    bench_mfu = bench.train.mfu(cfg, tokens, seconds, bench_peak)
    assert trainer_peak == bench_peak == 756e12
    assert trainer_mfu == bench_mfu
    useful = 6 * flops.matmul_params(cfg) * tokens + 12 * cfg.n_layer * cfg.n_ctx * cfg.n_embd * tokens * (
        0.5 if objective == "ar" else 1.0)
    assert trainer_mfu == pytest.approx(useful / seconds / 756e12, rel=1e-12)
    # peer.py counts the full score matrix on purpose (ours and HF alike), from the same function
    assert bench.peer.train_flops is flops.train_flops and bench.peer.matmul_params is flops.matmul_params


def test_one_source_for_each_fact(bench):
    """No second peak table, FLOP formula or bf16 rule in the trainer or the benchmarks."""
    assert bench.common.gpu_bf16_peak is bench.train.gpu_bf16_peak is flops.gpu_bf16_peak
    assert bench.common.cpu_bf16_flags is flops.cpu_bf16_flags and bench.common.DTYPES is flops.PRECISION_DTYPES
    assert bench.train.mfu is igpt.train.mfu is flops.mfu and bench.train.train_flops is flops.train_flops
    for module in (igpt.train, bench.common, bench.train, bench.peer):
        source = Path(module.__file__).read_text()
        assert "989" not in source and '"amx_bf16"' not in source, module.__file__
        assert "12 * cfg.n_layer" not in source and "12 * L" not in source, module.__file__


def test_native_bf16_rule(monkeypatch):
    assert flops.has_native_bf16("cuda")
    monkeypatch.setattr(flops, "cpu_bf16_flags", lambda: [])
    assert not flops.has_native_bf16("cpu") and igpt.train.pick_precision("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(flops, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    assert flops.has_native_bf16(torch.device("cpu"))
    assert igpt.train.pick_precision("auto", torch.device("cpu")) == torch.bfloat16
