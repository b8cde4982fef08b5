"""CHIP channel scores (Sui et al., NeurIPS 2021): the nuclear-norm drop when a channel is removed, exact and batched.

For one image, a layer's post-activation feature maps form A (C x HW), one row per channel. CHIP scores channel
c by ``||A||_* - ||A_{-c}||_*`` (A_{-c}: row c zeroed, which has the singular values of row c removed), averaged
over images; higher = more important. The official code computes one SVD of the masked C x HW matrix per
(image, channel): C + 1 SVDs per image and layer. Here (docs/ranks.md, "CHIP scores"):

* ``method="gram"`` (default): one float64 Gram matrix per image on the smaller side (m = min(C, HW)).
  With ``G = A A^T`` (C <= HW): ``||A||_* = sum sqrt(eig(G))`` and removing row c leaves the principal
  submatrix ``G_{-c}`` -- so a row removal costs one (C-1) x (C-1) symmetric eigenvalue problem instead of an
  SVD of a (C-1) x HW matrix. With ``K = A^T A`` (HW < C): ``A_{-c}^T A_{-c} = K - a_c a_c^T``, a rank-one
  downdate, C eigenvalue problems of HW x HW. Eigenvalues are clamped at 0 before the square root.
* ``method="svd"``: the direct definition, batched: singular values of every masked matrix (float64).

Channels that are all zero in an image score exactly 0 (removing them changes no singular value).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor

import torch

__all__ = ["chip_scores", "CHIP_METHODS"]

CHIP_METHODS = ("gram", "eig", "svd")
_CUDA_BATCHED_EIGH_MAX = 32  # cuSOLVER's batched eigensolver stops at 32x32 (see ranks._gram_ranks)


def _eigvalsh(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda and x.shape[-1] > _CUDA_BATCHED_EIGH_MAX:
        return torch.linalg.eigvalsh(x.cpu()).to(x.device)
    return torch.linalg.eigvalsh(x)


def _nuclear_from_gram(g: torch.Tensor) -> torch.Tensor:
    """Sum of sqrt of the (clamped) eigenvalues of symmetric PSD matrices (..., m, m): the nuclear norms."""
    return _eigvalsh(g).clamp_min_(0).sqrt_().sum(-1)


def _lift_zero_lines(g: torch.Tensor) -> None:
    """Add trace(G) to the diagonal entries of G's zero lines (in place)."""
    diag = g.diagonal(dim1=1, dim2=2)
    diag.add_(torch.where(diag == 0, diag.sum(1, keepdim=True), 0.0))


