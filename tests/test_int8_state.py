"""`state_dtype="int8"`: 8-bit codes and one float32 scale per block of 256 (`ir.quantized`).

The code maps are checked against their definition (every value, every tie), stochastic
encoding against its promise (unbiased), every optimizer on the compiled backend against the
interpreter, and the optimizer's state handling: what it keeps, checkpoints that load back
exactly, float32 checkpoints that are quantized, exports, layouts and bad compact state.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from test_state_dtype import _config  # each optimizer's largest structure, with an lr

import stepjit
from stepjit.ir import (
    CODE_MAPS,
    QUANT_BLOCK,
    DType,
    Slot,
    UpdateRule,
    evaluate,
    per_tensor,
    quantized,
    scalar,
    tensor,
)
from stepjit.ir.ops import code_stream
from stepjit.optim import registry
from stepjit.optim.compact import dequantize
from stepjit.optim.optimizer import rounding_keys

NAMES = sorted(registry.OPTIMIZERS)


def _grads(rng, params):
    for p in params:
        p.grad = rng.standard_normal(p.shape).astype(np.float32)


def _run(name, config, backend, state_dtype="int8", steps=4, seed=0,
         sizes=((5, 3), (700,), (256,))):
    rng = np.random.default_rng(seed)
    params = [stepjit.Parameter(rng.standard_normal(s).astype(np.float32)) for s in sizes]
    opt = registry.OPTIMIZERS[name](params, backend=backend, state_dtype=state_dtype, **config)
    for _ in range(steps):
        _grads(rng, params)
        opt.step()
    return opt, params


# -- the code maps ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CODE_MAPS))
def test_a_code_map_holds_its_values_exactly_and_rounds_to_the_nearest(name):
    cm = CODE_MAPS[name]
    values = cm.magnitudes()
    assert values[0] == 0 and values[-1] == 1 and np.all(np.diff(values) > 0)
    codes = np.arange(cm.top + 1, dtype=np.uint8)
    np.testing.assert_array_equal(cm.decode(codes), values)
    np.testing.assert_array_equal(cm.encode(values), codes)
    x = np.random.default_rng(1).uniform(0, 1, 10_000).astype(np.float32)
    got = cm.decode(cm.encode(x))
    lo = values[np.searchsorted(values, x, side="right") - 1]
    hi = values[np.minimum(np.searchsorted(values, x, side="right"), cm.top)]
    assert np.all(np.abs(got - x) <= np.minimum(x - lo, hi - x) + 0)  # the nearest value
    mid = ((values[:-1].astype(np.float64) + values[1:]) / 2).astype(np.float32)
    tie = cm.encode(mid)  # ties go to the even code
    assert np.all(tie % 2 == 0) and np.all(np.abs(tie.astype(int) - codes[:-1]) <= 1)
    if cm.signed:
        np.testing.assert_array_equal(cm.decode(cm.encode(-values)), -values)
        assert cm.encode(np.float32(-0.0)) == 0 and np.signbit(cm.decode(np.uint8(0x80)))
    else:
        assert cm.encode(np.float32(-0.5)) == 0  # negative values give 0
    assert cm.encode(np.float32(7.0)) == cm.top == cm.encode(np.float32(np.inf))
    assert cm.encode(np.float32(np.nan)) == cm.top  # its block's scale is NaN: it reads NaN
    assert cm.encode(-np.float32(np.nan)) == cm.top  # whatever its sign bit


@pytest.mark.parametrize("name", sorted(CODE_MAPS))
def test_stochastic_encoding_is_unbiased(name):
    cm = CODE_MAPS[name]
    n = 1 << 16
    index = np.arange(n, dtype=np.uint64)
    for x in [0.3, 0.01, 0.9999, 3e-6, 2.0**-25, 0.75]:  # normal and subnormal ranges
        # across a tensor in one step, and one element across steps (a fresh key each step)
        keys = rounding_keys(7, np.array([3], np.uint64), np.arange(n, dtype=np.uint64))
        for stream in (code_stream(123.0, index), code_stream_of_keys(keys, 1000)):
            codes = cm.encode_stochastic(np.full(n, x, np.float32), stream)
            got = cm.decode(codes).astype(np.float64)
            lo, hi = got.min(), got.max()
            assert lo <= x <= hi and len(np.unique(got)) <= 2  # only the two neighbours
            p = (x - lo) / (hi - lo) if hi > lo else 0.0
            sigma = (hi - lo) * np.sqrt(max(p * (1 - p), 1 / n) / n)
            assert abs(got.mean() - x) <= 5 * sigma + (hi - lo) * 2.0**-20, (x, got.mean())


def code_stream_of_keys(keys: np.ndarray, index: int) -> np.ndarray:
    """Element `index`'s bits of `code_stream` under each of `keys`."""
    return np.array([code_stream(k, index) for k in keys], np.uint32)


