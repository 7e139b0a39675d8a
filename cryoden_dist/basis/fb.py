"""Fourier-Bessel (FB) expansion of particle images: the steerable basis of MFVDM.

Basis
-----
On the disk of radius ``R`` pixels around the image centre, the basis functions are the Dirichlet
eigenfunctions of the Laplacian (the Fourier-Bessel functions)

    psi_{k,q}(r, theta) = c_{k,q} J_k(lambda_{k,q} r / R) exp(i k theta),    r < R,

and zero outside, where ``lambda_{k,q}`` is the ``q``-th positive zero of ``J_k`` (``q = 1, 2, ...``) and
``c_{k,q} = 1 / (sqrt(pi) R |J_{k+1}(lambda_{k,q})|)`` makes them orthonormal on the disk (pixel area 1).
The expansion is truncated with the sampling criterion of Zhao, Shkolnisky & Singer (2016, "Fast steerable
principal component analysis", IEEE TCI 2:1-12): keep ``(k, q)`` when ``lambda_{k,q+1} <= 2 pi c R`` for the
band limit ``c`` in cycles per pixel (``c <= 0.5``, Nyquist). This stricter form (the *next* zero) keeps the
sampled basis well conditioned: the eigenvalues of the pixel Gram matrix lie in [0.82, 1.23] at L = 32-65,
whereas truncating at ``lambda_{k,q} <= 2 pi c R`` lets them spread to [0.33, 1.67].

Conventions
-----------
* Pixels: axes ``(y, x)``, centre pixel ``(L // 2, L // 2)`` as in :mod:`cryoden_dist.image`; ``x`` is the
  last axis (column offset), ``y`` the first (row offset), ``theta = atan2(y, x)``. The disk is the set of
  pixels with distance ``< R`` from the centre (the basis vanishes at ``r = R``); ``R <= L / 2``.
* Real images only need ``k >= 0``: the coefficient of ``-k`` is the complex conjugate of that of ``+k``.
  Coefficients are stored for ``k = 0 .. k_max``, ordered by ``k`` then ``q`` (so the block of one angular
  frequency is a contiguous slice, :meth:`FBBasis.coefficients_at`); ``k = 0`` coefficients are real.
* Normalisation: a coefficient with ``k > 0`` carries both ``+k`` and ``-k`` (it is scaled by ``sqrt(2)``):
  an image is ``sum_q a_{0,q} psi_{0,q} + sqrt(2) sum_{k>0,q} Re(a_{k,q} psi_{k,q})``. The real vector
  ``(Re a, Im a)`` then has orthonormal basis images, so ``||a|| ~= ||image in the disk||`` (the pixel
  sampling makes this approximate: measured within 1 % for random coefficients, 1e-4 for smooth images)
  and inner products carry over: ``<x, y> ~= Re(vdot(a_x, a_y))``.
* Rotation: rotating the image content by ``alpha`` about the centre, i.e. ``theta -> theta + alpha``
  (the point ``(x, y)`` goes to ``(x cos alpha - y sin alpha, x sin alpha + y cos alpha)``), multiplies
  ``a_{k,q}`` by ``exp(-i k alpha)`` (:meth:`FBBasis.rotate`). ``np.rot90(image)`` is ``alpha = -pi / 2``.
* ``expand`` is the least-squares fit of the basis to the pixels inside the disk (the orthogonal projection
  onto the span of the sampled basis), ``evaluate`` the synthesis, ``evaluate_adjoint`` its exact adjoint for
  the real inner products ``sum(image * image')`` and ``Re(vdot(a, a'))``.

Engines
-------
``dense`` (default): the sampled basis as real matrices and the exact least-squares operator
``(A^T A)^{-1} A^T`` (Cholesky of the well-conditioned Gram matrix), precomputed once. The disk pixels are
invariant under the symmetries of the square grid (quarter turns about the centre pixel, reflections), and
each real basis function is even or odd under them according to ``k mod 4`` and cosine/sine part, so the
matrices split exactly into 6 blocks over pixel orbits (:class:`_SymmetryBlock`): 16/3 fewer numbers and
operations than one dense matrix. An image is folded onto orbit representatives by one sparse product,
multiplied by the blocks (BLAS), and unfolded likewise. The radial functions come from the plane-wave
identity below (``scipy.special.jv`` is too slow at high order), matching ``jv`` to 1e-14.

``nufft``: the adjoint computed fast and exactly (to ``eps``) from the plane-wave identity
``J_k(rho r) exp(-i k theta) = i^-k / (2 pi) int exp(i rho r cos(phi - theta)) exp(-i k phi) dphi``: a type-2
NUFFT (finufft) of each image to a polar grid (Chebyshev nodes in ``rho``, equispaced angles), an FFT over
the angle, and barycentric Chebyshev interpolation in ``rho`` to the zeros ``lambda_{k,q} / R`` (the idea of
Marshall, Mickelsen & Singer 2023, "Fast expansion into harmonics on the disk"). ``evaluate`` is its exact
adjoint (type-1 NUFFT) and ``expand`` solves the normal equations by conjugate gradients (Gram condition
number ~1.5: about 6 iterations, 2 transforms each, for eps = 1e-6). Memory ``O(L^2)`` per image.

Why ``dense`` is the default (``benchmarks/fb_expansion.py``, one core of a shared 2-core AMD EPYC, images
per second for expand / evaluate / adjoint, errors against the exact least squares):

=========================  =======================  ======================  =================
engine                     L = 65 (n = 2000)        L = 128 (n = 400)       relative error
=========================  =======================  ======================  =================
dense float64              6944 / 2693 / 7000       677 / 600 / 670         exact (jv: 1e-14)
dense float32              8941 / 3852 / 5902       877 / 1007 / 762        3e-7
nufft float64, eps 1e-6    47 / 838 / 476           12 / 188 / 138          2e-7 .. 8e-7
fle_2d, eps 1e-6           8 / 126 / 197            6 / 29 / 30             2e-4 (expand)
=========================  =======================  ======================  =================

Dense expands 10^4 images at L = 65 in 1.4 s on one core (build 0.4 s, 21 MiB), 150x faster than the NUFFT
least squares and 15x faster for the adjoint; at L = 128 it needs 354 MiB (float64) and a 10 s build, and
is still 50x faster. ``fle_2d`` (MIT) needs ``joblib`` (not installed), expands one image at a time by CG
(to 1e-3 by default) and fixes the radius to ``ceil(L / 2)``. ``engine="auto"`` takes ``dense`` while its
matrices fit in 512 MiB (L up to 140 in float64, ~170 in float32) and the NUFFT engine beyond, whose
memory stays small.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.special

from ..errors import ParameterError
from ..image import centered_coordinates

__all__ = ["ENGINES", "FBBasis", "bessel_zeros_table", "dense_basis_matrix"]

ENGINES = ("auto", "dense", "nufft")

# Dense matrices (basis and least-squares operator) larger than this make `engine="auto"` use the NUFFT.
DENSE_BUDGET_BYTES = 512 * 2**20


def bessel_zeros_table(radius: float, bandlimit: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Angular frequency, radial index and Bessel zero of every kept basis function.

    Keeps ``(k, q)`` with ``lambda_{k,q+1} <= 2 pi bandlimit radius`` (Zhao, Shkolnisky & Singer 2016),
    ordered by ``k`` then ``q``.

    Parameters
    ----------
    radius : float
        Disk radius ``R`` in pixels.
    bandlimit : float
        Band limit ``c`` in cycles per pixel.

    Returns
    -------
    k : ndarray of int64
        Angular frequency ``k >= 0`` per basis function.
    q : ndarray of int64
        Radial index ``q >= 1`` (``lambda_{k,q}`` is the ``q``-th positive zero of ``J_k``).
    zeros : ndarray of float64
        ``lambda_{k,q}``.
    """
    limit = 2 * np.pi * bandlimit * radius
    ks, qs, zeros = [], [], []
    k = 0
    while True:
        # The first zero of J_k exceeds k and later ones are about pi apart: start with that many, and
        # take more until one lies beyond the limit (so none below it is missed).
        n_try = max(int(np.ceil((limit - k) / np.pi)), 0) + 2
        z = scipy.special.jn_zeros(k, n_try)
        while z[-1] <= limit:
            n_try *= 2
            z = scipy.special.jn_zeros(k, n_try)
        n_keep = int(np.count_nonzero(z[1:] <= limit))
        if n_keep == 0:
            break
        ks.append(np.full(n_keep, k))
        qs.append(np.arange(1, n_keep + 1))
        zeros.append(z[:n_keep])
        k += 1
    if not ks:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(ks).astype(np.int64), np.concatenate(qs).astype(np.int64), np.concatenate(zeros)


