"""The benchmark scripts run end to end (--quick), print their table, write their JSON, and refuse to time models
that disagree."""
import json
import os
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


def run_script(name, *args, env=None):
    return subprocess.run([sys.executable, str(BENCH / name), "--quick", "--precision", "both", *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


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
        # the ceiling: HF's step over the necessary matmul work (less than the counted FLOPs) at the measured peak
        assert 0 < r["train"]["floor_s"] < data["train_flops_per_step"] / r["matmul_peak_flop_per_s"]
        assert r["train"]["ratio_ceiling"] == pytest.approx(r["train"]["step_s_median"]["hf"] / r["train"]["floor_s"])
    assert "training ours/HF ceiling" in proc.stdout
    assert "ours: eager" in proc.stdout and data["settings"]["compile"] is False  # --quick does not compile
    assert all(r["first_calls_s"] is None for r in data["results"].values())


def test_peer_quick_on_a_cpu_without_avx512(tmp_path):
    """bench/peer.py on a CPU where oneDNN cannot run bf16 (its bf16 weight reorder raises there): the bf16 linears
    fall back to F.linear and every check still passes. The env caps must really take oneDNN's bf16 away."""
    # What a CPU without AVX-512 (AMD Zen 3) offers: oneDNN and ATen capped at AVX2. Inductor's cache is not keyed on
    # the cap (an AVX2 entry crashes a later uncapped process), so these runs get a cache of their own.
    avx2_only = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                 "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.ops.mkldnn._is_mkldnn_bf16_supported(), "
                            "torch.backends.cpu.get_cpu_capability())"], capture_output=True, text=True, env=avx2_only)
    assert probe.stdout.split() == ["False", "AVX2"], probe.stdout + probe.stderr
    out = tmp_path / "peer.json"
    check_run(run_script("peer.py", "--json", str(out), env=avx2_only), out)


@pytest.mark.slow
def test_peer_quick_compiled(tmp_path):
    """--compile: the compiled loss passes the same checks, the output says what ran (sampling stays eager
    `generate`), and the first calls (compiling) are reported apart from the timed ones."""
    out = tmp_path / "peer.json"
    proc = run_script("peer.py", "--compile", "--json", str(out))
    data = check_run(proc, out)
    assert "ours: torch.compile(Decoder.loss" in proc.stdout and "compiling included, not timed" in proc.stdout
    assert data["settings"]["compile"] is True and "generate as written" in data["settings"]["ours"]
    for r in data["results"].values():
        assert all(s > 0 for s in r["first_calls_s"].values())
        assert r["train"]["tokens_per_s"]["ours"] > 0 and r["sample"]["tokens_per_s"]["ours"] > 0


GPU_SESSION_FILES = {"summary.txt", "log.txt", "attention.json", "attention.png", "attention-d96.json", "norm.json",
                     "embedding.json", "train-s-32.json"}


def run_gpu_session(out, **env):
    return subprocess.run(["bash", str(BENCH / "gpu_session.sh"), str(out)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable, **env})


