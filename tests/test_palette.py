"""Palette: k-means fit, the exact quantize rule, decode, files, HF clusters, input errors."""
import numpy as np
import pytest
import torch

from igpt.palette import PIXEL_TO_UNIT, Palette
from igpt_kernels.reference import quantize_reference


def rule_reference(pixels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """The quantize rule written out literally, one pixel at a time over all centres, in fp32 (numpy).

    d_j = ((r - c_j0)^2 + (g - c_j1)^2) + (b - c_j2)^2 with (r, g, b) = x / 127.5 - 1; ids = first argmin.
    """
    x = pixels.reshape(-1, 3).numpy().astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    c = centres.numpy().astype(np.float32)
    out = np.empty(len(x), dtype=np.int64)
    for i, p in enumerate(x):
        d = (p[0] - c[:, 0]) ** 2 + (p[1] - c[:, 1]) ** 2 + (p[2] - c[:, 2]) ** 2  # fp32 throughout
        out[i] = int(np.argmin(d))  # numpy: first occurrence of the minimum
    return torch.from_numpy(out).reshape(pixels.shape[:-1])


def blobs(n_per: int = 4000, seed: int = 0):
    """8 well-separated colour blobs (the corners of an inner cube) with +-12 levels of noise."""
    g = torch.Generator().manual_seed(seed)
    corners = torch.tensor([[a, b, c] for a in (40, 215) for b in (40, 215) for c in (40, 215)], dtype=torch.float32)
    noise = torch.randint(-12, 13, (8, n_per, 3), generator=g).float()
    px = (corners[:, None, :] + noise).reshape(-1, 3)
    return px.to(torch.uint8), corners / 127.5 - 1


def sort_rows(c: torch.Tensor) -> torch.Tensor:
    """Rows in lexicographic order of their values rounded to a coarse grid (robust to small noise)."""
    keys = np.round(c.numpy() * 2)
    return c[np.lexsort(keys.T[::-1])]


def random_palette(k: int = 64, seed: int = 0) -> Palette:
    g = torch.Generator().manual_seed(seed)
    return Palette(torch.rand(k, 3, generator=g) * 2 - 1)


def random_pixels(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------------------------
# fit


def test_fit_recovers_blobs_and_is_deterministic():
    px, truth = blobs()
    pal = Palette.fit(px, n_clusters=8, seed=0)
    assert pal.centres.dtype == torch.float32 and pal.centres.shape == (8, 3)
    assert torch.allclose(sort_rows(pal.centres), sort_rows(truth), atol=0.02)  # within ~2.5 colour levels
    again = Palette.fit(px, n_clusters=8, seed=0)
    assert torch.equal(pal.centres, again.centres)
    # numpy input gives the same palette
    assert torch.equal(Palette.fit(px.numpy(), n_clusters=8, seed=0).centres, pal.centres)


def test_fit_chunk_size_does_not_change_result():
    px = random_pixels(20000, seed=3)
    big = Palette.fit(px, n_clusters=32, seed=5, iters=10, chunk_size=1 << 16)
    small = Palette.fit(px, n_clusters=32, seed=5, iters=10, chunk_size=7)
    assert torch.equal(big.centres, small.centres)


def test_fit_seed_changes_result_and_subsample_is_seeded():
    px = random_pixels(30000, seed=4)
    a = Palette.fit(px, n_clusters=16, seed=0, iters=3, sample=5000)
    b = Palette.fit(px, n_clusters=16, seed=0, iters=3, sample=5000)
    c = Palette.fit(px, n_clusters=16, seed=1, iters=3, sample=5000)
    assert torch.equal(a.centres, b.centres)
    assert not torch.equal(a.centres, c.centres)


def test_fit_gives_distinct_centres_when_clusters_would_empty():
    # 9 colours: 8 copies of a heavy blob and 1 far colour; K = 9 needs every colour as its own centre.
    colours = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1],
                            [255, 255, 255]], dtype=torch.uint8)
    px = colours.repeat_interleave(torch.tensor([1000] * 8 + [1]), dim=0)
    pal = Palette.fit(px, n_clusters=9, seed=0)
    assert torch.unique(pal.centres, dim=0).shape[0] == 9
    assert torch.equal(sort_rows(pal.colours.float()), sort_rows(colours.float()))
    assert torch.equal(pal.decode(pal.quantize(colours)), colours)