def _disk_polar(box: int, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask of the pixels strictly inside the disk and their polar coordinates ``(r, theta)``."""
    y, x = centered_coordinates(box)
    r = np.hypot(x, y)
    inside = r < radius
    return inside, r[inside], np.arctan2(y[inside], x[inside])


def _normalisation(k: np.ndarray, zeros: np.ndarray, radius: float) -> np.ndarray:
    """``c_{k,q}`` (orthonormal on the disk) times ``sqrt(2)`` for ``k > 0`` (the ``-k`` partner)."""
    c = 1.0 / (np.sqrt(np.pi) * radius * np.abs(scipy.special.jv(k + 1, zeros)))
    return np.where(k > 0, np.sqrt(2.0), 1.0) * c


def _chebyshev_interpolation(nodes_count: int, targets: np.ndarray) -> np.ndarray:
    """Barycentric interpolation matrix from Chebyshev points (first kind) on [-1, 1] to ``targets``."""
    j = np.arange(nodes_count)
    angles = (2 * j + 1) * np.pi / (2 * nodes_count)
    nodes = np.cos(angles)
    weights = (-1.0) ** j * np.sin(angles)
    diff = targets[:, None] - nodes[None, :]
    exact = diff == 0
    diff[exact] = 1.0
    terms = weights[None, :] / diff
    matrix = terms / terms.sum(axis=1, keepdims=True)
    hit = exact.any(axis=1)
    matrix[hit] = exact[hit].astype(np.float64)
    return matrix


class _PolarGrid:
    """A polar grid of the Fourier plane that resolves every basis function to a relative ``eps``.

    Radii ``rho`` (radians/pixel) are Chebyshev points on ``[0, lambda_max / R]``, angles ``2 pi j /
    n_angles``. ``interpolation[k]`` maps values at the ``rho`` nodes of a function with band width ``R`` in
    ``rho`` (such as ``J_k(rho r)``, ``r <= R``) to ``rho = lambda_{k,q} / R`` for every ``q`` of ``k``.
    """

    def __init__(self, basis: FBBasis, eps: float) -> None:
        zeros, radius = basis.bessel_zeros, basis.radius
        lam_max = float(zeros.max())
        # The margins are measured: with them the NUFFT engine matches the dense one to ~eps (tests/test_fb.py).
        digits = -np.log10(max(eps, 1e-15))
        margin = int(np.ceil(8 + 1.5 * digits + 2 * lam_max ** (1 / 3)))
        # exp(i rho r cos(phi - theta)) has angular frequencies up to ~rho r <= lam_max: with k_max more, no
        # frequency folds onto 0..k_max.
        n_angles = basis.k_max + int(np.ceil(lam_max)) + margin
        self.n_angles = n_angles + n_angles % 2
        # Band width R in rho over [0, lam_max / R] is lam_max / 2 radians per unit of the Chebyshev variable.
        self.n_radial = int(np.ceil(lam_max / 2)) + margin
        t = np.cos((2 * np.arange(self.n_radial) + 1) * np.pi / (2 * self.n_radial))
        self.rho = (lam_max / radius) * (t + 1) / 2
        self.phi = 2 * np.pi * np.arange(self.n_angles) / self.n_angles
        targets = 2 * zeros / lam_max - 1
        self.interpolation = [
            _chebyshev_interpolation(self.n_radial, targets[basis.coefficients_at(k)]) for k in range(basis.k_max + 1)
        ]


def _radial_functions(basis: FBBasis, radii: np.ndarray) -> np.ndarray:
    """``J_k(lambda_{k,q} r / R)`` for every coefficient (columns) and radius ``r`` (rows), to ~1e-13.

    ``scipy.special.jv`` costs microseconds per value at high order. Here all orders come at once from
    ``fft_phi(exp(i z cos phi)) / n = i^n J_n(z)`` for ``z = rho r`` with ``rho`` and ``r`` both on Chebyshev
    nodes (``J_k(rho r)`` has band width ``R`` in ``rho`` and ``rho_max`` in ``r``), then Chebyshev
    interpolation to ``rho = lambda_{k,q} / R`` and to the pixel radii.
    """
    grid = _PolarGrid(basis, eps=1e-14)
    k_range = np.arange(basis.k_max + 1)
    t = np.cos((2 * np.arange(grid.n_radial) + 1) * np.pi / (2 * grid.n_radial))
    r_nodes = basis.radius * (t + 1) / 2
    phase = (1j) ** (-(k_range % 4)) / grid.n_angles
    at_nodes = np.empty((grid.n_radial, grid.n_radial, k_range.size))  # [rho node, r node, k]
    for i, rho in enumerate(grid.rho):  # one rho node at a time bounds the work array to n_r x n_angles
        plane_waves = np.exp(1j * (rho * r_nodes)[:, None] * np.cos(grid.phi)[None, :])
        at_nodes[i] = (np.fft.fft(plane_waves, axis=1)[:, : k_range.size] * phase).real
    on_r_nodes = np.empty((grid.n_radial, basis.count))
    for k, matrix in enumerate(grid.interpolation):
        on_r_nodes[:, basis.coefficients_at(k)] = (matrix @ at_nodes[:, :, k]).T
    return _chebyshev_interpolation(grid.n_radial, 2 * radii / basis.radius - 1) @ on_r_nodes


def _real_parameters(basis: FBBasis) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coefficient index, cosine (Re) or sine (Im) part, and angular frequency of every real parameter.

    Real parameters are ``Re a`` for every coefficient, then ``Im a`` for the ``k > 0`` ones.
    """
    n0 = basis.coefficients_at(0).stop
    coefficient = np.concatenate([np.arange(basis.count), np.arange(n0, basis.count)])
    return coefficient, np.arange(coefficient.size) < basis.count, basis.angular_frequency[coefficient]


class _SampledBasis:
    """Values of the real basis functions (one per real parameter) at the pixels inside the disk."""

    def __init__(self, basis: FBBasis) -> None:
        _, r, self.theta = _disk_polar(basis.box, basis.radius)
        # Pixels share few distinct radii (r^2 is an integer): radial functions are computed once per radius.
        radii, self.ring = np.unique(r, return_inverse=True)
        k = basis.angular_frequency
        self.radial = _radial_functions(basis, radii) * _normalisation(k, basis.bessel_zeros, basis.radius)
        self.coefficient, self.is_cosine, self.frequency = _real_parameters(basis)

    def matrix(self, pixels: np.ndarray, params: np.ndarray) -> np.ndarray:
        """Real matrix ``[pixels, params]``: ``c J_k cos(k theta)`` for Re parts, ``-c J_k sin(k theta)`` for Im."""
        values = self.radial[np.ix_(self.ring[pixels], self.coefficient[params])]
        angle = np.outer(self.theta[pixels], self.frequency[params])
        cosine = self.is_cosine[params]
        if cosine.all():  # the symmetry blocks are all-cosine or all-sine: no masked copies
            return values * np.cos(angle)
        if not cosine.any():
            return values * -np.sin(angle)
        return values * np.where(cosine, np.cos(angle), -np.sin(angle))


def dense_basis_matrix(basis: FBBasis) -> np.ndarray:
    """The sampled basis as a real matrix over the pixels inside the disk.

    Columns ``0 .. count-1`` hold the images of ``Re a`` (``psi`` for ``k = 0``, ``sqrt(2) Re psi`` for
    ``k > 0``), then one column per ``k > 0`` coefficient for ``Im a`` (``-sqrt(2) Im psi``), so that
    ``image[basis.mask] = A @ concatenate([a.real, a.imag[k > 0]])``.

    Parameters
    ----------
    basis : FBBasis

    Returns
    -------
    ndarray, shape (n_inside, 2 * count - count_k0), float64
    """
    return _SampledBasis(basis).matrix(np.arange(basis.n_inside), np.arange(basis.n_real))


class _SymmetryBlock:
    """The real parameters of one symmetry type and the pixel orbits that determine them.

    The disk pixels are invariant under the dihedral group D4 of the square grid (rotations by pi/2 about
    the centre pixel, reflection y -> -y). Every real basis function f transforms by a character,
    ``f(g p) = chi(g) f(p)``: cosine parts with k = 0 mod 4 are invariant, sine parts with k = 0 mod 4 flip
    sign under the reflection, k = 2 mod 4 flip under the quarter turn, odd k flip under the half turn (for
    odd k only the half turn and the reflections act by a sign: the Klein subgroup). Basis functions of
    different types are exactly orthogonal on the pixels, and the inner products of one type are sums over
    one representative per orbit (weighted by the orbit size), so the least squares splits into 6 blocks of
    about 1/8 (even k) or 1/4 (odd k) of the pixels and of the parameters: 16/3 fewer operations and
    numbers than one dense matrix.
    """

    def __init__(self, params: np.ndarray, gather: np.ndarray, signs: list[int], scale: np.ndarray) -> None:
        self.params = params  # indices into the real parameter vector
        self.gather = gather  # [group elements, representatives]: disk-pixel index of g(rep)
        self.signs = signs  # character chi(g) per group element
        self.scale = scale  # orbit size / group order per representative

    @property
    def size(self) -> int:
        return self.gather.shape[1] * self.params.size


def _fold_operators(blocks: list[_SymmetryBlock], inside: np.ndarray, n_pixels: int, dtype) -> tuple:
    """Sparse maps between image pixels and the representatives of all blocks (stacked in order).

    ``fold @ image`` gives ``sum_g chi(g) x(g rep)`` for every representative (the component of the image of
    each type); ``unfold @ values`` puts ``chi(g) values(rep)`` at every pixel ``g(rep)``, summed over types.
    One sparse product replaces 6-8 gathers per block (3-6x faster in our measurements).
    """
    fold_rows, fold_cols, fold_vals, unfold_rows, unfold_cols, unfold_vals = [], [], [], [], [], []
    offset = 0
    for block in blocks:
        n_reps = block.gather.shape[1]
        member = np.full(inside.size, -1)
        member_sign = np.zeros(inside.size)
        for sign, gather in zip(block.signs, block.gather, strict=True):
            fold_rows.append(offset + np.arange(n_reps))
            fold_cols.append(inside[gather])
            fold_vals.append(np.full(n_reps, float(sign)))
            # Every disk pixel is g(rep) of at most one kept representative (0 where the type vanishes).
            member[gather] = offset + np.arange(n_reps)
            member_sign[gather] = sign
        hit = member >= 0
        unfold_rows.append(inside[hit])
        unfold_cols.append(member[hit])
        unfold_vals.append(member_sign[hit])
        offset += n_reps
    fold = scipy.sparse.csr_matrix(
        (np.concatenate(fold_vals), (np.concatenate(fold_rows), np.concatenate(fold_cols))),
        shape=(offset, n_pixels),
        dtype=dtype,
    )
    unfold = scipy.sparse.csr_matrix(
        (np.concatenate(unfold_vals), (np.concatenate(unfold_rows), np.concatenate(unfold_cols))),
        shape=(n_pixels, offset),
        dtype=dtype,
    )
    return fold, unfold


def _symmetry_blocks(basis: FBBasis) -> list[_SymmetryBlock]:
    """The 6 symmetry blocks of the real parameters (see :class:`_SymmetryBlock`), without matrices."""
    box, centre = basis.box, basis.box // 2
    y, x = centered_coordinates(box)
    index = np.full((box, box), -1)
    index[basis.mask] = np.arange(basis.n_inside)
    dy, dx = y[basis.mask].astype(np.int64), x[basis.mask].astype(np.int64)

    def image_of(reflect: int, quarter_turns: int) -> np.ndarray:
        # g = F^reflect R^quarter_turns with R: (x, y) -> (-y, x) and F: (x, y) -> (x, -y).
        gx, gy = dx, dy
        for _ in range(quarter_turns):
            gx, gy = -gy, gx
        return index[centre + (-gy if reflect else gy), centre + gx]

    dihedral = [(f, j) for f in (0, 1) for j in range(4)]
    klein = [(f, j) for f in (0, 1) for j in (0, 2)]
    _, cosine, k = _real_parameters(basis)
    types = [
        (cosine & (k % 4 == 0), dihedral, lambda f, j: 1),
        (~cosine & (k % 4 == 0), dihedral, lambda f, j: (-1) ** f),
        (cosine & (k % 4 == 2), dihedral, lambda f, j: (-1) ** j),
        (~cosine & (k % 4 == 2), dihedral, lambda f, j: (-1) ** (f + j)),
        (cosine & (k % 2 == 1), klein, lambda f, j: (-1) ** (j // 2)),
        (~cosine & (k % 2 == 1), klein, lambda f, j: (-1) ** (f + j // 2)),
    ]
    blocks = []
    for selected, group, character in types:
        if not selected.any():
            continue
        moved = np.stack([image_of(f, j) for f, j in group])  # [element, pixel]: index of g(pixel)
        signs = [character(f, j) for f, j in group]
        orbit_min = moved.min(axis=0)
        reps = np.unique(orbit_min)
        orbit_size = np.bincount(orbit_min)[reps]
        # A representative fixed by an element of character -1 carries 0 for this type: drop it.
        forbidden = ((moved[:, reps] == reps[None, :]) & (np.array(signs)[:, None] < 0)).any(axis=0)
        keep = ~forbidden
        blocks.append(
            _SymmetryBlock(np.flatnonzero(selected), moved[:, reps[keep]], signs, orbit_size[keep] / len(group))
        )
    return blocks


class FBBasis:
    """Fourier-Bessel basis of ``L x L`` images on a disk, with fast batched expansion.

    Parameters
    ----------
    box : int
        Image side ``L`` (even or odd).
    radius : float, optional
        Disk radius ``R`` in pixels, ``0 < R <= L / 2``; default ``L // 2``.
    bandlimit : float, optional
        Band limit ``c`` in cycles per pixel, ``0 < c <= 0.5``; default 0.5 (Nyquist).
    eps : float
        Requested relative accuracy of the NUFFT engine (transforms and least-squares solve); the dense
        engine is exact to rounding.
    dtype : numpy dtype
        ``float64`` or ``float32``: precision of the computation; coefficients are complex of the matching
        precision.
    engine : {"auto", "dense", "nufft"}
        Algorithm (see the module docstring); ``"auto"`` takes ``"dense"`` while its matrices fit in
        512 MiB.

    Attributes
    ----------
    angular_frequency : ndarray of int64, shape (count,)
        ``k`` of each coefficient.
    radial_index : ndarray of int64, shape (count,)
        ``q`` of each coefficient (1-based: ``lambda_{k,q}`` is the ``q``-th zero of ``J_k``).
    bessel_zeros : ndarray of float64, shape (count,)
        ``lambda_{k,q}``; the radial frequency of a basis function is ``lambda / (2 pi R)`` cycles/pixel.
    count : int
        Number of stored (``k >= 0``) coefficients.
    k_max : int
        Largest angular frequency.
    mask : ndarray of bool, shape (L, L)
        Pixels inside the disk (distance ``< R``).
    n_inside : int
        Number of pixels inside the disk.
    n_real : int
        Number of real parameters (``2 count`` minus the number of ``k = 0`` coefficients).
    engine : str
        The engine in use (``"dense"`` or ``"nufft"``).
    dense_bytes : int or None
        Memory of the dense engine's matrices (None when only the NUFFT engine was asked for).
    """

    def __init__(
        self,
        box: int,
        radius: float | None = None,
        bandlimit: float | None = None,
        eps: float = 1e-6,
        dtype=np.float64,
        engine: str = "auto",
    ) -> None:
        box = int(box)
        if box < 2:
            raise ParameterError(f"FB basis: box {box} is too small; use images of at least 2 x 2 pixels")
        radius = float(box // 2 if radius is None else radius)
        if not 0 < radius <= box / 2:
            raise ParameterError(
                f"FB basis: radius {radius:g} px is outside (0, {box / 2:g}] for box {box}; "
                f"use a radius of at most half the box"
            )
        bandlimit = 0.5 if bandlimit is None else float(bandlimit)
        if not 0 < bandlimit <= 0.5:
            raise ParameterError(
                f"FB basis: bandlimit {bandlimit:g} cycles/pixel is outside (0, 0.5]; use at most 0.5 (Nyquist)"
            )
        if not 0 < eps < 1:
            raise ParameterError(f"FB basis: eps {eps:g} is outside (0, 1); use e.g. 1e-6")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ParameterError(f"FB basis: dtype {dtype} is not supported; use float32 or float64")
        if engine not in ENGINES:
            raise ParameterError(f"FB basis: engine {engine!r} is unknown; use one of {', '.join(ENGINES)}")

        self.box = box
        self.radius = radius
        self.bandlimit = bandlimit
        self.eps = float(eps)
        self.dtype = dtype
        self.complex_dtype = np.result_type(dtype, np.complex64)
        k, q, zeros = bessel_zeros_table(radius, bandlimit)
        if k.size == 0:
            raise ParameterError(
                f"FB basis: radius {radius:g} px with bandlimit {bandlimit:g} keeps no basis function; "
                f"use a larger radius or bandlimit"
            )
        self.angular_frequency = k
        self.radial_index = q
        self.bessel_zeros = zeros
        self.count = int(k.size)
        self.k_max = int(k.max())
        bounds = np.searchsorted(k, np.arange(self.k_max + 2))
        self._slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        self.mask = _disk_polar(box, radius)[0]
        self.n_inside = int(self.mask.sum())
        self.n_real = 2 * self.count - self._slices[0].stop
        self.dense_bytes = None
        if engine != "nufft":
            blocks = _symmetry_blocks(self)
            # Two matrices (synthesis and least-squares fit) per block.
            self.dense_bytes = 2 * sum(block.size for block in blocks) * dtype.itemsize
            if engine == "auto":
                engine = "dense" if self.dense_bytes <= DENSE_BUDGET_BYTES else "nufft"
        self.engine = engine
        self._engine = _DenseEngine(self, blocks) if engine == "dense" else _PolarNUFFTEngine(self)

    @classmethod
    @functools.lru_cache(maxsize=8)
    def cached(
        cls,
        box: int,
        radius: float | None = None,
        bandlimit: float | None = None,
        eps: float = 1e-6,
        dtype: str = "float64",
        engine: str = "auto",
    ) -> FBBasis:
        """A basis shared by every caller in this process with the same arguments.

        Building the dense engine takes about a second at L = 65; Dask kernels call this so each worker
        process builds a basis once. The returned object must not be modified.
        """
        return cls(box, radius=radius, bandlimit=bandlimit, eps=eps, dtype=dtype, engine=engine)

    def __repr__(self) -> str:
        return (
            f"FBBasis(box={self.box}, radius={self.radius:g}, bandlimit={self.bandlimit:g}, count={self.count}, "
            f"k_max={self.k_max}, engine={self.engine!r}, dtype={self.dtype.name})"
        )

    def coefficients_at(self, k: int) -> slice:
        """Slice of the coefficients of angular frequency ``k`` (``coeffs[:, basis.coefficients_at(k)]``)."""
        if not 0 <= k <= self.k_max:
            raise ParameterError(f"FB basis: angular frequency {k} is outside 0..{self.k_max}")
        return self._slices[k]

    # ----------------------------------------------------------------------------------------------
    # Conversions between complex coefficients and the real parameter vector (Re a, Im a for k > 0).

    def _to_real(self, coeffs: np.ndarray) -> np.ndarray:
        n0 = self._slices[0].stop
        return np.concatenate([coeffs.real, coeffs.imag[:, n0:]], axis=1).astype(self.dtype, copy=False)

    def _from_real(self, params: np.ndarray) -> np.ndarray:
        n0 = self._slices[0].stop
        coeffs = np.empty((params.shape[0], self.count), dtype=self.complex_dtype)
        coeffs.real = params[:, : self.count]
        coeffs.imag[:, :n0] = 0
        coeffs.imag[:, n0:] = params[:, self.count :]
        return coeffs

    def _check_images(self, images: np.ndarray) -> tuple[np.ndarray, bool]:
        images = np.asarray(images)
        single = images.ndim == 2
        if single:
            images = images[None]
        if images.ndim != 3 or images.shape[1:] != (self.box, self.box):
            raise ParameterError(
                f"FB basis: images of shape {images.shape} do not match the basis box {self.box}; "
                f"pass [n, {self.box}, {self.box}]"
            )
        if np.iscomplexobj(images):
            raise ParameterError("FB basis: images are complex; the FB expansion takes real images")
        return images.astype(self.dtype, copy=False), single

    def _check_coeffs(self, coeffs: np.ndarray) -> tuple[np.ndarray, bool]:
        coeffs = np.asarray(coeffs)
        single = coeffs.ndim == 1
        if single:
            coeffs = coeffs[None]
        if coeffs.ndim != 2 or coeffs.shape[1] != self.count:
            raise ParameterError(
                f"FB basis: coefficients of shape {coeffs.shape} do not match the basis; pass [n, {self.count}]"
            )
        coeffs = coeffs.astype(self.complex_dtype, copy=True)
        # k = 0 coefficients of real images are real: the imaginary part carries nothing.
        coeffs.imag[:, self._slices[0]] = 0
        return coeffs, single

    # ----------------------------------------------------------------------------------------------

    def expand(self, images: np.ndarray) -> np.ndarray:
        """Least-squares FB coefficients of real images (fit to the pixels inside the disk).

        Parameters
        ----------
        images : ndarray, shape (n, L, L) or (L, L)
            Real images; pixels outside the disk are ignored.

        Returns
        -------
        ndarray, shape (n, count) or (count,), complex
            Coefficients for ``k = 0 .. k_max`` (``k = 0`` ones real).
        """
        images, single = self._check_images(images)
        coeffs = self._engine.expand(images)
        return coeffs[0] if single else coeffs

    def evaluate(self, coeffs: np.ndarray) -> np.ndarray:
        """Images of FB coefficients (synthesis); zero outside the disk.

        Parameters
        ----------
        coeffs : ndarray, shape (n, count) or (count,), complex
            The imaginary part of ``k = 0`` coefficients is ignored.

        Returns
        -------
        ndarray, shape (n, L, L) or (L, L), of the basis ``dtype``
        """
        coeffs, single = self._check_coeffs(coeffs)
        images = self._engine.evaluate(coeffs)
        return images[0] if single else images

    def evaluate_adjoint(self, images: np.ndarray) -> np.ndarray:
        """Adjoint of :meth:`evaluate`: ``sum(evaluate(a) * x) == Re(vdot(a, evaluate_adjoint(x)))``.

        Parameters
        ----------
        images : ndarray, shape (n, L, L) or (L, L)

        Returns
        -------
        ndarray, shape (n, count) or (count,), complex
        """
        images, single = self._check_images(images)
        coeffs = self._engine.adjoint(images)
        return coeffs[0] if single else coeffs

    def rotate(self, coeffs: np.ndarray, angle: float | np.ndarray) -> np.ndarray:
        """Coefficients of the images rotated by ``angle`` radians (``theta -> theta + angle``).

        Parameters
        ----------
        coeffs : ndarray, shape (n, count) or (count,)
        angle : float or ndarray of shape (n,)
            One angle, or one per image.

        Returns
        -------
        ndarray, same shape as ``coeffs``
        """
        coeffs = np.asarray(coeffs)
        angle = np.asarray(angle, dtype=np.float64)
        phase = np.exp(-1j * angle[..., None] * self.angular_frequency)
        return (coeffs * phase).astype(np.result_type(coeffs.dtype, self.complex_dtype), copy=False)


class _DenseEngine:
    """Exact least squares with dense matrices per symmetry block (BLAS products).

    Works on transposed data (pixels or parameters x images) so that the per-block slices are contiguous
    rows.
    """

    def __init__(self, basis: FBBasis, blocks: list[_SymmetryBlock]) -> None:
        self.basis = basis
        sampled = _SampledBasis(basis)
        self.params = [block.params for block in blocks]
        bounds = np.cumsum([0] + [block.gather.shape[1] for block in blocks])
        self.reps = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        self.fold, self.unfold = _fold_operators(blocks, np.flatnonzero(basis.mask), basis.box**2, basis.dtype)
        self.scale = [block.scale[:, None].astype(basis.dtype) for block in blocks]
        self.synthesis, self.fit = [], []
        for block in blocks:
            synthesis = sampled.matrix(block.gather[0], block.params)
            weighted = synthesis * block.scale[:, None]
            # Gram = sum over orbits of orbit size * outer products; it is well conditioned (eigenvalues
            # ~0.8-1.25), so Cholesky in float64 gives the exact least-squares operator.
            gram = len(block.signs) * (synthesis.T @ weighted)
            fit = scipy.linalg.cho_solve(scipy.linalg.cho_factor(gram), weighted.T)
            self.fit.append(np.ascontiguousarray(fit, dtype=basis.dtype))
            self.synthesis.append(np.ascontiguousarray(synthesis, dtype=basis.dtype))

    def _fold(self, images: np.ndarray) -> np.ndarray:
        return self.fold @ images.reshape(images.shape[0], -1).T

    def _parameters(self, folded: np.ndarray, matrices: list[np.ndarray]) -> np.ndarray:
        params = np.empty((self.basis.n_real, folded.shape[1]), dtype=self.basis.dtype)
        for rows, reps, matrix in zip(self.params, self.reps, matrices, strict=True):
            params[rows] = matrix @ folded[reps]
        return self.basis._from_real(params.T)

    def expand(self, images: np.ndarray) -> np.ndarray:
        return self._parameters(self._fold(images), self.fit)

    def adjoint(self, images: np.ndarray) -> np.ndarray:
        folded = self._fold(images)
        for reps, scale in zip(self.reps, self.scale, strict=True):
            folded[reps] *= scale  # sum over each orbit = orbit size x value at its representative
        return self._parameters(folded, [synthesis.T for synthesis in self.synthesis])

    def evaluate(self, coeffs: np.ndarray) -> np.ndarray:
        params = np.ascontiguousarray(self.basis._to_real(coeffs).T)
        values = np.empty((self.unfold.shape[1], coeffs.shape[0]), dtype=self.basis.dtype)
        for rows, reps, matrix in zip(self.params, self.reps, self.synthesis, strict=True):
            values[reps] = matrix @ params[rows]
        images = self.unfold @ values
        box = self.basis.box
        return np.ascontiguousarray(images.T).reshape(-1, box, box)


class _PolarNUFFTEngine:
    """Adjoint by NUFFT to a polar grid + angular FFT + Chebyshev interpolation; expand by CG."""

    # Bytes of polar-grid work array per NUFFT call (images are processed in batches that fit).
    work_bytes = 64 * 2**20
    max_iterations = 30
    threads = 1

    def __init__(self, basis: FBBasis) -> None:
        self.basis = basis
        grid = _PolarGrid(basis, basis.eps)
        self.n_radial, self.n_angles = grid.n_radial, grid.n_angles
        self.batch = max(8, self.work_bytes // (self.n_radial * self.n_angles * basis.complex_dtype.itemsize))
        half = grid.phi[: self.n_angles // 2]
        # finufft pairs the first point coordinate with the first array axis (y).
        self.points_y = (grid.rho[:, None] * np.sin(half)[None, :]).ravel()
        self.points_x = (grid.rho[:, None] * np.cos(half)[None, :]).ravel()
        # Per k: interpolation to lambda_{k,q} / R, with the i^-k of the plane-wave identity and c_{k,q}.
        k = basis.angular_frequency
        scale = _normalisation(k, basis.bessel_zeros, basis.radius) * (1j) ** (-(k % 4))
        self.blocks = [
            (matrix * scale[basis.coefficients_at(kk), None]).astype(basis.complex_dtype)
            for kk, matrix in enumerate(grid.interpolation)
        ]

    def _plan(self, kind: int, n_trans: int):
        """A finufft plan on the polar points (made per call: 0.5 ms, and plans do not pickle)."""
        import finufft

        basis = self.basis
        # Type 2 (isign +1) samples F(omega) = sum_p x_p exp(i omega . p); type 1 (isign -1) is its adjoint.
        plan = finufft.Plan(
            kind,
            (basis.box, basis.box),
            n_trans=n_trans,
            eps=max(basis.eps, 1e-6 if basis.dtype == np.float32 else 1e-15),
            isign=1 if kind == 2 else -1,
            dtype=basis.complex_dtype.name,
            # One thread: parallelism comes from Dask workers (one per core); OpenMP threads competing
            # with them for the cores made a 4-image expand 15x slower in our measurements.
            nthreads=self.threads,
        )
        plan.setpts(self.points_y.astype(basis.dtype), self.points_x.astype(basis.dtype))
        return plan

    def _batches(self, n: int):
        for start in range(0, n, self.batch):
            yield slice(start, min(start + self.batch, n))

    def adjoint(self, images: np.ndarray) -> np.ndarray:
        basis = self.basis
        out = np.empty((images.shape[0], basis.count), dtype=basis.complex_dtype)
        for sl in self._batches(images.shape[0]):
            chunk = np.where(basis.mask, images[sl], 0).astype(basis.complex_dtype)
            half = self._plan(2, chunk.shape[0]).execute(chunk).reshape(chunk.shape[0], self.n_radial, -1)
            # A real image has F(rho, phi + pi) = conj F(rho, phi): only half the angles are sampled.
            ring = np.concatenate([half, half.conj()], axis=2)
            spectrum = np.fft.fft(ring, axis=2)[:, :, : basis.k_max + 1] / self.n_angles
            for kk, matrix in enumerate(self.blocks):
                out[sl, basis.coefficients_at(kk)] = spectrum[:, :, kk] @ matrix.T
        out.imag[:, basis.coefficients_at(0)] = 0
        return out

    def evaluate(self, coeffs: np.ndarray) -> np.ndarray:
        # The exact adjoint of `adjoint`, step by step in reverse order.
        basis = self.basis
        out = np.empty((coeffs.shape[0], basis.box, basis.box), dtype=basis.dtype)
        for sl in self._batches(coeffs.shape[0]):
            n = sl.stop - sl.start
            spectrum = np.zeros((n, self.n_radial, self.n_angles), dtype=basis.complex_dtype)
            for kk, matrix in enumerate(self.blocks):
                spectrum[:, :, kk] = coeffs[sl, basis.coefficients_at(kk)] @ matrix.conj()
            ring = np.fft.ifft(spectrum, axis=2)
            half = ring[:, :, : self.n_angles // 2] + ring[:, :, self.n_angles // 2 :].conj()
            images = self._plan(1, n).execute(np.ascontiguousarray(half.reshape(n, -1)))
            out[sl] = np.where(basis.mask, images.real, 0)
        return out

    def expand(self, images: np.ndarray) -> np.ndarray:
        """Least squares by conjugate gradients on the normal equations, all images at once."""
        basis = self.basis
        rhs = self.adjoint(images)
        # The Gram matrix is close to the identity: start from the right-hand side.
        solution = rhs.copy()
        residual = rhs - self.adjoint(self.evaluate(solution))
        direction = residual.copy()
        rhs_norm2 = np.maximum(_real_dot(rhs, rhs), np.finfo(basis.dtype).tiny)
        res_norm2 = _real_dot(residual, residual)
        # Stop at eps relative residual, or where rounding in the basis precision stalls the recurrence.
        tol2 = max(basis.eps, 50 * np.finfo(basis.dtype).eps) ** 2
        for _ in range(self.max_iterations):
            active = res_norm2 > tol2 * rhs_norm2
            if not active.any():
                break
            gram_direction = self.adjoint(self.evaluate(direction[active]))
            step = res_norm2[active] / _real_dot(direction[active], gram_direction)
            solution[active] += step[:, None] * direction[active]
            residual[active] -= step[:, None] * gram_direction
            new_norm2 = _real_dot(residual[active], residual[active])
            direction[active] = residual[active] + (new_norm2 / res_norm2[active])[:, None] * direction[active]
            res_norm2[active] = new_norm2
        return solution


def _real_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row real inner product ``Re(vdot(a_i, b_i))``."""
    return np.einsum("ij,ij->i", a.real, b.real) + np.einsum("ij,ij->i", a.imag, b.imag)
