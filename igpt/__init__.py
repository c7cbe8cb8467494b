"""iGPT — Generative Pretraining from Pixels, with fused Triton kernels under a thin PyTorch model."""
from igpt.config import IGPTConfig
from igpt.model import Decoder, IGPTOutput
from igpt.palette import Palette

__all__ = ["IGPTConfig", "Decoder", "IGPTOutput", "Palette"]
__version__ = "0.1.0"