def test_fit_reseeds_empty_and_duplicate_centres():
    # Start from K identical centres: every pixel goes to centre 0 and the other K - 1 clusters are empty; they must
    # be re-seeded so the result still has K distinct centres.
    px = random_pixels(5000, seed=6)
    pal = Palette.fit(px, n_clusters=16, init=torch.zeros(16, 3), iters=20)
    assert torch.unique(pal.centres, dim=0).shape[0] == 16
    assert pal.quantize(px).unique().numel() == 16  # and all of them are used
    # Even a single iteration returns distinct centres.
    one = Palette.fit(px, n_clusters=16, init=torch.zeros(16, 3), iters=1)
    assert torch.unique(one.centres, dim=0).shape[0] == 16
    with pytest.raises(ValueError, match="init has 4 centres"):
        Palette.fit(px, n_clusters=16, init=torch.zeros(4, 3))


def test_fit_too_few_colours_raises():
    px = torch.tensor([[10, 20, 30], [40, 50, 60]], dtype=torch.uint8).repeat(100, 1)
    with pytest.raises(ValueError, match="only 2 distinct colours"):
        Palette.fit(px, n_clusters=3)
    assert len(Palette.fit(px, n_clusters=2)) == 2


@pytest.mark.parametrize("kwargs", [dict(n_clusters=0), dict(iters=-1), dict(sample=0), dict(chunk_size=0)])
def test_fit_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        Palette.fit(random_pixels(100), **kwargs)
    with pytest.raises(TypeError):
        Palette.fit(random_pixels(100), n_clusters=2.5)


@pytest.mark.gpu
def test_fit_and_quantize_on_cuda():
    px = random_pixels(20000, seed=8)
    cpu = Palette.fit(px, n_clusters=16, seed=0, iters=5)
    gpu = Palette.fit(px.cuda(), n_clusters=16, seed=0, iters=5)
    assert gpu.centres.is_cuda
    assert torch.allclose(gpu.centres.cpu(), cpu.centres, atol=1e-5)
    assert torch.equal(cpu.to("cuda").quantize(px.cuda()).cpu(), cpu.quantize(px))


# ---------------------------------------------------------------------------------------------------------------
# quantize


def test_pixel_map_is_the_rule():
    v = np.arange(256, dtype=np.float32)
    assert np.array_equal(PIXEL_TO_UNIT.numpy(), v / np.float32(127.5) - np.float32(1.0))
    assert PIXEL_TO_UNIT[0] == -1 and PIXEL_TO_UNIT[255] == 1


@pytest.mark.parametrize("chunk_size", [None, 1, 13])
def test_quantize_matches_rule_reference(chunk_size):
    pal = random_palette(64)
    px = random_pixels(3000).reshape(10, 300, 3)
    ids = pal.quantize(px, chunk_size=chunk_size)
    assert ids.dtype == torch.int64 and ids.shape == (10, 300)
    assert torch.equal(ids, rule_reference(px, pal.centres))


def test_quantize_all_colours_of_a_slice_against_reference_with_512_centres():
    pal = random_palette(512, seed=2)
    r, g, b = torch.meshgrid(torch.arange(0, 256, 5), torch.arange(0, 256, 17), torch.arange(0, 256, 51), indexing="ij")
    px = torch.stack([r, g, b], -1).reshape(-1, 3).to(torch.uint8)  # 52 * 16 * 6 = 4992 colours
    assert torch.equal(pal.quantize(px), rule_reference(px, pal.centres))


def test_exact_ties_go_to_lowest_id():
    # For a grey pixel x with u = x/127.5 - 1, centres (u - d, u, u) and (u + d, u, u) are equally far whenever
    # both differences round to the same fp32 magnitude; collect every x where that holds and check both orders.
    u = PIXEL_TO_UNIT.numpy()
    d = np.float32(0.125)
    xs = [x for x in range(256) if abs(u[x]) + d <= 1
          and (u[x] - np.float32(u[x] - d)) ** 2 == (u[x] - np.float32(u[x] + d)) ** 2]
    assert len(xs) > 100
    for x in xs:
        c = torch.tensor([[u[x] - d, u[x], u[x]], [u[x] + d, u[x], u[x]]], dtype=torch.float32)
        px = torch.tensor([[x, x, x]], dtype=torch.uint8)
        assert Palette(c).quantize(px).item() == 0
        assert Palette(c.flip(0)).quantize(px).item() == 0
    # Duplicate centres: the first copy always wins.
    dup = torch.tensor([[0.5, 0.5, 0.5], [-0.5, 0.1, 0.2], [-0.5, 0.1, 0.2], [-0.5, 0.1, 0.2]])
    px = torch.tensor([[64, 140, 153]], dtype=torch.uint8)
    assert Palette(dup).quantize(px).item() == 1


def test_ties_across_channels_go_to_lowest_id():
    # Symmetric centres around a pixel that differ in which channel carries the offset: equal distances.
    u = PIXEL_TO_UNIT[200].item()
    base = torch.full((3,), u)
    cs = []
    for ch in (2, 0, 1):
        c = base.clone()
        c[ch] = u - 0.125
        cs.append(c)
    pal = Palette(torch.stack(cs))
    assert pal.quantize(torch.tensor([[200, 200, 200]], dtype=torch.uint8)).item() == 0