def test_gpu_session_script_runs_every_step(tmp_path):
    """bench/gpu_session.sh, the one prepared run for a lent GPU, works here with --quick sizes: the GPU tests first
    (they skip themselves on a CPU), then every benchmark and the training run (stopped, then resumed) exit 0 and
    write their files into OUTDIR, no more files than the device tool returns (8), and summary.txt says so."""
    proc = run_gpu_session(tmp_path, QUICK="1")
    assert proc.returncode == 0, proc.stdout[-2000:] + (tmp_path / "log.txt").read_text()[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == GPU_SESSION_FILES
    assert proc.stdout.count(": exit 0 after") == 8 and "done after" in proc.stdout
    for name in GPU_SESSION_FILES - {"summary.txt", "log.txt", "attention.png"}:
        assert json.loads((tmp_path / name).read_text())["env"]["git_sha"]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("PASS  GPU tests"), summary  # correctness before speed
    assert "GPU tests failed: 0" in summary and int(summary[2].split(": ")[1]) == 0  # none passed on a CPU ...
    assert int(summary[3].split(": ")[1]) > 20  # ... every GPU test was collected and skipped itself
    verdicts = [line.split()[0] for line in summary if line.split()[0] in ("PASS", "FAIL", "TIMEOUT", "SKIPPED")]
    assert verdicts == ["PASS"] * 8, summary  # GPU tests, five benchmarks, the training run and its resume
    assert "igpt/train.py: last logged step 4 (runs to 2, resumes to 4)" in summary
    assert summary[-1].startswith("exit 0 after")
    assert '"step": 4' in (tmp_path / "log.txt").read_text()  # the training run's metrics are in the log


def test_gpu_session_script_can_leave_the_benchmarks_out(tmp_path):
    proc = run_gpu_session(tmp_path, QUICK="1", SKIP_BENCH="1", SKIP_TESTS="1")
    assert proc.returncode == 0 and "attention" not in proc.stdout and proc.stdout.count(": exit 0 after") == 2
    assert {p.name for p in tmp_path.iterdir()} == {"log.txt", "summary.txt"}


def test_gpu_session_script_reports_a_spent_budget(tmp_path):
    """Steps that no longer fit in the budget are skipped and named, and the script exits non-zero."""
    proc = run_gpu_session(tmp_path, BUDGET="5")
    assert proc.returncode == 124 and proc.stdout.count("SKIPPED") == 8
    assert (tmp_path / "summary.txt").read_text().count("SKIPPED") == 8


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


def test_matmul_peak_leaves_bf16_to_torch_matmul_where_onednn_cannot_run_it(bench_modules, cpu_without_onednn_bf16):
    """peer.py's bf16 peak on an AVX2-only CPU (simulated anywhere): oneDNN's bf16 reorder would raise there."""
    common, _, _ = bench_modules
    assert common.matmul_peak("bf16", n=64, warmup=0, repeat=1) > 0
    assert common.matmul_peak("fp32", n=64, warmup=0, repeat=1) > 0


def test_env_info_names_the_commit_without_git(bench_modules, monkeypatch):
    """A copy of the tree without .git (the GPU machine's) takes the commit from IGPT_GIT_SHA; dirtiness is unknown."""
    common, _, _ = bench_modules
    monkeypatch.setattr(common, "_git", lambda *args: None)
    monkeypatch.setenv("IGPT_GIT_SHA", "0123abc")
    env = common.env_info()
    assert env["git_sha"] == "0123abc" and env["git_dirty"] is None


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


# ----------------------------------------------------------------------------------------------------------------------
# Kernel and training-step benchmarks (attention.py, norm.py, embedding.py, train.py) and the pytest-benchmark cases.
# Tiny sizes and one torch thread: on a busy 2-core machine, multi-threaded tiny ops wait for cores (10x slower).

KERNEL_ENV_KEYS = ENV_KEYS | {"gpu", "load_average_1m", "git_dirty"}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "IGPT_BENCH_SIZE": "tiny"}


def _load_bench(name):
    """bench/<name>.py as module bench_<name> (it imports `common` from its own folder)."""
    import importlib.util

    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.fixture(scope="module")
