"""8-bit optimizer state on the host: making, converting, checking and exporting the codes and
scales that `ir.quantized` rules read and write in their kernels.

A state slot kept in 8 bits (`state_dtype="int8"`) is two entries of `optimizer.state[p]`:

    name               the codes: the parameter's shape and memory layout; int8 for the signed
                       code map, uint8 for the unsigned one (`code_dtype`), so that a state dict
                       says which map it holds
    name + "_absmax"   float32, 1-D: the scale of each block of QUANT_BLOCK elements of the
                       codes in memory order (the block's largest magnitude)

Every tensor is kept this way, however small (4 bytes of scale per 256 elements). Buffers that
do not fit (float state from a torch checkpoint, or codes laid out unlike their parameter) are
converted once, when launch tables are built: decoded in their own layout, encoded in the
parameter's. Codes and scales that fit are used as they are, so a checkpoint loads back exactly.
"""

from __future__ import annotations

import numpy as np

from ..ir import CODE_MAPS, QUANT_BLOCK, DType, Slot, scales_of
from ..runtime import arrays


def code_dtype(code_map: str) -> DType:
    """The array dtype of a code map's codes: int8 for signed maps, uint8 for unsigned ones
    (a kernel reads both as bytes)."""
    return DType.I8 if CODE_MAPS[code_map].signed else DType.U8


def code_map_of(codes) -> str | None:
    """The code map whose codes `codes` holds (by its dtype), or None for other arrays."""
    name = str(getattr(codes, "dtype", "")).rsplit(".", 1)[-1]
    return {"int8": "signed", "uint8": "unsigned"}.get(name)


def quantize_like(data, values, code_map: str) -> tuple[object, object]:
    """(codes, scales) holding `values` (an array of `data`'s shape, or a number) for parameter
    array `data`: its library, device and layout."""
    full = arrays.zeros_as(data, DType.F32)
    if isinstance(values, (int, float)):
        full[...] = float(values)
    else:
        arrays.assign(full, values)
    codes_np, scales_np = CODE_MAPS[code_map].quantize(arrays.to_host(arrays.flat(full)))
    codes = arrays.zeros_as(data, code_dtype(code_map))
    arrays.assign(arrays.flat(codes), codes_np.view(code_dtype(code_map).to_numpy()))
    scales = arrays.zeros(data, (scales_np.size,), DType.F32)
    arrays.assign(scales, scales_np)
    return codes, scales


def _constant_like(data, value: float, code_map: str) -> tuple[object, object]:
    """`quantize_like(data, value, code_map)` without a pass over the values: each code is
    that of value's sign (1.0's), each scale |value| (a new buffer of 16M elements: 20 ms,
    not the seconds quantizing its values would take)."""
    codes = arrays.zeros_as(data, code_dtype(code_map))
    scales = arrays.zeros(data, (-(-arrays.numel(data) // QUANT_BLOCK),), DType.F32)
    if value:
        code = CODE_MAPS[code_map].encode(np.float32(np.sign(value)))
        codes[...] = int(np.asarray(code).view(code_dtype(code_map).to_numpy()))
        scales[...] = abs(value)
    return codes, scales


def dequantize(codes, scales):
    """The float32 values (codes, scales) hold, as an array shaped and laid out like `codes`."""
    flat = arrays.to_host(arrays.flat(codes)).view(np.uint8)
    values = CODE_MAPS[code_map_of(codes)].dequantize(flat, arrays.to_host(scales))
    out = arrays.zeros_as(codes, DType.F32)
    arrays.assign(arrays.flat(out), values)
    return out


def check_pair(where: str, name: str, codes, scales, shape: tuple) -> None:
    """Raise ValueError unless `codes` and `scales` are 8-bit state of a parameter of `shape`:
    int8 or uint8 codes of that shape, and one real scale per block of them, 1-D."""
    for what, x in ((name, codes), (scales_of(name), scales)):
        if not arrays.is_array(x):
            raise ValueError(f"{where}: {what} is a {arrays.type_name(x)}, not an array")
    if code_map_of(codes) is None:
        raise ValueError(f"{where}: {name} has dtype {codes.dtype}, but a {scales_of(name)} "
                         "entry makes it 8-bit codes: int8 (signed map) or uint8 (unsigned)")
    if tuple(codes.shape) != tuple(shape):
        raise ValueError(f"{where}: {name} has shape {tuple(codes.shape)}, the parameter "
                         f"{tuple(shape)}")
    blocks = -(-int(np.prod(shape, dtype=np.int64)) // QUANT_BLOCK)
    if arrays.dtype(scales) is None or tuple(scales.shape) != (blocks,):
        raise ValueError(f"{where}: {scales_of(name)} holds {tuple(scales.shape)} "
                         f"{getattr(scales, 'dtype', '')} values, but its codes need {blocks} "
                         f"float scales in 1-D, one per block of {QUANT_BLOCK} codes: the "
                         "scales do not match the codes")


def state_pair(where: str, state: dict, slot: Slot, data, group: dict):
    """The (codes, scales) of 8-bit slot `slot` of parameter array `data`, and whether they are
    new (made from nothing, or converted from what `state` holds), or ValueError."""
    name, code_map = slot.name, slot.code_map
    codes, scales = state.get(name), state.get(scales_of(name))
    if codes is None and scales is None:
        init = group[slot.init] if isinstance(slot.init, str) else slot.init
        return _constant_like(data, float(init), code_map), True
    if scales is not None:
        if codes is None:
            raise ValueError(f"{where}: state has {scales_of(name)} but no {name} codes")
        check_pair(where, name, codes, scales, tuple(data.shape))
        if _fits_codes(codes, data, code_map) and _fits_scales(scales, data):
            return (codes, scales), False
        values = dequantize(codes, scales)
    else:  # float state (a torch checkpoint, or this slot was kept in another dtype)
        if not arrays.is_array(codes) or arrays.dtype(codes) is None:
            raise ValueError(f"{where}: state {name!r} is "
                             f"{getattr(codes, 'dtype', arrays.type_name(codes))}, not float "
                             f"state (8-bit codes come with {scales_of(name)} scales)")
        if tuple(codes.shape) != tuple(data.shape):
            raise ValueError(f"{where}: state {name!r} has shape {tuple(codes.shape)}, the "
                             f"parameter {tuple(data.shape)}")
        values = codes
    return quantize_like(data, values, code_map), True


def _same_place(x, data) -> bool:
    a = arrays.adapter(x)
    return (a is not None and a.name == arrays.adapter(data).name
            and a.device(x) == a.device(data) and a.writeable(x) and a.aligned(x))


def _fits_codes(codes, data, code_map: str) -> bool:
    return (_same_place(codes, data) and code_map_of(codes) == code_map
            and tuple(codes.shape) == tuple(data.shape)
            and arrays.layout(codes) is not None and arrays.layout(codes) == arrays.layout(data))


def _fits_scales(scales, data) -> bool:
    a = arrays.adapter(scales)
    return (_same_place(scales, data) and a.dtype(scales) is DType.F32
            and a.contiguous(scales) and a.unsupported(scales) is None)


def float32_buffers(buffers: dict) -> dict:
    """`buffers` (one parameter's state) with each pair of 8-bit codes and scales replaced by
    the float32 values they hold, under the codes' name."""
    out = {}
    for name, value in buffers.items():
        scales = buffers.get(scales_of(name))
        if scales is not None and code_map_of(value) is not None:
            out[name] = dequantize(value, scales)
        elif not (name.endswith("_absmax") and code_map_of(buffers.get(name[:-7])) is not None):
            out[name] = value
    return out
