"""igpt_kernels.backend: the public answer to "which implementation does this op run here" (docs/DESIGN.md), checked
against what the ops really launch. tests/interpret/test_backend.py covers the interpreter."""
import importlib.util
import os

import pytest
import torch

import igpt_kernels
from igpt_kernels import _dispatch, norm
from igpt_kernels.norm import launch_counts as norm_launches

OPS = ("attention", "norm", "palette_embedding")
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.parametrize("op", OPS)
def test_cpu_tensors_run_the_reference(op):
    assert igpt_kernels.backend(op, torch.device("cpu")) == "torch"
    assert igpt_kernels.backend(op, "cpu") == "torch"
    assert igpt_kernels.backend(op, torch.zeros(2)) == "torch"


@pytest.mark.parametrize("op", OPS)
def test_cuda_tensors_run_triton_where_it_is_installed(op, monkeypatch):
    # the answer is the dispatch's own decision, so no GPU is needed to ask
    assert igpt_kernels.backend(op, "cuda:0") == ("triton" if HAS_TRITON else "torch")
    monkeypatch.setattr(_dispatch, "TRITON_AVAILABLE", False)
    assert igpt_kernels.backend(op, torch.device("cuda")) == "torch"
    monkeypatch.setattr(_dispatch, "TRITON_AVAILABLE", True)
    monkeypatch.setattr(_dispatch, "INTERPRET", True)
    assert igpt_kernels.backend(op, "cuda") == "interpret"
    assert igpt_kernels.backend(op, "cpu") == "interpret"
    assert igpt_kernels.backend(op, "meta") == "torch"


def test_the_answer_is_what_runs():
    x, w = torch.randn(3, 8), torch.ones(8)
    before = sum(norm_launches.values())
    norm(x, w)
    assert igpt_kernels.backend("norm", x) == "torch" and sum(norm_launches.values()) == before


def test_the_embedding_op_is_also_named_by_its_module():
    assert igpt_kernels.backend("embedding", "cpu") == igpt_kernels.backend("palette_embedding", "cpu")
    assert set(igpt_kernels.BACKENDS) == {"triton", "interpret", "torch"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        igpt_kernels.backend("softmax", "cpu")
    with pytest.raises(TypeError, match="op must be a str"):
        igpt_kernels.backend(igpt_kernels.norm, "cpu")
    with pytest.raises(TypeError, match="expected a tensor, torch.device or device string"):
        igpt_kernels.backend("norm", 0)


@pytest.mark.skipif(not HAS_TRITON, reason="the decision under test is the one with triton installed")
def test_asking_looks_nothing_up(monkeypatch):
    # backend() answers from the decision made at import, as the op wrappers that torch.compile traces do
    def refuse(*args, **kwargs):
        raise AssertionError("looked up at call time")

    monkeypatch.setattr(importlib.util, "find_spec", refuse)
    monkeypatch.setattr(os.environ, "get", refuse)
    assert [igpt_kernels.backend(op, "cuda") for op in OPS] == ["triton"] * len(OPS)