def kernel_benches():
    return {name: _load_bench(name) for name in ("attention", "norm", "embedding", "train")}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_attention_script_on_cpu(tmp_path):
    """The acceptance run: `python bench/attention.py` on CPU prints the banner and the table and exits 0."""
    out, png = tmp_path / "attention.json", tmp_path / "attention.png"
    proc = subprocess.run([sys.executable, str(BENCH / "attention.py"), "--quick", "--device", "cpu", "--json",
                           str(out), "--plot", str(png)], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Triton GPU kernels are NOT timed" in proc.stdout
    for text in ("ours (CPU reference path)", "eager (materialised softmax)", "SDPA math", "TFLOP/s", "vs best SDPA",
                 "FLOP model: forward = 4*B*H*N^2*D", "time.perf_counter"):
        assert text in proc.stdout, text
    data = json.loads(out.read_text())
    assert KERNEL_ENV_KEYS <= data["env"].keys() and data["env"]["device"] == "cpu"
    assert data["settings"]["banner"] and data["settings"]["ours"] == "ours (CPU reference path)"
    timed = [r for r in data["results"] if "ms_median" in r]
    assert {r["pass"] for r in timed} == {"fwd", "fwd+bwd"} and {r["causal"] for r in timed} == {True, False}
    assert all(r["tflops"] > 0 and r["peak_memory_bytes"] is None for r in timed)
    assert all(set(c["ours (CPU reference path)"]) == {"out", "dq", "dk", "dv"} for c in data["correctness"].values())
    assert png.stat().st_size > 0


@pytest.mark.parametrize("script, extra, expect", [
    ("norm", ["--no-compile"], ("GB/s", "% copy BW", "byte model", "F.rms_norm", "eager (igpt.model.rms_norm)")),
    ("embedding", ["--no-compile", "--objective", "ar", "bert"],
     ("GB/s", "% copy BW", "byte model", "eager (Decoder path)", "pixels")),
    ("train", ["--ac", "none", "full"],
     ("tokens/s", "MFU", "FLOP model", "activation-checkpoint recompute is not counted", "AC full")),
])
def test_kernel_script_main(kernel_benches, one_thread, tmp_path, capsys, script, extra, expect):
    out = tmp_path / f"{script}.json"
    assert kernel_benches[script].main(["--quick", "--device", "cpu", "--json", str(out), *extra]) == 0
    stdout = capsys.readouterr().out
    assert "Triton GPU kernels are NOT timed" in stdout
    for text in expect:
        assert text.lower() in stdout.lower(), text
    data = json.loads(out.read_text())
    assert KERNEL_ENV_KEYS <= data["env"].keys() and data["benchmark"] == script
    timed = [r for r in data["results"] if "ms_median" in r]
    assert timed and all(r["ms_median"] > 0 for r in timed)
    rate = "tokens_per_s" if script == "train" else "gb_per_s"
    assert all(r[rate] > 0 for r in timed)
    if script == "train":
        assert data["useful_flops_per_step"] > 0 and all(0 < r["mfu"] for r in timed)
        assert len(timed) == 4 and all(abs(c["grad_max_rel_diff"]) <= 1e-4 for c in data["correctness"].values())


def test_attention_check_fails_loudly(kernel_benches, one_thread, monkeypatch, tmp_path):
    """An attention that disagrees with the reference stops the script (non-zero exit, the reason) before timing."""
    bench = kernel_benches["attention"]
    real = bench.attention
    monkeypatch.setattr(bench, "attention", lambda q, k, v, **kw: real(q, k, v, **kw) * 1.001)
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--device", "cpu", "--json", str(out)])
    message = str(exit_info.value.code)
    assert "correctness check FAILED, nothing timed" in message and "ours (CPU reference path): out" in message
    assert not out.exists()


@pytest.mark.parametrize("script, extra", [("attention", []), ("norm", ["--no-compile"]),
                                           ("embedding", ["--no-compile"]), ("train", [])])
def test_corrupt_flag_fails_loudly(kernel_benches, one_thread, tmp_path, script, extra):
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit) as exit_info:
        kernel_benches[script].main(["--quick", "--device", "cpu", "--corrupt-for-test", "--json", str(out), *extra])
    assert f"{script}.py: correctness check FAILED" in str(exit_info.value.code)
    assert not out.exists()


def test_check_close_rule(kernel_benches):
    common = sys.modules["common"]
    exact = torch.randn(64, dtype=torch.float64)
    plain = exact.to(torch.float16)
    assert common.check_close("ok", exact.to(torch.float16), exact, plain) <= 1e-2
    with pytest.raises(common.CorrectnessError, match="max error"):
        common.check_close("off", (exact + 0.01).to(torch.float16), exact, plain)
    with pytest.raises(common.CorrectnessError, match="non-finite"):
        common.check_close("nan", torch.full_like(plain, float("nan")), exact, plain)


def test_pytest_benchmark_cases_run_once():
    """`pytest bench/ --benchmark-only` finds the cases; with --benchmark-disable each runs once at tiny sizes."""
    pytest.importorskip("pytest_benchmark")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(BENCH / "test_bench.py"),
                           "--benchmark-disable"], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@pytest.mark.gpu
