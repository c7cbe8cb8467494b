"""The benchmark scripts run end to end (--quick), print their table, write their JSON, and refuse to time models
that disagree."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from igpt import IGPTConfig

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
ENV_KEYS = {"device", "cpu_model", "cpu_cores", "torch", "triton", "transformers", "git_sha", "date_utc"}


def run_script(name, *args):
    return subprocess.run([sys.executable, str(BENCH / name), "--quick", "--precision", "both", *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def check_run(proc, json_path):
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(json_path.read_text())
    assert ENV_KEYS <= data["env"].keys()
    assert data["settings"]["quick"] is True and data["settings"]["precisions"] == ["fp32", "bf16"]
    assert data["correctness"]["logit_max_abs_diff_fp32"] <= 1e-4
    assert set(data["results"]) == {"fp32", "bf16"}
    return data


def test_peer_quick(tmp_path):
    out = tmp_path / "peer.json"
    proc = run_script("peer.py", "--json", str(out))
    data = check_run(proc, out)
    assert "ours/HF" in proc.stdout and "train step tokens/s" in proc.stdout and "no causal halving" in proc.stdout
    assert data["train_flops_per_step"] > 0 and "no causal halving" in data["flop_model"]
    for r in data["results"].values():
        for side in ("ours", "hf"):
            assert r["train"]["tokens_per_s"][side] > 0 and r["sample"]["tokens_per_s"][side] > 0
            assert 0 < r["train"]["fraction_of_matmul_peak"][side]
        assert r["matmul_peak_flop_per_s"] > 0
        assert r["loss"]["ours"] == pytest.approx(r["loss"]["hf"], rel=2e-2)


def test_sample_quick(tmp_path):
    out = tmp_path / "sample.json"
    proc = run_script("sample.py", "--json", str(out))
    data = check_run(proc, out)
    assert "cached speed-up" in proc.stdout and "uncached loop" in proc.stdout
    assert data["correctness"]["cached_equals_uncached_tokens"] is True
    for r in data["results"].values():
        assert set(r["tokens_per_s"]) == {"cached", "uncached", "hf"}
        assert all(v > 0 for v in r["tokens_per_s"].values())


@pytest.fixture(scope="module")
def bench_modules():
    """bench/common.py, peer.py and sample.py imported in this process (the scripts import `common` by file name)."""
    sys.path.insert(0, str(BENCH))
    try:
        import common
        import peer
        import sample
    finally:
        sys.path.remove(str(BENCH))
    return common, peer, sample


def test_correctness_check_fails_loudly(bench_modules, tmp_path):
    """A model that differs from its peer exits non-zero (SystemExit with the reason) before anything is timed."""
    _, peer, _ = bench_modules
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit) as exit_info:
        peer.main(["--quick", "--corrupt-for-test", "--json", str(out)])
    assert "correctness check FAILED" in str(exit_info.value.code) and "logits differ" in str(exit_info.value.code)
    assert not out.exists()


def test_check_logits_rejects_mismatched_models(bench_modules):
    common, _, _ = bench_modules
    cfg = IGPTConfig(n_layer=1, n_embd=32, n_head=2, resolution=4)
    ours, hf = common.build_pair(cfg)
    ids = common.random_ids(cfg, 2)
    assert common.check_logits(ours, hf, ids) <= 1e-4
    with torch.no_grad():
        hf.lm_head.weight[3, 0] += 0.1
    with pytest.raises(common.CorrectnessError, match="logits differ"):
        common.check_logits(ours, hf, ids)


def test_check_samplers_rejects_disagreeing_samplers(bench_modules):
    common, _, sample = bench_modules
    cfg = IGPTConfig(n_layer=1, n_embd=32, n_head=2, resolution=4)
    ours, hf = common.build_pair(cfg)
    ours.eval(), hf.eval()
    fns = sample.samplers(ours, hf, seed=0)
    prompt = common.random_ids(cfg, 2)[:, :8]
    sample.check_samplers(fns, prompt, cfg.n_ctx)  # the real samplers agree
    sample.check_samplers(fns, prompt[:, :0], cfg.n_ctx)  # also on whole images from SOS (no prompt)
    uncached = fns["uncached"]
    fns["uncached"] = lambda p: uncached(p).roll(1, dims=1).index_copy(1, torch.arange(8), p)  # same prompt, new tokens
    with pytest.raises(common.CorrectnessError, match="drew different tokens"):
        sample.check_samplers(fns, prompt, cfg.n_ctx)
    fns["hf"] = lambda p: p  # no new tokens at all
    with pytest.raises(common.CorrectnessError, match="hf sampler returned shape"):
        sample.check_samplers(fns, prompt, cfg.n_ctx)