def test_near_ties_follow_fp32_rule():
    # Centres one fp32 ulp apart around the midpoint between two colours: the rule (not float64 maths) decides.
    rng = np.random.default_rng(0)
    px = torch.from_numpy(rng.integers(0, 256, (400, 3)).astype(np.uint8))
    base = torch.from_numpy(rng.uniform(-1, 1, (200, 3)).astype(np.float32))
    near = torch.nextafter(base, torch.full_like(base, 2.0))  # each centre twice, one ulp apart
    centres = torch.stack([base, near], 1).reshape(-1, 3).clamp(-1, 1)
    pal = Palette(centres)
    assert torch.equal(pal.quantize(px), rule_reference(px, pal.centres))
    # And midpoints of pixel pairs give exact/near ties between grid centres.
    grid = (torch.tensor([[10, 20, 30], [12, 20, 30], [10, 22, 30], [11, 21, 31]]).float() / 127.5 - 1)
    mid = torch.tensor([[11, 20, 30], [11, 21, 30], [11, 21, 31]], dtype=torch.uint8)
    assert torch.equal(Palette(grid).quantize(mid), rule_reference(mid, grid))


def test_quantize_keeps_device_and_accepts_numpy():
    pal = random_palette(16)
    px = random_pixels(50)
    assert torch.equal(pal.quantize(px.numpy()), pal.quantize(px))
    assert pal.quantize(px[:0]).shape == (0,)


# ---------------------------------------------------------------------------------------------------------------
# decode