def test_an_elements_bits_are_uncorrelated_between_slots_and_steps():
    # within a step an element's bits are the tensor's hashed key plus its index times a
    # constant; the key is fresh each step and each slot adds its position to it, so what one
    # element draws is independent between its two slots, and from one step to the next
    n = 1 << 14
    keys = rounding_keys(7, np.array([3], np.uint64), np.arange(n + 1, dtype=np.uint64))
    for index in (0, 1, 4097):
        low = {(slot, step): code_stream_of_keys(keys[step:step + n] + slot, index) % 2**20
               for slot in (1.0, 2.0) for step in (0, 1)}
        a = low[1.0, 0].astype(np.float64)
        for other in (low[2.0, 0], low[1.0, 1]):
            assert abs(np.corrcoef(a, other.astype(np.float64))[0, 1]) < 5 / np.sqrt(n)
        assert abs(a.mean() / 2**20 - 0.5) < 5 * np.sqrt(1 / 12 / n)  # uniform


def test_rounding_to_nearest_loses_an_average_that_stochastic_rounding_keeps():
    # v <- 0.999 v + 0.001 g^2 with g^2 = 2 v: v grows by 0.1% a step, below half a code,
    # so rounded to nearest it never moves; rounded stochastically it grows as in float32
    v, g2 = tensor("v", DType.F32), scalar("g2", DType.F32)
    rule = UpdateRule("ema", [Slot("v", DType.F32, True)], {"v": v * 0.999 + g2 * 0.001})
    start = np.full(4 * QUANT_BLOCK, 0.5, np.float32)
    start[::QUANT_BLOCK] = 1.0  # each block's largest value: a fixed point, held exactly
    exact = start.astype(np.float64).copy()
    found = {}
    for key in (None, "k"):
        q = quantized(rule, {"v": "unsigned"}, f"ema_{key}", key=key)
        codes, scales = CODE_MAPS["unsigned"].quantize(start)
        for step in range(300):
            out = evaluate(q, {"v": codes, "v_absmax": scales}, {"g2": 1.0}, {"k": step * 977.0})
            codes, scales = out["v"], out["v_absmax"]
        found[key] = CODE_MAPS["unsigned"].dequantize(codes, scales)
    for _ in range(300):
        exact = exact * 0.999 + 0.001
    rest = np.ones(start.size, bool)
    rest[::QUANT_BLOCK] = False
    assert np.all(found[None][rest] == 0.5)  # the same code all along
    assert exact[1] > 0.62  # where it should be
    np.testing.assert_allclose(found["k"][rest].mean(), exact[1], rtol=0.01)