def _chip_gram(a: torch.Tensor, chunk_elems: int) -> torch.Tensor:
    """Per-image CHIP scores (n, C) float64 of maps ``a`` (n, C, L), via Gram matrices (see module doc)."""
    n, c, length = a.shape
    b = a.to(torch.float64)
    if c == 1:  # removing the only row leaves the zero matrix
        return b.square().sum(-1).sqrt()
    # All-zero lines (dead channels; pixels zero in every channel) only add exact zero eigenvalues, which an
    # eigensolver returns as +-eps * lambda_max, i.e. sqrt noise of ~1e-8 * sigma_max. They form their own
    # diagonal block, so they are lifted to trace(G) (> 0, identical in G and in every submatrix that keeps
    # them): their square roots then cancel exactly-rounded between ||A||_* and ||A_{-c}||_*.
    if c <= length:
        g = b @ b.transpose(1, 2)  # (n, C, C)
        _lift_zero_lines(g)
        full = _nuclear_from_gram(g)
        m = c - 1
        # idx[k] = every channel but k: G_{-k} = G[idx[k]][:, idx[k]]
        idx = torch.arange(c, device=a.device).expand(c, c)[~torch.eye(c, dtype=torch.bool, device=a.device)]
        idx = idx.view(c, m)
    else:
        g = b.transpose(1, 2) @ b  # (n, L, L)
        _lift_zero_lines(g)
        full = _nuclear_from_gram(g)
        m = length
    out = torch.empty(n, c, dtype=torch.float64, device=a.device)
    per = max(1, chunk_elems // (n * m * m))  # channels per step: bounds the stacked submatrices
    for lo in range(0, c, per):
        hi = min(c, lo + per)
        if c <= length:
            sel = idx[lo:hi]
            sub = g[:, sel[:, :, None], sel[:, None, :]]  # (n, k, C-1, C-1)
        else:
            rows = b[:, lo:hi]  # (n, k, L)
            sub = g[:, None] - rows[..., :, None] * rows[..., None, :]  # rank-one downdates (n, k, L, L)
        out[:, lo:hi] = full[:, None] - _nuclear_from_gram(sub)
    return out


def _chip_svd(a: torch.Tensor, chunk_elems: int) -> torch.Tensor:
    """The direct definition: ||A||_* minus the nuclear norm of A with row c zeroed, from float64 SVDs."""
    n, c, length = a.shape
    b = a.to(torch.float64)
    full = torch.linalg.svdvals(b).sum(-1)
    out = torch.empty(n, c, dtype=torch.float64, device=a.device)
    per = max(1, chunk_elems // (n * c * length))
    eye = torch.eye(c, dtype=torch.bool, device=a.device)
    for lo in range(0, c, per):
        hi = min(c, lo + per)
        masked = b[:, None].masked_fill(eye[lo:hi, :, None], 0.0)  # (n, k, C, L): row k zeroed in copy k
        out[:, lo:hi] = full[:, None] - torch.linalg.svdvals(masked).sum(-1)
    return out


# Trapezoidal rule in u = log(s / sqrt(lambda_max)) on [-_U_LO, _U_HI], step _H: the integrand is analytic in the strip
# |Im u| < pi/2 (poles at s^2 = -lambda_k and -mu_j), so the rule's error is ~exp(-pi^2 / h) ~ 5e-15 (relative).
_H, _U_LO, _U_HI = 0.3, 30.0, 36.0  # end values ~e^-30, e^-36 of the peak: negligible
_NODES = torch.arange(-_U_LO, _U_HI + _H / 2, _H, dtype=torch.float64)


def _chip_resolvent(a: torch.Tensor, chunk_elems: int) -> torch.Tensor:
    """Per-image CHIP scores from ONE eigendecomposition per image (the default ``"gram"`` path).

    G = A A^T = sum_k lambda_k u_k u_k^T, w_ck = u_k[c]^2. G' (row/column c of G zeroed) has the eigenvalues
    of the principal submatrix G_{-c} plus 0; sqrt(x) = 2/pi int_0^inf x / (x + s^2) ds and the bordered-inverse
    identity tr((G_{-c} + a)^-1) = tr R - (R^2)_cc / R_cc, R = (G + a)^-1, give

        ||A||_* - ||A_{-c}||_* = 2/pi int_0^inf f_c(s) ds,
        f_c(s) = sum_k w_ck lambda_k / (lambda_k + s^2)^2  /  sum_k w_ck / (lambda_k + s^2),

    a ratio of positive sums (no cancellation). Over the nodes s_q both sums are matrix products W @ R for all
    channels at once: O(C^2 Q) per image instead of C eigenvalue problems. HW < C: the eigenpairs of K = A^T A
    give w_ck = (a_c . v_k)^2 / lambda_k, and the rest of e_c lies in G's null space (weight w0_c, lambda = 0).
    Tails: above s_max the expansion 2/pi (m1 / s_max + (m1^2 - 2 m2) / (3 s_max^3)), m_p = (G^p)_cc; below
    s_min, s_min f(s_min).
    """
    n, c, length = a.shape
    b = a.to(torch.float64)
    if c <= length:
        lam, u = torch.linalg.eigh(b @ b.transpose(1, 2))
        lam = lam.clamp_min(0)
        w = u.square()  # (n, C, C): w[c, k]
        w0 = None
    else:
        lam, v = torch.linalg.eigh(b.transpose(1, 2) @ b)  # (n, L), (n, L, L)
        lam = lam.clamp_min(0)
        tiny = lam <= lam[:, -1:] * (length * 2.0 ** -52)  # numerically zero: part of the null space
        proj = (b @ v).square()  # (n, C, L): (a_c . v_k)^2
        w = torch.where(tiny[:, None, :], 0.0, proj / torch.where(tiny, 1.0, lam)[:, None, :])
        w0 = (1.0 - w.sum(-1)).clamp_min(0)  # (n, C)
        lam = torch.where(tiny, 0.0, lam)
    top = lam[:, -1].clamp_min(torch.finfo(torch.float64).tiny)  # (n,)
    s = top.sqrt()[:, None] * torch.exp(_NODES.to(a.device))[None, :]  # (n, Q)
    s2 = s.square()
    inv = 1.0 / (lam[:, :, None] + s2[:, None, :])  # (n, K, Q)
    den = w @ inv  # (n, C, Q)
    num = w @ (lam[:, :, None] * inv.square())
    if w0 is not None:
        den = den + w0[:, :, None] / s2[:, None, :]
    f = num / den.clamp_min(torch.finfo(torch.float64).tiny)
    # trapezoid in u: ds = s du
    integral = (f * s[:, None, :]).sum(-1) * _H - 0.5 * _H * (f[..., 0] * s[:, None, 0] + f[..., -1] * s[:, None, -1])
    m1 = b.square().sum(-1)  # G_cc
    m2 = (w * lam[:, None, :].square()).sum(-1)  # (G^2)_cc
    smax, smin = s[:, -1:], s[:, :1]
    tail = m1 / smax + (m1.square() - 2 * m2) / (3 * smax ** 3) + smin * f[..., 0]
    return (2.0 / torch.pi) * (integral + tail)


_CHIP_FNS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "gram": _chip_resolvent, "eig": _chip_gram, "svd": _chip_svd}


def _chip_block(a: torch.Tensor, method: str, chunk_elems: int) -> torch.Tensor:
    """Scores (n, C) float64 of float maps (n, C, L); images holding NaN/inf get NaN scores."""
    finite_rows = torch.isfinite(a).all(-1)
    finite = finite_rows.all(-1)
    if not bool(finite.all()):
        a = torch.where(finite[:, None, None], a, 0.0)
    if a.device.type == "mps":  # no float64 on MPS
        return _chip_block(a.cpu(), method, chunk_elems).to(a.device)
    scores = _CHIP_FNS[method](a, chunk_elems)
    zero = a.abs().amax(-1) == 0
    scores = scores.masked_fill_(zero, 0.0)
    return scores.masked_fill_(~finite[:, None], float("nan"))


def _chip_4d(maps: torch.Tensor, method: str, chunk_elems: int, pool: Executor | None, workers: int,
             act: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """CHIP scores (B, C) float64 of maps (B, C, H, W), in pieces of whole images spread over ``pool``.

    A piece holds at most ``chunk_elems`` map elements (at least one image); inside it the stacked
    submatrices are bounded the same way. ``act`` (a rank point's activation) is applied per piece.
    """
    b, c, h, w = maps.shape
    per = max(1, min(chunk_elems // max(1, c * h * w), -(-b // max(1, 2 * workers if pool is not None else 1))))

    def run(piece: torch.Tensor) -> torch.Tensor:
        if act is not None:
            piece = act(piece)
        return _chip_block(piece.reshape(piece.shape[0], c, h * w).to(torch.float32), method, chunk_elems)

    pieces = [maps[i:i + per] for i in range(0, b, per)]
    results = list(pool.map(run, pieces)) if pool is not None else [run(p) for p in pieces]
    return torch.cat(results)


def chip_scores(maps: torch.Tensor, *, method: str = "gram", chunk_elems: int | None = None,
                workers: int | None = None) -> torch.Tensor:
    """Per-image CHIP scores of feature maps ``maps`` (N, C, H, W) or (N, C, L): (N, C) float64.

    Entry (i, c) is ``||A_i||_* - ||A_i with row c zeroed||_*`` for A_i = maps[i] as a C x (H*W) matrix
    (float32 maps, computed in float64). ``method="gram"`` is the fast exact path, ``"svd"`` the direct
    per-channel SVDs. Work is chunked (``chunk_elems``) and, on CPU, spread over ``workers`` threads.
    An image holding NaN/inf gets NaN scores.
    """
    from hrank.errors import HRankError
    from hrank.ranks import _CHUNK_ELEMS, _cpu_pool

    if method not in CHIP_METHODS:
        raise HRankError(f"unknown CHIP method {method!r}; choose one of {', '.join(CHIP_METHODS)}")
    if maps.dim() == 3:
        maps = maps.unsqueeze(-1)
    if maps.dim() != 4:
        raise HRankError(f"chip_scores needs maps of shape (N, C, H, W) or (N, C, L), got {tuple(maps.shape)}")
    if maps.numel() == 0:
        return torch.zeros(maps.shape[:2], dtype=torch.float64, device=maps.device)
    chunk = chunk_elems or _CHUNK_ELEMS.get(maps.device.type, _CHUNK_ELEMS["cuda"])
    if maps.device.type == "cpu":
        n_workers = workers or torch.get_num_threads()
        with _cpu_pool(n_workers) as pool:
            return _chip_4d(maps, method, chunk, pool, n_workers)
    return _chip_4d(maps, method, chunk, None, 1)
