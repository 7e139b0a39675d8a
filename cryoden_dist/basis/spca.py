"""Steerable PCA (sPCA) of Fourier-Bessel coefficients with Wiener-like shrinkage, and ``spca-wiener`` denoising.

Model
-----
The Fourier-Bessel (FB) coefficients of an image (:class:`~cryoden_dist.basis.fb.FBBasis`) are ``a = s + e``: the
signal ``s`` and the expansion of white pixel noise. Particles are seen at uniformly random in-plane angles, so the
population of images is invariant under rotation, which multiplies ``a_{k,q}`` by ``exp(-i k alpha)``; hence

* the mean is zero for every ``k > 0`` (only the ``k = 0`` block has a mean ``mu``), and
* the covariance is block diagonal in ``k``: ``C_k = E[(a_k - mu_k)(a_k - mu_k)^H]``, ``q_k x q_k`` Hermitian.

Cryo-EM images are also invariant under reflection in distribution (the mirror image of a projection along ``v``
is a projection along ``-v``), and reflection conjugates the coefficients (``theta -> -theta``). The covariance
used here is that of the images *and* their mirror images: ``Re(C_k)``. Its eigenvectors are real, which is what
makes the sPCA coefficients of a mirrored image the complex conjugates of the image's own (the rule the invariant
features of :mod:`cryoden_dist.features` rely on).

Noise of the coefficients
-------------------------
``FBBasis.expand`` is the least-squares fit ``a = (A^T A)^{-1} A^T y`` of the real basis images ``A`` (the real
parameters ``Re a``, and ``Im a`` for ``k > 0``; the ``sqrt(2)`` scaling of ``k > 0`` makes those columns
orthonormal in the continuum). White pixel noise of variance ``sigma^2`` therefore gives real parameters of
covariance ``sigma^2 (A^T A)^{-1}``: about ``sigma^2`` each, so ``E|e_{0,q}|^2 ~= sigma^2`` and
``E|e_{k,q}|^2 ~= 2 sigma^2`` for ``k > 0`` (real and imaginary parts ``sigma^2`` each). The sampled basis is only
approximately orthonormal: the eigenvalues of the pixel Gram matrix ``A^T A`` lie in [0.83, 1.23] at L = 65 and
band limit 0.5. That spread comes from couplings *across* frequencies (``k`` and ``k +- 4 m`` share a symmetry type
of the square grid, which block-diagonal sPCA ignores); *within* a block the noise covariance has eigenvalues within
2-4 % of ``nu_k`` (measured at L = 33-65: ``tests/test_spca.py``). Small, but of the order of the Marchenko-Pastur
margin ``2 sqrt(gamma)`` for large stacks, so the exact noise covariance ``N_k = sigma^2 [(A^T A)^{-1}]_{kk}`` of
each block is used (:func:`noise_covariance`: it is ``sum_p expand(delta_p) expand(delta_p)^H`` over unit pixel
impulses ``delta_p``, computed once per basis), and every block is whitened to ``nu_k I`` with ``nu_k = sigma^2``
(``k = 0``) or ``2 sigma^2`` (``k > 0``) before its eigendecomposition.

Thresholds and shrinkage
------------------------
Whitened, a block's real sample covariance is a spiked Wishart matrix: ``n_k`` real samples of dimension ``q_k``
with noise ``nu_k`` per (complex-coefficient) dimension, where ``n_0 = n`` (real ``k = 0`` coefficients, one
sample per image) and ``n_k = 2 n`` for ``k > 0`` (each image gives two real samples, ``Re a_k`` and ``Im a_k``,
whose second moments add up to ``Re(C_k)``; the mirrored copies add none, they repeat the same numbers). With
``gamma_k = q_k / n_k`` the noise eigenvalues fill ``nu_k [(1 - sqrt(gamma_k))^2, (1 + sqrt(gamma_k))^2]``
(Marchenko-Pastur, checked on pure noise in the tests), so eigenvalues ``lambda > nu_k (1 + sqrt(gamma_k))^2``
are kept. Each kept component is scaled by a weight ``w`` in ``[0, 1)`` (``x = lambda / nu_k``):

``"frobenius"`` (default)
    Gavish & Donoho (2017) optimal shrinkage for the Frobenius loss of the *denoised data*,
    ``w = sqrt((x - 1 - gamma)^2 - 4 gamma) / x``: it accounts for the angle between sample and population
    eigenvectors and goes to 0 continuously at the edge.
``"operator"``
    Donoho, Gavish & Johnstone (2018) operator-norm shrinker: the population eigenvalue
    ``l(x) = ((x + 1 - gamma) + sqrt((x + 1 - gamma)^2 - 4 x)) / 2``, signal variance ``l - 1`` and the
    Wiener weight ``w = (l - 1) / l``.
``"naive"``
    Signal variance ``x - 1`` and ``w = (x - 1) / x``.

The stored *shrunk eigenvalues* are the signal variances ``ell = nu_k w / (1 - w)``, so that every rule is the
Wiener filter ``a_hat = mu + W^{-1} U diag(ell / (ell + nu)) U^T W (a - mu)`` with ``W`` the whitening of the block
and ``U`` the kept eigenvectors.

CTF (``spca-wiener`` on a CTF-modulated stack)
-----------------------------------------------
``ctf_model="cwf"`` (default): covariance Wiener filtering with each particle's own CTF
(:mod:`cryoden_dist.basis.cwf`, after Bhamre, Zhang & Singer 2016): the CTF-free mean and covariance are
estimated from the phase-flipped particles and their ``|H|``, and every particle is filtered with its own CTF;
the estimate is CTF-free. ``ctf_model="flip"``: the simpler route, (i) phase flip, ``sign(H) Y = |H| X + N'``
(``N'`` still white with the same variance): from here the images carry ``|H|``, not ``H``; (ii) FB expansion and
this sPCA; (iii) the denoised coefficients evaluated: estimates ``Z`` of ``|H| X``; (iv) ``|H|`` removed by a
per-particle Wiener deconvolution ``X_hat = |H| P_X / (|H|^2 P_X + sigma_res^2) Z`` with the CTF-free signal
spectrum ``P_X`` of the ``wiener`` baseline (:func:`cryoden_dist.denoise.wiener_model`) and ``sigma_res^2`` the
residual error spectrum of the sPCA estimate (:meth:`SteerablePCA.error_spectrum`). It mixes the particles'
CTFs into one covariance: measured on the 70S benchmark (65 px, n = 10^4) it gives rel_mse 0.391 at SNR 0.05
where CWF gives 0.347. Either way the output's ``images_ctf_state`` is ``"corrected"``. A stack without CTF
(state ``"none"``), or already corrected, gets plain sPCA Wiener filtering and keeps its state.

Output record
-------------
An ``spca-wiener`` output holds, besides the images: ``params`` (``radius``, ``bandlimit``, ``shrinker``,
``ctf_model``), ``images_ctf_state``, ``spca_model`` (:meth:`SteerablePCA.summary` or
:meth:`~cryoden_dist.basis.cwf.CovarianceWiener.summary`), ``spca_noise_variance`` and the statistics under
``spca_statistics/`` (:func:`stored_statistics`: ``fit_spca``, or ``fit_cwf`` for CWF, on them rebuilds the model,
and a resumed run uses them), and with ``ctf_model="flip"`` the spectra ``wiener_model``. For features and
alignment, :func:`project_stack` gives the reduced steerable coefficients of every particle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..ctf import ctf_images, phase_flip
from ..errors import ParameterError
from ..image import noise_variance_from_corners, radial_index
from ..pipeline import map_chunks, run_chunks
from ..stack import ParticleStack
from .fb import FBBasis

if TYPE_CHECKING:  # cwf builds on this module; its names are imported where they run
    from .cwf import CovarianceWiener, CWFStatistics

__all__ = [
    "CTF_MODELS",
    "SHRINKERS",
    "SPCAStatistics",
    "SteerablePCA",
    "fit_spca",
    "input_ctf_state",
    "noise_covariance",
    "project_stack",
    "resolve_spca_wiener",
    "run_spca_wiener",
    "shrinkage_weights",
    "spca_basis",
    "spca_statistics",
    "stack_statistics",
    "stored_statistics",
]

log = logging.getLogger(__name__)

SHRINKERS = ("frobenius", "operator", "naive")

#: How ``spca-wiener`` treats the CTF of a modulated stack (module docstring).
CTF_MODELS = ("cwf", "flip")

#: Impulse images expanded per batch by :func:`noise_covariance` (bounds its memory to ~batch * L^2 numbers).
_IMPULSE_BATCH = 512


def _block_noise_level(k: int) -> float:
    """Noise variance of one complex coefficient per unit pixel variance: 1 for ``k = 0``, 2 for ``k > 0``."""
    return 1.0 if k == 0 else 2.0


def _real_samples(k: int, n: int) -> int:
    """Real samples behind the covariance of block ``k`` from ``n`` images (see the module docstring)."""
    return n if k == 0 else 2 * n


# --------------------------------------------------------------------------------------------- statistics
@dataclass
class SPCAStatistics:
    """Mergeable sums over images behind the sPCA fit (add the parts of chunks with ``+`` or ``sum``).

    Attributes
    ----------
    count : int
        Number of images.
    mean_sum : ndarray of float64, shape (q_0,)
        Sum of the ``k = 0`` coefficients.
    second_moments : list of ndarray of complex128
        Per angular frequency ``k``: ``sum_i a_{i,k} a_{i,k}^H``, shape ``(q_k, q_k)`` (Hermitian).
    """

    count: int
    mean_sum: np.ndarray
    second_moments: list[np.ndarray] = field(default_factory=list)

    def __add__(self, other: SPCAStatistics) -> SPCAStatistics:
        if not isinstance(other, SPCAStatistics):
            return NotImplemented
        return SPCAStatistics(
            self.count + other.count,
            self.mean_sum + other.mean_sum,
            [a + b for a, b in zip(self.second_moments, other.second_moments, strict=True)],
        )

    def __radd__(self, other) -> SPCAStatistics:
        # ``sum(parts)`` starts from 0.
        return self if isinstance(other, int) and other == 0 else self.__add__(other)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat float64 arrays (for storage): ``count``, ``mean_sum``, ``sizes`` and the blocks' real/imag parts."""
        flat = np.concatenate([block.ravel() for block in self.second_moments])
        return {
            "count": np.array([self.count], dtype=np.int64),
            "mean_sum": self.mean_sum,
            "sizes": np.array([block.shape[0] for block in self.second_moments], dtype=np.int64),
            "second_moments": np.stack([flat.real, flat.imag], axis=-1),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SPCAStatistics:
        """Inverse of :meth:`to_arrays`."""
        sizes = np.asarray(arrays["sizes"])
        pairs = np.asarray(arrays["second_moments"])
        flat = pairs[:, 0] + 1j * pairs[:, 1]
        bounds = np.concatenate([[0], np.cumsum(sizes**2)])
        blocks = [flat[a:b].reshape(q, q) for a, b, q in zip(bounds[:-1], bounds[1:], sizes, strict=True)]
        return cls(int(np.asarray(arrays["count"])[0]), np.asarray(arrays["mean_sum"], dtype=np.float64), blocks)


def spca_statistics(coeffs: np.ndarray, basis: FBBasis) -> SPCAStatistics:
    """Sums over images of the FB coefficients needed by :func:`fit_spca`.

    Parameters
    ----------
    coeffs : ndarray, shape (n, basis.count), complex
        FB coefficients of ``n`` images.
    basis : FBBasis

    Returns
    -------
    SPCAStatistics
        Mergeable across chunks: the statistics of a stack are the sum of those of its chunks.
    """
    coeffs = np.asarray(coeffs)
    if coeffs.ndim != 2 or coeffs.shape[1] != basis.count:
        raise ParameterError(
            f"sPCA: coefficients of shape {coeffs.shape} do not match the basis; pass [n, {basis.count}]"
        )
    blocks = []
    for k in range(basis.k_max + 1):
        block = coeffs[:, basis.coefficients_at(k)].astype(np.complex128)
        # (a a^H)_{pq} = a_p conj(a_q), summed over images.
        blocks.append(block.T @ block.conj())
    mean_sum = coeffs[:, basis.coefficients_at(0)].real.astype(np.float64).sum(axis=0)
    return SPCAStatistics(int(coeffs.shape[0]), mean_sum, blocks)


def noise_covariance(basis: FBBasis) -> list[np.ndarray]:
    """Exact covariance, per angular frequency, of the FB coefficients of white pixel noise of unit variance.

    ``expand`` is linear, ``a = sum_p y_p expand(delta_p)`` over the disk pixels ``p``, so for white noise
    ``E[a_k a_k^H] = sum_p expand(delta_p)_k expand(delta_p)_k^H``: the second moments of the expansions of the
    unit impulses. It equals the ``k`` block of ``(A^T A)^{-1}`` (the ``sqrt(2)`` convention makes it ``~ I``
    for ``k = 0`` and ``~ 2 I`` for ``k > 0``). The imaginary part vanishes because the disk pixels are
    symmetric under ``y -> -y`` (cosine and sine parts are exactly orthogonal on the grid); it is dropped.

    Parameters
    ----------
    basis : FBBasis

    Returns
    -------
    list of ndarray of float64
        Per ``k``, shape ``(q_k, q_k)``, symmetric positive definite. Computed once per basis object (a run
        fits several models in one basis), so treat them as read-only.
    """
    cached = getattr(basis, "_noise_covariance", None)
    if cached is not None:
        return cached
    rows, cols = np.nonzero(basis.mask)
    total: SPCAStatistics | int = 0
    for start in range(0, rows.size, _IMPULSE_BATCH):
        stop = min(start + _IMPULSE_BATCH, rows.size)
        impulses = np.zeros((stop - start, basis.box, basis.box), dtype=basis.dtype)
        impulses[np.arange(stop - start), rows[start:stop], cols[start:stop]] = 1
        total = total + spca_statistics(basis.expand(impulses), basis)
    blocks = [block.real.copy() for block in total.second_moments]
    basis._noise_covariance = blocks
    return blocks


# --------------------------------------------------------------------------------------------- shrinkage
def shrinkage_weights(ratio: np.ndarray, gamma: float, shrinker: str = "frobenius") -> np.ndarray:
    """Wiener-like weights of sample eigenvalues, 0 at and below the Marchenko-Pastur edge.

    Parameters
    ----------
    ratio : ndarray
        Sample eigenvalues divided by the noise level, ``x = lambda / nu``.
    gamma : float
        Aspect ratio ``q / n`` (dimension over real samples).
    shrinker : {"frobenius", "operator", "naive"}
        See the module docstring.

    Returns
    -------
    ndarray, like ``ratio``, in ``[0, 1)``
    """
    if shrinker not in SHRINKERS:
        raise ParameterError(f"sPCA: shrinker {shrinker!r} is unknown; use one of {', '.join(SHRINKERS)}")
    x = np.asarray(ratio, dtype=np.float64)
    kept = x > (1 + np.sqrt(gamma)) ** 2
    safe = np.where(kept, x, (1 + np.sqrt(gamma)) ** 2 + 1.0)  # any value above the edge: no NaN in np.where
    if shrinker == "frobenius":
        weights = np.sqrt(np.maximum((safe - 1 - gamma) ** 2 - 4 * gamma, 0.0)) / safe
    elif shrinker == "operator":
        b = safe + 1 - gamma
        population = (b + np.sqrt(np.maximum(b * b - 4 * safe, 0.0))) / 2
        weights = (population - 1) / population
    else:
        weights = (safe - 1) / safe
    return np.where(kept, weights, 0.0)


def _inverse_sqrt_and_sqrt(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors / np.sqrt(values)) @ vectors.T, (vectors * np.sqrt(values)) @ vectors.T


# --------------------------------------------------------------------------------------------- the model
@dataclass
class SteerablePCA:
    """A fitted steerable PCA with Wiener-like weights (build it with :func:`fit_spca`).

    Per angular frequency ``k`` (lists indexed by ``k``), in the whitened coordinates ``W_k a_k`` where the
    coefficient noise is ``nu_k I``:

    Attributes
    ----------
    basis_frequency : ndarray of int64, shape (basis.count,)
        Angular frequency of each FB coefficient (the basis' ``angular_frequency``).
    noise_variance : float
        Pixel noise variance ``sigma^2``.
    n_images : int
        Images in the fit.
    shrinker : str
    mean : ndarray of float64, shape (q_0,)
        Mean ``k = 0`` coefficients (the other blocks have zero mean).
    eigenvalues : list of ndarray
        All eigenvalues of the whitened ``Re(C_k)``, descending.
    eigenvectors : list of ndarray
        Their eigenvectors (columns, real), ``(q_k, q_k)``.
    shrunk_eigenvalues : list of ndarray
        Signal variances ``ell`` of the kept components (first ``kept[k]`` eigenvectors).
    kept : ndarray of int64, shape (k_max + 1,)
        Components kept per ``k`` (eigenvalue above the edge ``nu_k (1 + sqrt(gamma_k))^2``).
    noise_levels : ndarray of float64, shape (k_max + 1,)
        ``nu_k``.
    thresholds : ndarray of float64, shape (k_max + 1,)
        The edges.
    whitening, unwhitening : list of ndarray
        ``W_k = (N_k / nu_k)^{-1/2}`` and its inverse, ``N_k`` the exact coefficient noise covariance.
    """

    basis_frequency: np.ndarray
    noise_variance: float
    n_images: int
    shrinker: str
    mean: np.ndarray
    eigenvalues: list[np.ndarray]
    eigenvectors: list[np.ndarray]
    shrunk_eigenvalues: list[np.ndarray]
    kept: np.ndarray
    noise_levels: np.ndarray
    thresholds: np.ndarray
    whitening: list[np.ndarray]
    unwhitening: list[np.ndarray]

    def __post_init__(self) -> None:
        bounds = np.searchsorted(self.basis_frequency, np.arange(self.kept.size + 1))
        self._slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        # Per block: whitened coordinates along the kept eigenvectors (coefficients -> U^T W a), the analysis
        # map with the model's Wiener weights, and the synthesis map (reduced -> coefficients).
        self._coordinates = []
        self._analysis = []
        self._synthesis = []
        for k, kept in enumerate(self.kept):
            vectors = self.eigenvectors[k][:, :kept]
            self._coordinates.append(vectors.T @ self.whitening[k])
            self._analysis.append(self.weights_at(k)[:, None] * self._coordinates[k])
            self._synthesis.append(self.unwhitening[k] @ vectors)

    @property
    def k_max(self) -> int:
        """Largest angular frequency of the FB basis."""
        return self.kept.size - 1

    @property
    def count(self) -> int:
        """Total number of kept components (length of the reduced coefficients)."""
        return int(self.kept.sum())

    @property
    def angular_frequency(self) -> np.ndarray:
        """Angular frequency ``k`` of each reduced coefficient, shape ``(count,)``."""
        return np.repeat(np.arange(self.kept.size), self.kept)

    def weights_at(self, k: int) -> np.ndarray:
        """Wiener weights ``ell / (ell + nu_k)`` of the kept components of block ``k``."""
        ell = self.shrunk_eigenvalues[k]
        return ell / (ell + self.noise_levels[k])

    def _check(self, coeffs: np.ndarray) -> np.ndarray:
        coeffs = np.asarray(coeffs)
        if coeffs.ndim != 2 or coeffs.shape[1] != self.basis_frequency.size:
            raise ParameterError(
                f"sPCA: coefficients of shape {coeffs.shape} do not match the model's basis; "
                f"pass [n, {self.basis_frequency.size}]"
            )
        return coeffs

    def _centred(self, coeffs: np.ndarray, k: int) -> np.ndarray:
        block = coeffs[:, self._slices[k]]
        return block - self.mean if k == 0 else block

    def project(self, coeffs: np.ndarray, noise_scale: np.ndarray | None = None) -> np.ndarray:
        """Reduced, denoised steerable coefficients ``b_k = diag(w_k) U_k^T W_k (a_k - mu_k)``.

        They are the coordinates of the denoised image (minus the mean image) along the kept eigenvectors, in
        whitened coefficient space: distances between them approximate distances between denoised images (the
        whitening is within ~4 % of the identity). They are steerable like the FB
        coefficients (rotating the image by ``alpha`` multiplies ``b_k`` by ``exp(-i k alpha)``) and a mirror
        image (``y -> -y``) has the complex conjugate coefficients (the eigenvectors are real).

        Parameters
        ----------
        coeffs : ndarray, shape (n, basis.count), complex
            FB coefficients.
        noise_scale : ndarray of float, shape (n,), optional
            Per image, its noise variance relative to the model's (e.g. the noise gain of an average of
            neighbours): the Wiener weights become ``ell / (ell + nu_k s_i)``. Default 1 (the model's weights).

        Returns
        -------
        ndarray, shape (n, count), complex (the precision of ``coeffs``)
            Ordered by ``k`` (see :attr:`angular_frequency`), then by decreasing eigenvalue.
        """
        coeffs = self._check(coeffs)
        dtype = np.result_type(coeffs.dtype, np.complex64)
        out = np.empty((coeffs.shape[0], self.count), dtype=dtype)
        offsets = np.concatenate([[0], np.cumsum(self.kept)])
        if noise_scale is not None:
            noise_scale = np.asarray(noise_scale, dtype=np.float64)
            if noise_scale.shape != (coeffs.shape[0],) or not np.all(noise_scale > 0):
                raise ParameterError(f"sPCA: noise_scale needs {coeffs.shape[0]} positive values, one per image")
        for k in np.flatnonzero(self.kept):
            block = slice(offsets[k], offsets[k + 1])
            if noise_scale is None:
                out[:, block] = self._centred(coeffs, k) @ self._analysis[k].T.astype(dtype)
                continue
            ell = self.shrunk_eigenvalues[k]
            weights = ell / (ell + self.noise_levels[k] * noise_scale[:, None])  # [n, kept]
            out[:, block] = weights * (self._centred(coeffs, k) @ self._coordinates[k].T.astype(dtype))
        return out

    def reconstruct(self, reduced: np.ndarray) -> np.ndarray:
        """FB coefficients of reduced coefficients: ``mu + W_k^{-1} U_k b_k``; ``reconstruct(project(a)) = denoise(a)``.

        Parameters
        ----------
        reduced : ndarray, shape (n, count), complex

        Returns
        -------
        ndarray, shape (n, basis.count), complex
        """
        reduced = np.asarray(reduced)
        if reduced.ndim != 2 or reduced.shape[1] != self.count:
            raise ParameterError(f"sPCA: reduced coefficients of shape {reduced.shape}; pass [n, {self.count}]")
        dtype = np.result_type(reduced.dtype, np.complex64)
        out = np.zeros((reduced.shape[0], self.basis_frequency.size), dtype=dtype)
        out[:, self._slices[0]] = self.mean
        offsets = np.concatenate([[0], np.cumsum(self.kept)])
        for k in np.flatnonzero(self.kept):
            out[:, self._slices[k]] += reduced[:, offsets[k] : offsets[k + 1]] @ self._synthesis[k].T.astype(dtype)
        # k = 0 coefficients of real images are real.
        out[:, self._slices[0]] = out[:, self._slices[0]].real
        return out

    def denoise(self, coeffs: np.ndarray, noise_scale: np.ndarray | None = None) -> np.ndarray:
        """Wiener-filtered FB coefficients ``mu + W^{-1} U diag(w) U^T W (a - mu)`` per block.

        Parameters
        ----------
        coeffs : ndarray, shape (n, basis.count), complex
        noise_scale : ndarray of float, shape (n,), optional
            Per-image noise variance relative to the model's (:meth:`project`).

        Returns
        -------
        ndarray, same shape; blocks without kept components become their mean (0 for ``k > 0``).
        """
        return self.reconstruct(self.project(coeffs, noise_scale))

    def error_spectrum(self, basis: FBBasis) -> np.ndarray:
        """Expected squared error of :meth:`denoise`, per ring of the DFT grid, in ``|FFT|^2`` units per point.

        Kept components have the Wiener posterior error ``nu w`` (whitened units); components below the edge are
        taken as noise only (no signal lost; the spiked model's assumption). The per-coefficient error (the
        diagonal of ``W^{-1} U diag(e) U^T W^{-1}``) is placed at the ring of the basis function's radial
        frequency ``lambda_{k,q} / (2 pi R)`` and converted to the power of numpy's unnormalised FFT at one
        point of that ring (``||image||^2 = ||a||^2`` and Parseval give ``sum |FFT|^2 = L^2 ||a||^2``).

        Parameters
        ----------
        basis : FBBasis
            The basis the model was fitted in.

        Returns
        -------
        ndarray of float64, indexed by :func:`cryoden_dist.image.radial_index` of ``basis.box``
        """
        per_coefficient = np.zeros(basis.count)
        for k in range(self.kept.size):
            vectors = self.unwhitening[k] @ self.eigenvectors[k][:, : self.kept[k]]
            error = self.noise_levels[k] * self.weights_at(k)
            per_coefficient[self._slices[k]] = (vectors * vectors) @ error
        shells = radial_index(basis.box).ravel()
        points = np.bincount(shells)
        ring = np.rint(basis.bessel_zeros / (2 * np.pi * basis.radius) * basis.box).astype(np.int64)
        ring = np.minimum(ring, points.size - 1)
        energy = np.bincount(ring, weights=per_coefficient, minlength=points.size)
        return basis.box**2 * energy / points

    def summary(self) -> dict[str, Any]:
        """A JSON-able description: noise, components kept per ``k``, shrinker."""
        return {
            "noise_variance": float(self.noise_variance),
            "images": int(self.n_images),
            "shrinker": self.shrinker,
            "components": self.count,
            "kept_per_k": self.kept.tolist(),
            "k_max_kept": int(np.flatnonzero(self.kept).max()) if self.count else -1,
        }


def fit_spca(
    stats: SPCAStatistics,
    basis: FBBasis,
    noise_variance: float,
    shrinker: str = "frobenius",
    noise_cov: list[np.ndarray] | None = None,
) -> SteerablePCA:
    """Fit the steerable PCA from merged statistics.

    Parameters
    ----------
    stats : SPCAStatistics
        Sums over the images (:func:`spca_statistics`, merged over chunks).
    basis : FBBasis
        The basis of the coefficients.
    noise_variance : float
        White pixel noise variance ``sigma^2`` (e.g. :func:`cryoden_dist.image.noise_variance_from_corners`).
    shrinker : {"frobenius", "operator", "naive"}
        Eigenvalue shrinkage (module docstring).
    noise_cov : list of ndarray, optional
        :func:`noise_covariance` of ``basis`` (computed when omitted).

    Returns
    -------
    SteerablePCA
    """
    if stats.count < 2:
        raise ParameterError(f"sPCA: {stats.count} image(s) are too few to estimate a covariance; use more")
    if not (np.isfinite(noise_variance) and noise_variance > 0):
        raise ParameterError(f"sPCA: noise variance {noise_variance!r} must be positive; check the image corners")
    if len(stats.second_moments) != basis.k_max + 1:
        raise ParameterError("sPCA: the statistics were computed with another basis; recompute them")
    if shrinker not in SHRINKERS:
        raise ParameterError(f"sPCA: shrinker {shrinker!r} is unknown; use one of {', '.join(SHRINKERS)}")
    noise_cov = noise_covariance(basis) if noise_cov is None else noise_cov
    n = stats.count
    mean = stats.mean_sum / n
    fitted: dict[str, list] = {key: [] for key in ("values", "vectors", "shrunk", "white", "unwhite")}
    kept, levels, thresholds = [], [], []
    for k in range(basis.k_max + 1):
        # Re(): the covariance of the images and their mirror images (module docstring).
        covariance = stats.second_moments[k].real / n
        if k == 0:
            covariance = covariance - np.outer(mean, mean)
        level = _block_noise_level(k)
        white, unwhite = _inverse_sqrt_and_sqrt(noise_cov[k] / level)
        values, vectors = np.linalg.eigh(white @ covariance @ white)
        values, vectors = values[::-1], vectors[:, ::-1]
        nu = noise_variance * level
        gamma = values.size / _real_samples(k, n)
        weights = shrinkage_weights(values / nu, gamma, shrinker)
        count = int(np.count_nonzero(weights > 0))
        fitted["values"].append(values)
        fitted["vectors"].append(vectors)
        fitted["shrunk"].append(nu * weights[:count] / (1 - weights[:count]))
        fitted["white"].append(white)
        fitted["unwhite"].append(unwhite)
        kept.append(count)
        levels.append(nu)
        thresholds.append(nu * (1 + np.sqrt(gamma)) ** 2)
    return SteerablePCA(
        basis_frequency=basis.angular_frequency.copy(),
        noise_variance=float(noise_variance),
        n_images=n,
        shrinker=shrinker,
        mean=mean,
        eigenvalues=fitted["values"],
        eigenvectors=fitted["vectors"],
        shrunk_eigenvalues=fitted["shrunk"],
        kept=np.asarray(kept, dtype=np.int64),
        noise_levels=np.asarray(levels),
        thresholds=np.asarray(thresholds),
        whitening=fitted["white"],
        unwhitening=fitted["unwhite"],
    )


# --------------------------------------------------------------------------------------------- spca-wiener
def input_ctf_state(stack: ParticleStack) -> str:
    """What the images of ``stack`` carry: ``"modulated"`` (``H X``), ``"corrected"`` or ``"none"``."""
    return stack.info.get("images_ctf_state") or ("modulated" if stack.has_ctf else "none")


def spca_basis(box: int, radius: float, bandlimit: float) -> FBBasis:
    """The FB basis of ``spca-wiener`` (float32, like the images: half the memory and time of float64)."""
    return FBBasis(box, radius=radius, bandlimit=bandlimit, dtype=np.float32)


def _images_for_spca(source: ParticleStack, start: int, stop: int, flip: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Particles ``[start, stop)``, phase-flipped when ``flip`` (they then carry ``|H|``), and their CTFs."""
    images = source.images[start:stop]
    if not flip:
        return images, None
    ctf = ctf_images(source.ctf_params(slice(start, stop)), source.box)
    return phase_flip(images, ctf), ctf


def _statistics_chunk(
    start: int, stop: int, source_path: str, basis: FBBasis, radius: float, flip: bool, cwf: bool = False
) -> dict:
    """sPCA (or, with ``cwf``, CWF) statistics of particles ``[start, stop)`` and their corner noise variances."""
    from .cwf import cwf_statistics, fb_ctf

    source = ParticleStack.open(source_path)
    images, ctf = _images_for_spca(source, start, stop, flip)
    coeffs = basis.expand(images)
    # Phase flipping keeps white noise white with the same variance: the corners of either image estimate sigma^2.
    return {
        "stats": cwf_statistics(coeffs, fb_ctf(ctf, basis), basis) if cwf else spca_statistics(coeffs, basis),
        "noise_variance_sum": noise_variance_from_corners(images, radius) * (stop - start),
    }


def _project_chunk(
    start: int, stop: int, source_path: str, basis: FBBasis, model: SteerablePCA, flip: bool
) -> np.ndarray:
    """Reduced sPCA coefficients of particles ``[start, stop)``."""
    images, _ = _images_for_spca(ParticleStack.open(source_path), start, stop, flip)
    return model.project(basis.expand(images)).astype(np.complex64)


def stack_statistics(
    source: ParticleStack, client, basis: FBBasis, radius: float, flip: bool, cwf: bool = False
) -> tuple[SPCAStatistics | CWFStatistics, float]:
    """sPCA statistics of a whole stack and its corner noise variance, one Dask task per chunk.

    Parameters
    ----------
    source : ParticleStack
    client : distributed.Client
    basis : FBBasis
        Built once on the driver; it travels to the workers with the tasks' arguments.
    radius : float
        Pixels farther than this from the centre are noise (:func:`cryoden_dist.image.noise_variance_from_corners`).
    flip : bool
        Phase-flip the images first (CTF-modulated stacks; the images then carry ``|H|``).
    cwf : bool
        CWF statistics (:func:`cryoden_dist.basis.cwf.cwf_statistics`; needs ``flip``) instead of the sPCA's.

    Returns
    -------
    stats : SPCAStatistics or CWFStatistics
    noise_variance : float
        Mean over images of the corner variance, ``sigma^2``.
    """
    parts = map_chunks(
        client,
        _statistics_chunk,
        source.chunk_bounds(),
        args=(str(source.path), basis, float(radius), flip, cwf),
        desc="cwf statistics" if cwf else "spca statistics",
    )
    stats = sum(part["stats"] for part in parts)
    return stats, sum(part["noise_variance_sum"] for part in parts) / stats.count


def project_stack(source: ParticleStack, client, basis: FBBasis, model: SteerablePCA, flip: bool) -> np.ndarray:
    """Reduced steerable coefficients (:meth:`SteerablePCA.project`) of every particle, one Dask task per chunk.

    Parameters
    ----------
    source : ParticleStack
    client : distributed.Client
    basis : FBBasis
    model : SteerablePCA
        Fitted in ``basis`` on the same kind of images (``flip`` as for the fit).
    flip : bool
        Phase-flip the images first.

    Returns
    -------
    ndarray, shape (n, model.count), complex64
    """
    parts = map_chunks(
        client, _project_chunk, source.chunk_bounds(), args=(str(source.path), basis, model, flip), desc="spca project"
    )
    return np.concatenate(parts) if parts else np.zeros((0, model.count), np.complex64)


def _spca_wiener_chunk(
    start: int,
    stop: int,
    source_path: str,
    basis: FBBasis,
    model: SteerablePCA | CovarianceWiener,
    deconvolution: tuple[np.ndarray, np.ndarray] | None,
) -> dict:
    """Wiener estimates of particles ``[start, stop)``: CWF (CTF-free), or sPCA, with ``deconvolution`` of ``|H|``."""
    import scipy.fft

    from ..denoise import _half_plane, wiener_filter  # denoise imports this module for its registry
    from .cwf import CovarianceWiener, fb_ctf

    source = ParticleStack.open(source_path)
    cwf = isinstance(model, CovarianceWiener)
    images, ctf = _images_for_spca(source, start, stop, flip=cwf or deconvolution is not None)
    coeffs = basis.expand(images)
    if cwf:
        return {"images": basis.evaluate(model.denoise(coeffs, fb_ctf(ctf, basis))).astype(np.float32)}
    estimate = basis.evaluate(model.denoise(coeffs))
    if deconvolution is not None:
        # The estimate is of |H| X (phase-flipped data): Wiener-deconvolve |H|, not H.
        signal_grid, residual_grid = deconvolution
        transfer = wiener_filter(np.abs(_half_plane(ctf)), signal_grid, residual_grid)
        estimate = scipy.fft.irfft2(scipy.fft.rfft2(estimate) * transfer, s=(basis.box, basis.box))
    return {"images": estimate.astype(np.float32)}


def resolve_spca_wiener(source: ParticleStack, params: dict) -> dict:
    """Fill the stack-dependent defaults of ``spca-wiener`` and check the values.

    ``radius`` (px): the FB disk, and the particle radius outside which the corners are noise; default
    ``L // 2 - 1``. ``bandlimit`` (cycles/px): of the FB basis, default 0.5 (Nyquist; the sPCA thresholds
    discard the noise-only components). ``shrinker``: see :func:`shrinkage_weights`. ``ctf_model``: ``"cwf"``
    or ``"flip"`` (module docstring; used only on CTF-modulated stacks).
    """
    box = source.box
    radius = box // 2 - 1 if params["radius"] is None else params["radius"]
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not 2 <= radius <= box / 2:
        raise ParameterError(
            f"--param radius={radius!r}: method spca-wiener needs an FB disk radius in [2, {box / 2:g}] px "
            f"for a box of {box}; e.g. radius={box // 2 - 1}"
        )
    bandlimit = 0.5 if params["bandlimit"] is None else params["bandlimit"]
    if isinstance(bandlimit, bool) or not isinstance(bandlimit, (int, float)) or not 0 < bandlimit <= 0.5:
        raise ParameterError(
            f"--param bandlimit={bandlimit!r}: method spca-wiener needs a band limit in (0, 0.5] cycles/pixel"
        )
    if params["shrinker"] not in SHRINKERS:
        raise ParameterError(
            f"--param shrinker={params['shrinker']!r}: unknown to method spca-wiener; use one of {', '.join(SHRINKERS)}"
        )
    if params["ctf_model"] not in CTF_MODELS:
        raise ParameterError(
            f"--param ctf_model={params['ctf_model']!r}: unknown to method spca-wiener; "
            f"use one of {', '.join(CTF_MODELS)}"
        )
    return {
        "radius": float(radius),
        "bandlimit": float(bandlimit),
        "shrinker": params["shrinker"],
        "ctf_model": params["ctf_model"],
    }


_STATISTICS_GROUP = "spca_statistics"


def stored_statistics(stack: ParticleStack) -> tuple[SPCAStatistics | CWFStatistics, float] | None:
    """The sPCA statistics and noise variance an ``spca-wiener`` output holds, or None if it has none (yet).

    They are saved before any image is filtered (a resumed run reuses them), so :func:`fit_spca` on them with the
    output's ``params`` gives the model that made the output.
    """
    noise_variance = stack.info.get("spca_noise_variance")
    if noise_variance is None or _STATISTICS_GROUP not in stack.group:
        return None
    group = stack.group[_STATISTICS_GROUP]
    arrays = {name: group[name][:] for name in group.array_keys()}
    from .cwf import CWFStatistics

    kind = CWFStatistics if "ctf_fourth" in arrays else SPCAStatistics
    return kind.from_arrays(arrays), float(noise_variance)


def _store_statistics(stack: ParticleStack, stats: SPCAStatistics | CWFStatistics, noise_variance: float) -> None:
    if _STATISTICS_GROUP in stack.group:
        del stack.group[_STATISTICS_GROUP]
    group = stack.group.create_group(_STATISTICS_GROUP)
    for name, values in stats.to_arrays().items():
        group.create_array(name, shape=values.shape, dtype=values.dtype)[...] = values
    # Written last: its presence says the arrays are complete.
    stack.update_info(spca_noise_variance=float(noise_variance))


def run_spca_wiener(source: ParticleStack, target: ParticleStack, params: dict, client) -> None:
    """The ``spca-wiener`` method: fit the model (one Dask pass), then filter every chunk (a second pass).

    A CTF-modulated stack gets CWF (``ctf_model="cwf"``) or phase flip, sPCA and ``|H|`` deconvolution
    (``"flip"``), output state ``"corrected"``; other stacks are sPCA-filtered and keep their state. The
    statistics (and the spectra of ``"flip"``) are saved in the output, so a resumed run filters its remaining
    chunks with the same model.

    Parameters
    ----------
    source, target : ParticleStack
        Input stack and the prepared output.
    params : dict
        Resolved parameters (:func:`resolve_spca_wiener`).
    client : distributed.Client
    """
    from ..denoise import _half_plane, wiener_model  # denoise imports this module for its registry
    from .cwf import fit_cwf

    state = input_ctf_state(source)
    correct = state == "modulated" and source.has_ctf
    basis = spca_basis(source.box, params["radius"], params["bandlimit"])
    cwf = correct and params["ctf_model"] == "cwf"
    stored = stored_statistics(target)
    if stored is None:
        stats, noise_variance = stack_statistics(source, client, basis, params["radius"], flip=correct, cwf=cwf)
        _store_statistics(target, stats, noise_variance)
    else:
        stats, noise_variance = stored
    fit = fit_cwf if cwf else fit_spca
    model = fit(stats, basis, noise_variance, params["shrinker"])
    deconvolution = None
    if correct and not cwf:
        spectra = target.info.get("wiener_model")
        if spectra is None:
            spectra = wiener_model(source, client, radius=params["radius"])
            target.update_info(wiener_model=spectra)
        shells = radial_index(source.box)
        deconvolution = (
            _half_plane(np.asarray(spectra["signal_power"])[shells]),
            _half_plane(model.error_spectrum(basis)[shells]),
        )
    log.info(
        "spca-wiener (%s): %d components kept (noise variance %.4g)",
        "cwf" if cwf else "spca",
        model.count,
        noise_variance,
    )
    target.update_info(spca_model=model.summary(), images_ctf_state="corrected" if correct else state)
    run_chunks(
        client,
        target,
        "spca-wiener",
        _spca_wiener_chunk,
        args=(str(source.path), basis, model, deconvolution),
        params=params,
    )
