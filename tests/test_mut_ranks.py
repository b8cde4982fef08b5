"""Tests written against the surviving mutants of hrank/ranks.py section 1 (bench/mutation.py, docs/mutation.md).

Every rank is checked for exact equality with an independent reference: ``torch.linalg.matrix_rank`` per map in
float64 with matrix_rank's float32 tolerance (sigma > sigma_max * max(H, W) * eps32) on the float32 maps, or a
rank known by construction (integer factors, so the float32 maps are exact).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import hrank.ranks as ranks_mod
from hrank.ranks import _pieces, _ranks_4d, matrix_ranks

EPS32 = torch.finfo(torch.float32).eps


def reference(maps: torch.Tensor) -> torch.Tensor:
    """matrix_rank's definition on the float32 maps, map by map, the SVD in float64; -1 for NaN/inf maps."""
    m32 = maps.detach().as_subclass(torch.Tensor).to("cpu", torch.float32)
    h, w = m32.shape[-2:]
    out = [int(torch.linalg.matrix_rank(m.double(), rtol=max(h, w) * EPS32)) if bool(torch.isfinite(m).all())
           else -1 for m in m32.reshape(-1, h, w)]
    return torch.tensor(out, dtype=torch.int64).reshape(m32.shape[:-2])


def exact_maps(n: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """n float32 maps of known rank: products of small-integer factors (exact in float32), every rank
    0..min(h, w) in turn, some with extra zero rows or columns."""
    g = torch.Generator().manual_seed(seed)
    maps, ranks = [], []
    for i in range(n):
        k = i % (min(h, w) + 1)
        while True:
            u = torch.randint(-3, 4, (h, k), generator=g, dtype=torch.float64)
            v = torch.randint(-3, 4, (k, w), generator=g, dtype=torch.float64)
            if i % 5 == 3 and k < h:  # a zero row that the factors do not need
                u[torch.randint(0, h, (1,), generator=g)] = 0
            if i % 5 == 4 and k < w:
                v[:, torch.randint(0, w, (1,), generator=g)] = 0
            m = u @ v
            if int(torch.linalg.matrix_rank(m)) == k:  # exact integers: the rank is the rank of the factors
                break
        maps.append(m.float())
        ranks.append(k)
    return torch.stack(maps), ranks


class _OnDevice(torch.Tensor):
    """CPU maps that report another device: the non-CPU branch of matrix_ranks on a CPU-only machine (its
    arithmetic is the same torch calls; only the device the maps live on is simulated)."""

    DEVICE = torch.device("cuda")

    @property
    def device(self) -> torch.device:
        return self.DEVICE


class _OnXpu(_OnDevice):
    DEVICE = torch.device("xpu")  # neither "cpu" nor "cuda": gets the CUDA chunk size


class _OnMps(_OnDevice):
    DEVICE = torch.device("mps")  # no float64 on MPS: method "gram" becomes "svd"


class _IsCuda(torch.Tensor):
    """CPU maps whose Gram matrices take the CUDA branch of _gram_ranks (host eigvalsh above 32x32)."""

    @property
    def is_cuda(self) -> bool:
        return True


# --------------------------------------------------------------------------------------------------
# ranks against the reference
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 32), (32, 4), (6, 6), (40, 40)])
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_mut_known_ranks_at_every_scale_with_nan_and_inf(shape, method):
    h, w = shape
    maps, known = exact_maps(2 * (min(h, w) + 1), h, w, seed=h * 100 + w)
    scaled = torch.cat([maps, maps * 1e-30, maps * 1e30, maps * 2.0 ** -140])  # 2^-140: denormal float32 values
    scaled[1, 0, 0], scaled[2, -1, -1] = float("nan"), float("inf")
    expected = reference(scaled)
    assert expected[:len(known)].tolist()[3:] == known[3:]  # the first three maps hold the NaN/inf
    assert expected[1] == expected[2] == -1
    got = matrix_ranks(scaled, method=method, chunk_elems=h * w * 5, workers=2)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)
    # scaling by 1e-30 rounds every value, yet the ranks stay those of the unscaled maps
    assert torch.equal(got[len(known):2 * len(known)][3:], torch.tensor(known[3:]))


