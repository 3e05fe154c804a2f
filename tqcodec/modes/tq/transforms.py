"""Transforms over the input dimension (spec §7.5 stores the synthesis S as float16).

M is the weight arranged [m inputs, p = out*kh*kw columns] (the transpose of the [out, in]
view). Analysis A (k x m), synthesis S (m x k): C = A M, M_hat = S C_hat. Deterministic: float64
eigensolves, eigenvalues descending (ties by index), each eigenvector's largest-magnitude
component made positive.

``tqcodec.tq.encoder.choose_transforms`` decides per tensor by the exact rate-distortion cost
at the model's Lagrange multiplier (the stored S's bits counted), after screening a weight KLT
by a Gaussian model of that trade at the multiplier (``encoder.worth_weighing``);
:func:`transform_gain_bits` is its high-rate limit (a quick check; the encoder does not use it).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

F16_BITS = 16


def _fix_signs(v: np.ndarray) -> np.ndarray:
    idx = np.argmax(np.abs(v), axis=0)
    sign = np.sign(v[idx, np.arange(v.shape[1])])
    sign[sign == 0] = 1.0
    return v * sign


def _eigh_desc(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w, v = np.linalg.eigh((a + a.T) / 2)
    order = np.argsort(-w, kind="stable")
    return w[order], _fix_signs(v[:, order])


def identity(m: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, S) of the identity transform."""
    return np.eye(m), np.eye(m)


def klt(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weight KLT: eigenvectors U of M M^T (no mean removal). Returns (A = U^T, S = U, eigenvalues)."""
    w, u = _eigh_desc(mat @ mat.T)
    return u.T, u, w


def activation_roots(h: np.ndarray, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """(L, L^-1) with L = (H + eps*tr(H)/m*I)^(1/2): what :func:`aat` needs of H, made once for
    the tensors that read one input (an MLP's gate and up projections)."""
    m = len(h)
    hr = h + eps * (np.trace(h) / m if np.trace(h) > 0 else 1.0) * np.eye(m)
    hw, hv = _eigh_desc(hr)
    hw = np.maximum(hw, 1e-300)
    return (hv * np.sqrt(hw)) @ hv.T, (hv / np.sqrt(hw)) @ hv.T


def aat(mat: np.ndarray, h: Optional[np.ndarray], eps: float = 1e-3,
        roots: Optional[tuple[np.ndarray, np.ndarray]] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activation-aware transform: L = (H + eps*tr(H)/m*I)^(1/2); V = eigenvectors of L M M^T L;
    A = V^T L, S = L^-1 V. Coefficient errors then cost ``||dC||^2`` of local output error.
    ``roots``: :func:`activation_roots` of H made before (``h`` is then not read)."""
    l_half, l_inv = activation_roots(h, eps) if roots is None else roots
    w, v = _eigh_desc(l_half @ mat @ mat.T @ l_half)
    return v.T @ l_half, l_inv @ v, w


def cost_bits(m: int, k: int) -> int:
    """Bits the stored synthesis costs (float16, m x k; spec §7.5.2)."""
    return F16_BITS * m * k


def transform_gain_bits(mat: np.ndarray, h: Optional[np.ndarray] = None) -> float:
    """High-rate estimate of the coefficient bits the activation-aware transform saves over the
    identity at equal local output distortion (uniform steps, Gaussian-like rows):

        p/2 * [ sum_j log2 var_j  -  sum_i log2(lambda_i / p)  +  m log2(tr(H)/m) ]

    (var_j: mean square of input row j of M; lambda_i: eigenvalues of L M M^T L). The transform
    pays when this exceeds :func:`cost_bits` (the encoder's rule)."""
    m, p = mat.shape
    h = np.eye(m) if h is None else h
    var = np.maximum(np.mean(mat * mat, axis=1), 1e-300)
    _, _, lam = aat(mat, h)
    lam = np.maximum(lam / p, 1e-300)
    return 0.5 * p * (float(np.sum(np.log2(var))) - float(np.sum(np.log2(lam)))
                      + m * math.log2(max(np.trace(h), 1e-300) / m))


def pays(mat: np.ndarray, h: Optional[np.ndarray] = None) -> bool:
    """Whether a full (k = m) float16 transform is worth its bytes for this tensor."""
    return transform_gain_bits(mat, h) > cost_bits(mat.shape[0], mat.shape[0])