def test_attention_script_on_gpu(tmp_path):
    out = tmp_path / "attention.json"
    proc = subprocess.run([sys.executable, str(BENCH / "attention.py"), "--quick", "--device", "cuda", "--json",
                           str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours (Triton)" in proc.stdout and "NOT timed" not in proc.stdout and "do_bench" in proc.stdout
    data = json.loads(out.read_text())
    assert data["env"]["gpu"]["name"] and all(r["peak_memory_bytes"] > 0 for r in data["results"] if "ms_median" in r)


def test_data_script_quick(tmp_path):
    """bench/data.py: one worker's images/s with and without JPEG draft mode, and the workers per GPU it implies."""
    out = tmp_path / "data.json"
    proc = subprocess.run([sys.executable, str(BENCH / "data.py"), "--quick", "--resolution", "32", "64", "--json",
                           str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in ("images/s (draft)", "draft speed-up", "workers per GPU", "MFU 0.5"):
        assert text in proc.stdout, text
    data = json.loads(out.read_text())
    assert ENV_KEYS <= data["env"].keys() and data["benchmark"] == "data" and data["settings"]["gpu"] == "H100"
    rate = {(r["resolution"], r["decode"]): r["images_per_s"] for r in data["results"]}
    assert set(rate) == {(R, d) for R in (32, 64) for d in ("full", "draft")} and all(v > 0 for v in rate.values())
    assert all(0 < c["centre_crop"]["max_abs"] for c in data["correctness"]["draft_vs_full"].values())
    assert {(r["preset"], r["resolution"]) for r in data["workers_per_gpu"]} == {
        (p, R) for p in ("s", "m", "l", "xl") for R in (32, 64)}
    from igpt.flops import gpu_bf16_peak, train_flops

    for r in data["workers_per_gpu"]:
        cfg = IGPTConfig.preset(r["preset"], resolution=r["resolution"])
        assert r["gpu_images_per_s"] == pytest.approx(0.5 * gpu_bf16_peak("H100") / train_flops(cfg, cfg.n_ctx,
                                                                                                causal=True))
        for decode in ("full", "draft"):
            assert r[f"workers_{decode}"] == -(-r["gpu_images_per_s"] // rate[r["resolution"], decode])


def test_fidelity_quick(tmp_path):
    """bench/fidelity.py end to end on a small labelled folder: split, AR and BERT pretraining with checkpoints,
    probes of every layer (pretrained and random init), held-out losses, completions, figures."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    data = tmp_path / "images"
    for c in range(4):
        (data / f"class{c}").mkdir(parents=True)
        for i in range(25):  # 5 held out per class
            img = rng.integers(0, 64, (12, 12, 3)) + 60 * c
            Image.fromarray(img.astype(np.uint8)).save(data / f"class{c}" / f"{i:04d}.png")
    out = tmp_path / "fidelity"
    proc = subprocess.run([sys.executable, str(BENCH / "fidelity.py"), "--quick", "--data", str(data), "--out",
                           str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "fidelity.json").read_text())
    assert ENV_KEYS <= r["env"].keys() and r["split"]["images"] == {"train": 80, "test": 20}
    assert sorted(p.name for p in (out / "work" / "data" / "test" / "class0").iterdir()) == [
        f"{i:04d}.png" for i in (4, 9, 14, 19, 24)]  # every 5th file of each class is held out
    n_layers = r["settings"]["n_layer"] + 1
    for key in ("ar", "random_init", "bert"):
        layers = r[key]["probe"]["layers"]
        assert [x["layer"] for x in layers] == list(range(n_layers))
        assert r[key]["probe"]["best_val_acc"] == max(x["val_acc"] for x in layers)  # chosen on validation
    assert [c["step"] for c in r["ar"]["checkpoints"]] == [4, 8]
    assert all(0 < c["held_out_nats_per_token"] < 7 for c in r["ar"]["checkpoints"])
    for png in ("probe_vs_depth.png", "loss_vs_probe.png", "completions.png"):
        assert Image.open(out / png).size[0] > 100, png