def test_mut_lines_of_squared_norm_one_are_still_tested():
    """Rows and columns of (+-0.5, ...) have squared norm exactly 1 (the Gram diagonal is 1, never 0): only zero
    lines may be lifted out of the Cholesky test, so rank-1 and rank-2 maps of such lines stay rank 1 and 2."""
    a = torch.full((4,), 0.5)
    b = torch.tensor([0.5, -0.5, 0.5, -0.5])
    c = torch.tensor([0.5, 0.5, -0.5, -0.5])
    rank1 = torch.stack([a, a, -a, a])
    rank2 = torch.stack([a, b, a, b])
    rank3 = torch.stack([a, b, c, a])
    wide = torch.cat([rank2, rank2], 1)  # 4 x 8: the rows side, each row of squared norm 2
    wide[:, 4:] = 0
    maps = torch.stack([rank1, rank2, rank3, rank1.T, rank2.T])
    for method in ("gram", "svd"):
        assert matrix_ranks(maps, method=method).tolist() == [1, 2, 3, 1, 2]
        assert matrix_ranks(wide, method=method).item() == 2
        assert matrix_ranks(wide.T.contiguous(), method=method).item() == 2
    assert reference(maps).tolist() == [1, 2, 3, 1, 2]


def test_mut_a_tiny_first_line_is_not_certified():
    """The first chosen line is nonzero but below the tolerance (Cholesky fails at its very first pivot): its
    map has rank 3 of 4 lines, on the rows side (4 x 32), the columns side (32 x 4) and a square map."""
    g = torch.Generator().manual_seed(5)
    maps = []
    for h, w in ((4, 32), (32, 4), (4, 4)):
        m = torch.randn(h, w, generator=g, dtype=torch.float64)
        if h < w:  # the rows side is ranked; a square map with no zero line: the columns side
            m[0] *= 1e-7
        else:
            m[:, 0] *= 1e-7
        maps.append(m.float())
    for m in maps:
        expected = reference(m)
        assert expected.item() == 3
        for method in ("gram", "svd"):
            assert matrix_ranks(m, method=method).item() == 3
            assert matrix_ranks(m[None].expand(3, -1, -1), method=method).tolist() == [3, 3, 3]