# -- every optimizer ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_keeps_int8_state_and_the_backends_agree(name):
    config = _config(name)
    opt, params = _run(name, config, "llvm")
    ref_opt, ref = _run(name, config, "reference")
    for p in params:
        st = opt.state[p]
        names = [k for k in st if k != "step" and not k.endswith("_absmax")]
        assert names, "no state"
        for k in names:
            assert st[k].dtype in (np.int8, np.uint8) and st[k].shape == p.shape
            assert st[k].dtype == (np.uint8 if k in opt.unsigned_state else np.int8)
            blocks = -(-p.data.size // QUANT_BLOCK)
            assert st[f"{k}_absmax"].dtype == np.float32 and st[f"{k}_absmax"].shape == (blocks,)
    reductions = any(b.launch.rule.reductions for plan in opt._plans.values()
                     for b in plan.batches)
    for p, r in zip(params, ref, strict=True):
        if reductions:
            np.testing.assert_allclose(p.data, r.data, rtol=1e-4, atol=1e-5)
            continue
        np.testing.assert_array_equal(p.data, r.data)
        for k, v in opt.state[p].items():
            np.testing.assert_array_equal(v, ref_opt.state[r][k], err_msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_int8_state_follows_the_float32_trajectory(name):
    config = _config(name)
    _, compact = _run(name, config, "llvm", steps=10)
    _, full = _run(name, config, "llvm", None, steps=10)
    moved = sum(float(np.abs(f.data - c0.data).sum()) for f, c0 in
                zip(full, _run(name, config, "llvm", None, steps=0)[1]))
    error = sum(float(np.abs(f.data - c.data).sum()) for f, c in zip(full, compact))
    # each stored value is off by less than a code's spacing (an eighth of it), in a random
    # direction: measured 0.02-0.04 of the way for the adaptive optimizers, 0.13 for SGD,
    # whose step is its momentum itself (here with random gradients, the worst case)
    assert error <= 0.2 * moved


def test_the_int8_rule_is_structural_and_compiled_once():
    stepjit.reset_cache_info()
    _run("adamw", {"lr": 0.01}, "llvm", steps=2)
    first = stepjit.cache_info()
    _run("adamw", {"lr": 0.02}, "llvm", steps=2, seed=1)
    again = stepjit.cache_info()
    assert again.compiles == first.compiles and again.disk_hits == first.disk_hits
    opt, _ = _run("adamw", {"lr": 0.01}, "llvm", steps=1)
    rules = {b.launch.rule.name for plan in opt._plans.values() for b in plan.batches}
    assert rules == {"adamw_float32_float32_state_int8"}


def test_blocks_of_zeros_stay_zero_and_a_nan_poisons_only_its_block():
    p = stepjit.Parameter(np.ones(3 * QUANT_BLOCK, np.float32))
    opt = stepjit.optim.Adam([p], lr=0.1, state_dtype="int8")
    g = np.ones(p.shape, np.float32)
    g[:QUANT_BLOCK] = 0.0
    g[QUANT_BLOCK + 7] = np.nan
    p.grad = g
    opt.step()
    m = dequantize(opt.state[p]["exp_avg"], opt.state[p]["exp_avg_absmax"])
    assert np.all(m[:QUANT_BLOCK] == 0) and opt.state[p]["exp_avg_absmax"][0] == 0
    assert np.all(np.isnan(m[QUANT_BLOCK:2 * QUANT_BLOCK]))
    np.testing.assert_allclose(m[2 * QUANT_BLOCK:], 0.1, rtol=1e-6)
    assert np.all(p.data[:QUANT_BLOCK] == 1) and np.all(np.isfinite(p.data[2 * QUANT_BLOCK:]))


def test_a_nonzero_initial_value_is_quantized_exactly():
    p = stepjit.Parameter(np.ones(300, np.float32))
    opt = stepjit.optim.Adagrad([p], lr=0.1, initial_accumulator_value=0.25, state_dtype="int8")
    p.grad = np.zeros(300, np.float32)
    opt.step()
    st = opt.state[p]
    assert st["sum"].dtype == np.uint8
    np.testing.assert_array_equal(dequantize(st["sum"], st["sum_absmax"]), 0.25)


# -- checkpoints --------------------------------------------------------------------------
def test_an_int8_checkpoint_loads_back_exactly_and_continues_the_same_way():
    opt, params = _run("adamw", {"lr": 0.01, "weight_decay": 0.1}, "llvm", steps=3)
    saved = opt.state_dict()
    twins = [stepjit.Parameter(p.data.copy()) for p in params]
    twin = stepjit.optim.AdamW(twins, lr=0.01, weight_decay=0.1, state_dtype="int8")
    twin.load_state_dict(saved)
    for k, v in saved["state"][1].items():
        assert np.array_equal(twin.state[twins[1]][k], v) and twin.state[twins[1]][k] is not v
    rng = np.random.default_rng(7)
    for _ in range(3):
        _grads(rng, params)
        for p, t in zip(params, twins):
            t.grad = p.grad.copy()
        opt.step()
        twin.step()
    for p, t in zip(params, twins):
        np.testing.assert_array_equal(p.data, t.data)
        for k, v in opt.state[p].items():
            np.testing.assert_array_equal(v, twin.state[t][k], err_msg=k)


def test_float32_checkpoints_are_quantized_and_int8_ones_exported_as_float32():
    full, params = _run("adam", {"lr": 0.01}, "llvm", None, steps=3)
    saved = full.state_dict()
    compact = stepjit.optim.Adam(params, lr=0.01, state_dtype="int8")
    compact.load_state_dict(saved)  # float32 buffers: quantized at the next step
    for p in params:
        p.grad = np.zeros(p.shape, np.float32)
    compact.step()
    exported = stepjit.optim.float32_state(compact.state_dict())
    for i, p in enumerate(params):
        st = compact.state[p]
        assert st["exp_avg"].dtype == np.int8 and float(st["step"]) == 4.0
        want = saved["state"][i]["exp_avg"] * np.float32(0.9)  # one step with g = 0
        got = exported["state"][i]["exp_avg"]
        assert got.dtype == np.float32 and "exp_avg_absmax" not in exported["state"][i]
        np.testing.assert_array_equal(got, dequantize(st["exp_avg"], st["exp_avg_absmax"]))
        scale = np.repeat(st["exp_avg_absmax"], QUANT_BLOCK)[: p.data.size].reshape(p.shape)
        assert np.all(np.abs(got - want) <= 2 ** -3 * np.maximum(np.abs(want), scale * 2**-14))
    back = stepjit.optim.Adam(params, lr=0.01)  # and back to float32 state
    back.load_state_dict(compact.state_dict())
    back.step()
    assert all(back.state[p]["exp_avg"].dtype == np.float32
               and "exp_avg_absmax" not in back.state[p] for p in params)


@pytest.mark.parametrize("breakage", ["short scales", "2-D scales", "codes as floats",
                                      "codes of another shape", "scales without codes"])
def test_bad_compact_state_is_refused_and_nothing_changes(breakage):
    opt, params = _run("adam", {"lr": 0.01}, "llvm", steps=2)
    saved = opt.state_dict()
    state = saved["state"][1]
    if breakage == "short scales":
        state["exp_avg_absmax"] = state["exp_avg_absmax"][:-1]
        match = "scales do not match the codes"
    elif breakage == "2-D scales":
        state["exp_avg_absmax"] = state["exp_avg_absmax"][None, :]
        match = "scales do not match the codes"
    elif breakage == "codes as floats":
        state["exp_avg"] = state["exp_avg"].astype(np.float32)
        match = "8-bit codes: int8"
    elif breakage == "codes of another shape":
        state["exp_avg"] = state["exp_avg"][:-1]
        match = "has shape"
    else:
        del state["exp_avg"]
        match = "shape"
    before = {p: {k: np.copy(v) for k, v in opt.state[p].items()} for p in params}
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    for p in params:
        for k, v in before[p].items():
            np.testing.assert_array_equal(opt.state[p][k], v)


# -- the torch face -------------------------------------------------------------------------------
def test_the_torch_face_keeps_codes_through_its_checkpoints():
    torch = pytest.importorskip("torch")
    import stepjit.torch as st

    torch.manual_seed(0)
    model = torch.nn.Linear(40, 30)
    opt = st.AdamW(model.parameters(), lr=0.01, state_dtype="int8")
    x = torch.randn(8, 40)

    def step(m, o):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()

    step(model, opt)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # a checkpoint on disk (a live state dict shares
    buffer.seek(0)  # its tensors with the optimizer, in torch as here)
    saved = torch.load(buffer)
    w = saved["state"][0]
    assert w["exp_avg"].dtype == torch.int8 and w["exp_avg_sq"].dtype == torch.uint8
    assert w["exp_avg_absmax"].shape == (-(-1200 // QUANT_BLOCK),)
    twin_model = torch.nn.Linear(40, 30)
    twin_model.load_state_dict(model.state_dict())
    twin = st.AdamW(twin_model.parameters(), lr=0.01, state_dtype="int8")
    twin.load_state_dict(saved)  # torch would cast the codes to float32: kept as they are
    assert twin.state[twin_model.weight]["exp_avg"].dtype == torch.int8
    for _ in range(2):
        step(model, opt)
        step(twin_model, twin)
    assert torch.equal(model.weight, twin_model.weight)
    bad = opt.state_dict()
    bad["state"][0]["exp_avg_absmax"] = bad["state"][0]["exp_avg_absmax"][:2]
    with pytest.raises(ValueError, match="scales do not match the codes"):
        twin.load_state_dict(bad)
    assert twin.state[twin_model.weight]["exp_avg_absmax"].shape == (5,)


def test_codes_follow_a_channels_last_parameter():
    torch = pytest.importorskip("torch")
    import stepjit.torch as st

    w = torch.nn.Parameter(torch.randn(4, 8, 5, 5).to(memory_format=torch.channels_last))
    opt = st.Adam([w], lr=0.01, state_dtype="int8")
    w.grad = torch.randn(4, 8, 5, 5).to(memory_format=torch.channels_last)
    opt.step()
    codes = opt.state[w]["exp_avg"]
    assert codes.is_contiguous(memory_format=torch.channels_last)
    # blocks run over memory order: the first block is the first 256 elements in memory
    flat_m = dequantize(codes, opt.state[w]["exp_avg_absmax"])
    np.testing.assert_allclose(flat_m.numpy(), (0.1 * w.grad).numpy(), rtol=2**-3, atol=1e-6)
    plain = st.Adam([torch.nn.Parameter(w.detach().contiguous())], lr=0.01, state_dtype="int8")
    plain.load_state_dict(opt.state_dict())  # contiguous codes for a contiguous parameter:
    plain.param_groups[0]["params"][0].grad = w.grad.contiguous()  # converted when needed
    plain.step()
    got = plain.state[plain.param_groups[0]["params"][0]]
    assert got["exp_avg"].is_contiguous()


def test_quantized_refuses_what_it_cannot_keep():
    rule = registry.rule_for("sgd", "float32", lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="has no slot nope"):
        quantized(rule, {"nope": "signed"}, "r")
    with pytest.raises(ValueError, match="cannot be kept in 8 bits"):
        quantized(rule, {"param": "signed"}, "r")
    with pytest.raises(ValueError, match="unknown code map"):
        quantized(rule, {"momentum_buffer": "ternary"}, "r")
    x = tensor("x", DType.F32)
    with pytest.raises(ValueError, match="differs between the elements of a block"):
        UpdateRule("r", [Slot("x", DType.F32, True), Slot("s", DType.F32, True, per_block=True)],
                   {"x": x, "s": x + per_tensor("t", DType.F32)})


def test_code_maps_and_per_block_slots_are_part_of_the_rule_key():
    x, s = tensor("x", DType.F32), tensor("s", DType.F32)
    rules = [UpdateRule("r", [Slot("x", DType.F32, True), Slot("s", DType.F32, per_block=b)],
                        {"x": x * s}) for b in (False, True)]
    assert rules[0].key != rules[1].key and "s: float32 per-block" in rules[1].text
    sgd = registry.rule_for("sgd", "float32", lr=0.1, momentum=0.9)
    keys = {quantized(sgd, {"momentum_buffer": m}, "q").key for m in CODE_MAPS}
    assert len(keys) == len(CODE_MAPS)


def test_a_per_block_output_without_a_block_reduction_is_stored_once_per_block():
    # (a bandwidth probe reads and writes 8-bit state this way): every backend writes index
    # i // QUANT_BLOCK, never past the per-block slot's ceil(n / QUANT_BLOCK) values
    from stepjit.runtime.cpu import LLVMBackend

    s, x = tensor("s", DType.F32), tensor("x", DType.F32)
    rule = UpdateRule("per_block_copy", [Slot("x", DType.F32, True),
                                         Slot("s", DType.F32, True, per_block=True)],
                      {"x": x + s, "s": s * 2.0})
    n = 40_000
    x0 = np.arange(n, dtype=np.float32)
    guard = np.full(-(-n // QUANT_BLOCK) + 64, 7.0, np.float32)  # what lies past the slot
    s0 = guard[: -64]
    s0[:] = np.arange(s0.size)
    want = evaluate(rule, {"x": x0, "s": s0}, {}, {})
    backend = LLVMBackend()
    launch = backend.bind(backend.compile(rule), [(x0, s0)], np.zeros((1, 0)))
    launch(())
    np.testing.assert_array_equal(x0, want["x"])
    np.testing.assert_array_equal(s0, want["s"])
    assert np.all(guard[-64:] == 7.0)


def test_a_block_maximum_of_a_uniform_value_is_its_magnitude():
    from stepjit.ir import block_absmax
    from stepjit.runtime.cpu import LLVMBackend

    s = scalar("s", DType.F32)
    rule = UpdateRule("uniform_block", [Slot("x", DType.F32, True)],
                      {"x": tensor("x", DType.F32) + block_absmax(s)})
    x = np.arange(600, dtype=np.float32)
    want = evaluate(rule, {"x": x}, {"s": -2.5}, {})["x"]
    backend = LLVMBackend()
    backend.bind(backend.compile(rule), [(x,)], np.zeros((1, 0)))((-2.5,))
    np.testing.assert_array_equal(x, want)
    np.testing.assert_array_equal(want, np.arange(600, dtype=np.float32) + 2.5)