def test_decode_formula_and_round_trips():
    pal = random_palette(512, seed=3)
    ids = torch.randint(0, 512, (4, 100))
    rgb = pal.decode(ids)
    assert rgb.dtype == torch.uint8 and rgb.shape == (4, 100, 3)
    expect = np.clip(np.rint(np.float32(127.5) * (pal.centres.numpy()[ids.numpy()] + np.float32(1))), 0, 255)
    assert np.array_equal(rgb.numpy(), expect.astype(np.uint8))
    # decode o quantize is the identity on decoded colours: a decoded colour re-quantizes to a centre that decodes
    # to the same colour (true whenever centres are far apart relative to one colour step, as in real palettes).
    assert torch.equal(pal.decode(pal.quantize(rgb)), rgb)
    # Centres on the 255-grid: quantize(decode(ids)) == ids exactly.
    g = torch.Generator().manual_seed(7)
    grid_colours = torch.randperm(256 ** 3, generator=g)[:512]
    grid = torch.stack([grid_colours // 65536, grid_colours // 256 % 256, grid_colours % 256], 1).to(torch.uint8)
    gpal = Palette(PIXEL_TO_UNIT[grid.long()])
    assert torch.equal(gpal.colours, grid)
    assert torch.equal(gpal.quantize(gpal.decode(ids)), ids)


def test_decode_bad_ids():
    pal = random_palette(8)
    with pytest.raises(ValueError, match=r"0\.\.7"):
        pal.decode(torch.tensor([0, 8]))
    with pytest.raises(ValueError):
        pal.decode(torch.tensor([-1]))
    with pytest.raises(TypeError):
        pal.decode(torch.tensor([1.0]))
    with pytest.raises(TypeError):
        pal.decode([1, 2])
    assert pal.decode(np.array([1, 2], dtype=np.int32)).shape == (2, 3)


# ---------------------------------------------------------------------------------------------------------------
# files and HF


@pytest.mark.parametrize("name", ["palette.npy", "palette.safetensors"])
def test_save_load_round_trip(tmp_path, name):
    pal = random_palette(512, seed=4)
    path = tmp_path / name
    pal.save(path)
    back = Palette.load(path)
    assert torch.equal(back.centres, pal.centres)
    assert back.centres.dtype == torch.float32
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left behind
    pal.save(str(path))  # overwrite in place, str paths
    assert torch.equal(Palette.load(str(path)).centres, pal.centres)


def test_npy_is_the_released_format(tmp_path):
    pal = random_palette(512, seed=5)
    pal.save(tmp_path / "c.npy")
    arr = np.load(tmp_path / "c.npy")
    assert arr.dtype == np.float32 and arr.shape == (512, 3)
    np.save(tmp_path / "f64.npy", arr.astype(np.float64))  # float64 files (e.g. HF clusters dumped) load too
    assert torch.equal(Palette.load(tmp_path / "f64.npy").centres, pal.centres)


def test_bad_files(tmp_path):
    pal = random_palette(4)
    with pytest.raises(ValueError, match="unknown palette format"):
        pal.save(tmp_path / "p.pt")
    with pytest.raises(ValueError, match="unknown palette format"):
        Palette.load(tmp_path / "p.json")
    with pytest.raises(FileNotFoundError):
        Palette.load(tmp_path / "missing.npy")
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file at all")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    np.save(tmp_path / "shape.npy", np.zeros((512, 4), np.float32))
    np.save(tmp_path / "range.npy", np.full((512, 3), 3.0, np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((512, 3), np.int64))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    from safetensors.torch import save_file
    save_file({"other": torch.zeros(512, 3)}, tmp_path / "key.safetensors")
    for name in ["junk.npy", "junk.safetensors", "shape.npy", "range.npy", "ints.npy", "obj.npy", "key.safetensors"]:
        with pytest.raises(ValueError, match=name):
            Palette.load(tmp_path / name)


def test_from_hf_clusters():
    clusters = np.random.default_rng(0).uniform(-1, 1, (512, 3))  # float64 array, as HF stores it
    pal = Palette.from_hf(clusters)
    assert len(pal) == 512 and pal.n_clusters == 512 and pal.centres.dtype == torch.float32
    assert np.array_equal(pal.centres.numpy(), clusters.astype(np.float32))
    assert torch.equal(Palette.from_hf(clusters.tolist()).centres, pal.centres)  # nested lists from config.json
    with pytest.raises(ValueError):
        Palette.from_hf(None)
    with pytest.raises(ValueError):
        Palette.from_hf(clusters[:, :2])


def test_quantize_agrees_with_hf_processor():
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(1)
    clusters = rng.uniform(-1, 1, (512, 3)).astype(np.float32)
    try:
        proc = transformers.ImageGPTImageProcessor(clusters=clusters, size={"height": 32, "width": 32})
    except Exception as err:  # a transformers version without this processor (or its backend)
        pytest.skip(f"ImageGPTImageProcessor unavailable: {err}")
    images = rng.integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)  # already 32x32: resizing is the identity
    hf_ids = proc(images=list(images), return_tensors="np")["input_ids"]
    ours = Palette.from_hf(proc.clusters).quantize(images).reshape(16, -1).numpy()
    assert np.array_equal(hf_ids, ours)


# ---------------------------------------------------------------------------------------------------------------
# bad inputs and basics


def test_bad_centres():
    with pytest.raises(ValueError):
        Palette(torch.zeros(4, 2))
    with pytest.raises(ValueError):
        Palette(torch.zeros(0, 3))
    with pytest.raises(ValueError):
        Palette(torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        Palette(torch.full((4, 3), 1.5))
    with pytest.raises(ValueError):
        Palette(torch.tensor([[0.0, float("nan"), 0.0]]))
    with pytest.raises(TypeError):
        Palette(torch.zeros(4, 3, dtype=torch.int64))
    Palette(torch.ones(2, 3, dtype=torch.float64))  # float64 is converted


def test_bad_pixels():
    pal = random_palette(4)
    with pytest.raises(TypeError, match="uint8"):
        pal.quantize(torch.zeros(4, 3))
    with pytest.raises(TypeError, match="uint8"):
        pal.quantize(np.zeros((4, 3), np.int32))
    with pytest.raises(TypeError):
        pal.quantize([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        pal.quantize(torch.zeros(2, 3, 4, dtype=torch.uint8))
    with pytest.raises(ValueError):
        pal.quantize(torch.zeros((), dtype=torch.uint8))
    with pytest.raises(TypeError):
        Palette.fit(torch.zeros(100, 3), n_clusters=2)
    with pytest.raises(ValueError):
        Palette.fit(torch.zeros(100, 4, dtype=torch.uint8), n_clusters=2)


def test_basics():
    pal = random_palette(16)
    assert len(pal) == 16 and pal.n_clusters == 16
    assert repr(pal) == "Palette(n_clusters=16, device=cpu)"
    assert pal.to("cpu") is pal
    assert pal.colours.shape == (16, 3) and pal.colours.dtype == torch.uint8


def test_compiled_quantize_follows_the_exact_rule():
    # torch 2.11's Inductor (the GPU machine's) fused strided centre-column views with the pixel-table gather and
    # returned wrong ids for 15k of 16k pixels; the columns are now made once, outside any compiled graph.
    gen = torch.Generator().manual_seed(0)
    palette = Palette(torch.rand(512, 3, generator=gen) * 2 - 1)
    pixels = torch.randint(0, 256, (4, 4096, 3), generator=gen, dtype=torch.uint8)
    compiled = torch.compile(palette.quantize, dynamic=False)
    assert torch.equal(compiled(pixels), quantize_reference(pixels, palette.centres))
