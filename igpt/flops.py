"""The training FLOP model and the hardware facts MFU needs: dense bf16 GPU peaks by device name, native-bf16
detection, precision names. The trainer and every benchmark take them from here, so their MFUs can be compared."""
from __future__ import annotations

from pathlib import Path

import torch

from igpt.config import IGPTConfig

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s, matched in order against the
# device name (the more specific names first: "H100 PCIe" before "H100", "L40S" before "L4"). A GPU not listed gets
# no MFU, never a guess.
GPU_BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200 NVL", 835.0),
                        ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0))

FLOP_MODEL = ("training FLOPs = 6 * P * T + 12 * L * N * C * T, where P = parameters in matmuls (the blocks' linears "
              "and lm_head; not the wte/wpe/sos embeddings, norm gains or a classifier head), T = B * N tokens, "
              "L layers, N context, C width: forward + backward of every matmul (2 + 4 FLOPs per weight and token) "
              "and of the two N x N attention matmuls; the attention term halved when causal (only the causal half "
              "of the score matrix is useful work); activation-checkpoint recompute is not counted (it is not useful "
              "work), nor are norms, softmax, the loss or the optimizer")


def gpu_bf16_peak(name: str) -> float | None:
    """Data-sheet dense bf16 peak of the GPU called `name` (torch.cuda.get_device_name) in FLOP/s, or None."""
    for key, tflops in GPU_BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


def device_peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device in FLOP/s; None on CPU and on GPUs not in GPU_BF16_PEAK_TFLOPS."""
    return gpu_bf16_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def cpu_bf16_flags() -> list[str]:
    """The native-bf16 CPU features present (AMX tiles, AVX512-BF16); empty where bf16 matmul is emulated."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    flags = set()
    for line in lines:
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return sorted(flags & {"amx_bf16", "avx512_bf16"})


def has_native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls beat fp32 there: on a GPU, and on CPUs with AMX or AVX512-BF16."""
    return torch.device(device).type == "cuda" or bool(cpu_bf16_flags())


def matmul_params(cfg: IGPTConfig) -> int:
    """Weights that multiply every token: 12 C^2 per block (qkv, proj, two MLP linears) and lm_head (V x C)."""
    return cfg.n_layer * 12 * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd


def train_flops(cfg: IGPTConfig, tokens: int, *, causal: bool) -> float:
    """FLOP_MODEL's count for a training step over `tokens` tokens (sequences of cfg.n_ctx)."""
    attention = 12 * cfg.n_layer * cfg.n_ctx * cfg.n_embd * tokens
    return 6 * matmul_params(cfg) * tokens + (attention / 2 if causal else attention)


def mfu(cfg: IGPTConfig, tokens: int, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation of a training step: useful FLOPs (causal half for AR) per second over `peak` FLOP/s
    (all ranks together); None without a peak."""
    return None if peak is None else train_flops(cfg, tokens, causal=cfg.causal) / seconds / peak