def test_mut_threshold_equal_to_the_largest_singular_value():
    """A 1 x 2^23 map: max(H, W) * eps32 = 1, so the tolerance is sigma_max itself and, sigma > tolerance being
    strict, its rank is 0. One nonzero line with a failed Cholesky, and a tie at the threshold."""
    n = 1 << 23
    assert n * EPS32 == 1.0
    row = torch.linspace(-1.0, 2.0, n).reshape(1, n)
    for m in (row, row.T):
        assert reference(m).item() == 0
        assert int(torch.linalg.matrix_rank(m)) == 0
        for method in ("gram", "svd"):
            assert matrix_ranks(m, method=method).item() == 0
    half = row[:, : n // 2]  # 2^22: tolerance sigma_max / 2, rank 1
    for method in ("gram", "svd"):
        assert matrix_ranks(half, method=method).item() == 1 == reference(half).item()


def test_mut_eigvalsh_failure_falls_back_to_the_reference(monkeypatch):
    """When eigvalsh does not converge, the maps it was given are ranked by matrix_rank itself."""
    maps, known = exact_maps(18, 8, 8, seed=11)
    calls = []

    def no_convergence(*args, **kwargs):
        calls.append(1)
        raise torch.linalg.LinAlgError("simulated: the algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigvalsh", no_convergence)
    got = matrix_ranks(maps, method="gram", workers=1)
    assert calls
    assert got.tolist() == known
    assert torch.equal(got, reference(maps))


def test_mut_host_eigvalsh_branch_of_large_cuda_grams():
    """Above 32 x 32 a CUDA Gram matrix gets its eigenvalues on the host (simulated on CPU: maps whose tensors
    report is_cuda): ranks equal the reference."""
    maps, known = exact_maps(20, 40, 40, seed=4)
    sub = maps.as_subclass(_IsCuda)
    assert sub.is_cuda
    got = matrix_ranks(sub, workers=1).as_subclass(torch.Tensor)
    assert got.tolist() == known
    assert torch.equal(got, reference(maps))


@pytest.mark.parametrize("kind", [_OnDevice, _OnXpu, _OnMps])
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_mut_non_cpu_devices_rank_serially_with_their_chunks(kind, method):
    """Off the CPU (simulated device) the chunks run serially, 2^23 elements each (any device but CPU)."""
    maps, known = exact_maps(24, 9, 7, seed=2)
    x = maps.view(2, 12, 9, 7).as_subclass(kind)
    assert x.device.type != "cpu"
    got = matrix_ranks(x, method=method).as_subclass(torch.Tensor)
    assert got.shape == (2, 12) and got.dtype == torch.int64
    assert got.flatten().tolist() == known
    got3 = matrix_ranks(maps.as_subclass(kind), method=method, chunk_elems=63 * 5).as_subclass(torch.Tensor)
    assert got3.tolist() == known


def test_mut_empty_maps_give_int64_zeros_on_their_device():
    for shape, lead in (((0, 4, 4), (0,)), ((2, 0, 3, 5), (2, 0)), ((3, 2, 0, 5), (3, 2)), ((0, 0), ())):
        got = matrix_ranks(torch.zeros(shape))
        assert got.dtype == torch.int64 and got.shape == lead and not bool(got.any())
    meta = matrix_ranks(torch.zeros(2, 0, 4, 4, device="meta"))
    assert meta.device.type == "meta" and meta.dtype == torch.int64 and meta.shape == (2, 0)


def test_mut_any_number_of_leading_dimensions():
    maps, known = exact_maps(60, 5, 6, seed=3)
    expected = torch.tensor(known)
    for lead in ((60,), (6, 10), (2, 3, 10), (2, 3, 2, 5), (1, 2, 1, 3, 10)):
        got = matrix_ranks(maps.reshape(*lead, 5, 6), chunk_elems=30 * 7, workers=2)
        assert got.shape == lead
        assert torch.equal(got.flatten(), expected)
    assert matrix_ranks(maps[7]).shape == () and matrix_ranks(maps[7]).item() == known[7]


def test_mut_float64_and_half_maps_are_ranked_as_float32():
    """Ranks are matrix_rank's on the maps converted to float32: a float64 value that underflows in float32
    leaves a zero map (rank 0), the float32-exact maps keep their ranks."""
    maps, known = exact_maps(12, 6, 6, seed=9)
    tiny = torch.zeros(3, 6, 6, dtype=torch.float64)
    tiny[0, 2, 3] = 1e-50  # 0 in float32
    tiny[1, :2, :2] = 1e-50
    tiny[2] = maps[5].double()
    tiny[2, 0, 0] += 1e-50  # rounds away in float32
    x = torch.cat([maps.double(), tiny])
    expected = known + [0, 0, known[5]]
    assert reference(x).tolist() == expected
    for method in ("gram", "svd"):
        assert matrix_ranks(x, method=method).tolist() == expected
        assert matrix_ranks(maps.half(), method=method).tolist() == known  # small integers: exact in half


# --------------------------------------------------------------------------------------------------
# chunks and the thread pool
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 5, 4, 4), (2, 7, 4, 32), (2, 7, 32, 4), (4, 1, 3, 3), (1, 9, 5, 7)])
def test_mut_pieces_are_whole_maps_in_order_within_the_chunk(shape):
    """docs/ranks.md: a chunk holds at most chunk_elems map elements (at least one map), a map is never split;
    the pieces cover the maps once, in row-major order."""
    b, c, h, w = shape
    maps = torch.arange(b * c * h * w, dtype=torch.float32).view(b, c, h, w)
    for chunk in (1, h * w - 1, h * w, h * w + 1, 2 * h * w, 3 * h * w + 5, c * h * w, 2 * c * h * w + 1, 10 ** 9):
        for min_pieces in (1, 2, 4, 100):
            pieces = _pieces(maps, chunk, min_pieces)
            assert all(p.shape[-2:] == (h, w) for p in pieces)
            assert all(p.numel() <= max(chunk, h * w) for p in pieces), (chunk, min_pieces)
            assert torch.equal(torch.cat([p.reshape(-1, h, w) for p in pieces]), maps.reshape(-1, h, w))


