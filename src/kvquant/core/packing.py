"""Bit-plane packing of 2/3/4-bit codes into uint8, along the last dimension.

Layout (the cache and the GPU kernels read exactly this):
- 4 bits: 2 codes per byte, ``byte = c[2i] | c[2i+1] << 4``                          -> n/2 bytes
- 2 bits: 4 codes per byte, ``byte = sum c[4i+j] << 2j``                               -> n/4 bytes
- 3 bits: a 2-bit plane (low bits, as above) followed by a 1-bit plane (bit 2 of each code,
  ``byte = sum (c[8i+j] >> 2) << j``)                                                   -> n/4 + n/8 bytes
Every width costs exactly ``bits`` bits per code; ``n`` must be a multiple of 8.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4)


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}.")
    return bits


def packed_size(n: int, bits: int) -> int:
    """Bytes used by ``n`` codes of ``bits`` bits."""
    if n % 8:
        raise ValueError(f"the packed dimension must be a multiple of 8, got {n}.")
    return n * check_bits(bits) // 8


def _pack_plane(c: torch.Tensor, width: int) -> torch.Tensor:
    per = 8 // width
    c = c.reshape(*c.shape[:-1], c.shape[-1] // per, per).to(torch.int32)
    shifts = torch.arange(per, device=c.device, dtype=torch.int32) * width
    return (c << shifts).sum(-1).to(torch.uint8)


_UNPACK_LUT: dict[tuple[int, int, str], torch.Tensor] = {}


def _unpack_lut(width: int, device: torch.device, shift: int = 0) -> torch.Tensor:
    """uint8 [256, 8/width]: the codes held in each byte value, shifted left by ``shift`` (a table lookup with
    ``index_select`` is ~3x faster on CPU than shifting and masking)."""
    key = (width, shift, str(device))
    if key not in _UNPACK_LUT:
        per = 8 // width
        b = torch.arange(256, dtype=torch.int32)[:, None]
        lut = ((b >> (torch.arange(per, dtype=torch.int32) * width)) & ((1 << width) - 1)) << shift
        _UNPACK_LUT[key] = lut.to(device=device, dtype=torch.uint8)
    return _UNPACK_LUT[key]


def _unpack_plane(p: torch.Tensor, width: int, shift: int = 0) -> torch.Tensor:
    """uint8 [..., m] -> uint8 codes [..., m * 8/width] (each shifted left by ``shift``)."""
    c = _unpack_lut(width, p.device, shift).index_select(0, p.reshape(-1).long())
    return c.view(*p.shape[:-1], p.shape[-1] * (8 // width))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., n] integer in [0, 2^bits) -> uint8 [..., n*bits/8]."""
    packed_size(codes.shape[-1], bits)
    if bits == 4:
        return _pack_plane(codes, 4)
    if bits == 2:
        return _pack_plane(codes, 2)
    lo = _pack_plane(codes & 3, 2)
    hi = _pack_plane(codes >> 2, 1)
    return torch.cat((lo, hi), dim=-1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 [..., n*bits/8] -> int64 codes [..., n]."""
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(f"packed last dim {packed.shape[-1]} does not match {n} codes of {bits} bits.")
    if bits in (2, 4):
        return _unpack_plane(packed, bits).long()
    lo = _unpack_plane(packed[..., : n // 4], 2)
    hi = _unpack_plane(packed[..., n // 4 :], 1, shift=2)
    return (lo | hi).long()