def test_mut_cpu_chunks_are_at_most_2_pow_20_elements(monkeypatch):
    """docs/ranks.md: the default chunk is 2^20 map elements on CPU."""
    sizes = []

    def count(a: torch.Tensor) -> torch.Tensor:
        sizes.append(a.numel())
        return torch.zeros(a.shape[0], dtype=torch.int64)

    monkeypatch.setitem(ranks_mod._RANK_FNS, "gram", count)
    got = matrix_ranks(torch.zeros(1, 1024, 64, 64), workers=1)
    assert got.shape == (1, 1024)
    assert sum(sizes) == 1024 * 64 * 64
    assert max(sizes) <= 1 << 20


def test_mut_cpu_chunks_run_single_threaded_on_the_rank_pool(monkeypatch):
    """docs/ranks.md: on CPU the chunks run on a pool of `workers` threads, each with one torch thread."""
    real = ranks_mod._RANK_FNS["gram"]
    seen = []
    lock = threading.Lock()

    def spy(a: torch.Tensor) -> torch.Tensor:
        with lock:
            seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real(a)

    monkeypatch.setitem(ranks_mod._RANK_FNS, "gram", spy)
    maps, known = exact_maps(40, 6, 6, seed=8)
    for workers in (1, 3):
        seen.clear()
        got = matrix_ranks(maps.view(4, 10, 6, 6), chunk_elems=36 * 3, workers=workers)
        assert got.flatten().tolist() == known
        assert len(seen) >= 4
        assert all(name.startswith("hrank-rank") and threads == 1 for name, threads in seen), seen
    assert threading.current_thread().name not in {name for name, _ in seen}


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_mut_ranks_4d_serial_and_pooled_with_an_activation(method):
    """_ranks_4d without a pool (the non-CPU path) and with one, with a rank point's activation applied per chunk:
    the ranks of act(maps)."""
    g = torch.Generator().manual_seed(6)
    signed = (torch.randint(-3, 4, (3, 8, 7, 2), generator=g) @ torch.randint(-3, 4, (3, 8, 2, 5), generator=g))
    signed = signed.float()
    slice_ = signed[:, 1:7]  # a channel slice: not contiguous
    relu_ref = reference(torch.relu(slice_))
    plain_ref = reference(slice_)
    assert not torch.equal(relu_ref, plain_ref)  # the activation changes ranks
    for chunk in (35, 35 * 4, 10 ** 6):
        assert torch.equal(_ranks_4d(slice_, method, chunk, None, 1), plain_ref)
        assert torch.equal(_ranks_4d(slice_, method, chunk, None, 1, torch.relu), relu_ref)
        with ThreadPoolExecutor(2) as pool:
            assert torch.equal(_ranks_4d(slice_, method, chunk, pool, 2), plain_ref)
            assert torch.equal(_ranks_4d(slice_, method, chunk, pool, 2, torch.relu), relu_ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_mut_cuda_ranks_equal_the_reference(method):
    """On a GPU: 40 x 40 maps (host eigvalsh) and 8 x 8 maps (batched eigvalsh), ranks on the maps' device."""
    for h in (40, 8):
        maps, known = exact_maps(3 * (h + 1), h, h, seed=h)
        got = matrix_ranks(maps.cuda(), method=method)
        assert got.device.type == "cuda" and got.dtype == torch.int64
        assert got.cpu().tolist() == known
    empty = matrix_ranks(torch.zeros(0, 3, 3, device="cuda"))
    assert empty.device.type == "cuda" and empty.dtype == torch.int64
