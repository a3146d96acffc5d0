"""No crash, hang or silent corruption from any input a user can give.

Each test here is a case that once crashed the process, hung it, or returned wrong numbers:
state buffers that no longer fit their parameter, non-native byte order, memory shared across
groups and slots, fork, Ctrl-C in the middle of a step, two threads on one optimizer, numbers the
compute type cannot hold, a failure half way through creating state.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import numpy as np
import pytest
from forking import run_forked

import stepjit
from stepjit.runtime import arrays, cpu

SGD = stepjit.optim.SGD
P = stepjit.Parameter


def momentum_steps(p0: np.ndarray, grads: list[np.ndarray], lr: float, mu: float) -> np.ndarray:
    """float32 SGD with momentum (torch's rule: the first step's buffer is the gradient)."""
    p, b = p0.astype(np.float32).copy(), None
    lr32, mu32 = np.float32(lr), np.float32(mu)
    for g in grads:
        b = g.copy() if b is None else mu32 * b + g
        p = p - lr32 * b
    return p


def snapshot(opt) -> list[np.ndarray]:
    """Copies of every parameter and state buffer of `opt`."""
    out = [np.array(arrays.host_view(p.data), copy=True)
           for g in opt.param_groups for p in g["params"]]
    for st in opt.state.values():
        out += [np.array(v, copy=True) for v in st.values()]
    return out


def assert_unchanged(before: list[np.ndarray], opt) -> None:
    after = snapshot(opt)
    assert len(after) == len(before)
    for a, b in zip(before, after):
        assert a.tobytes() == b.tobytes()


# -- 1. state buffers are checked against their parameter -----------------------------------------
@pytest.mark.parametrize("make", [
    lambda ps, backend: SGD(ps, lr=0.1, momentum=0.9, backend=backend),
    lambda ps, backend: stepjit.optim.Adam(ps, lr=0.1, backend=backend),
    lambda ps, backend: stepjit.optim.RMSprop(ps, lr=0.1, momentum=0.5, centered=True,
                                              backend=backend),
], ids=["sgd", "adam", "rmsprop"])
def test_a_parameter_replaced_by_a_larger_array_keeps_its_small_state_out_of_the_kernel(
        backend, make):
    p = P(np.ones(4, np.float32))
    opt = make([p], backend)
    p.grad = np.ones(4, np.float32)
    opt.step()
    p.data = np.ones(1 << 16, np.float32)
    p.grad = np.ones(1 << 16, np.float32)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param group 0, parameter 0: state '\w+' has shape "
                                         r"\(4,\), the parameter \(65536,\)"):
        opt.step()
    assert_unchanged(before, opt)
    del opt.state[p]  # the remedy the message gives: start this parameter afresh
    opt.step()
    assert np.all(p.data < 1)


def test_accumulation_of_a_parameter_that_grew_is_refused(backend):
    p = P(np.ones(4, np.float32))
    opt = SGD([p], lr=0.1, backend=backend)
    p.grad = np.ones(4, np.float32)
    opt.accumulate_grad()
    p.data, p.grad = np.ones(1 << 16, np.float32), np.ones(1 << 16, np.float32)
    with pytest.raises(ValueError, match="accumulated gradient"):
        opt.accumulate_grad()
    with pytest.raises(ValueError, match="accumulated gradient"):
        opt.step()
    assert np.all(p.data == 1)


def test_accumulation_scratch_of_a_finished_sum_is_reallocated_when_the_parameter_grows(backend):
    p = P(np.ones(4, np.float32))
    opt = SGD([p], lr=0.5, backend=backend)
    p.grad = np.ones(4, np.float32)
    opt.accumulate_grad()
    opt.step()  # the sum is used up: its buffer is scratch now
    p.data, p.grad = np.ones(1 << 16, np.float32), np.full(1 << 16, 2.0, np.float32)
    opt.accumulate_grad()
    opt.accumulate_grad()
    opt.step()
    np.testing.assert_array_equal(p.data, np.full(1 << 16, 1 - 0.5 * 4, np.float32))


def test_a_state_buffer_that_is_not_an_array_is_named(backend):
    p = P(np.ones(4, np.float32))
    opt = SGD([p], lr=0.1, momentum=0.9, backend=backend)
    p.grad = np.ones(4, np.float32)
    opt.step()
    opt.state[p]["momentum_buffer"] = [0.0] * 4
    opt._state_gen += 1  # as load_state_dict would
    with pytest.raises(TypeError, match="momentum_buffer.*not an array"):
        opt.step()


def test_torch_checkpoint_of_a_smaller_model_is_refused_at_step():
    torch = pytest.importorskip("torch")
    import stepjit.torch
    small = torch.nn.Linear(2, 1)
    ref = torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9)
    small(torch.ones(1, 2)).sum().backward()
    ref.step()
    big = torch.nn.Linear(512, 64)
    opt = stepjit.torch.SGD(big.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(ref.state_dict())  # torch does not check buffer shapes
    big(torch.ones(1, 512)).sum().backward()
    weight = big.weight.detach().clone()
    with pytest.raises(ValueError, match=r"parameter 0: state 'momentum_buffer' has shape "
                                         r"\(1, 2\), the parameter \(64, 512\)"):
        opt.step()
    assert torch.equal(big.weight, weight)


# -- 2. byte order --------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["param", "grad"])
def test_non_native_byte_order_is_refused(backend, which):
    swapped = np.dtype(np.float32).newbyteorder("S")
    data = np.ones(4, swapped if which == "param" else np.float32)
    p = P(data)
    p.grad = np.ones(4, swapped if which == "grad" else np.float32)
    opt = SGD([p], lr=0.05, backend=backend)
    with pytest.raises(ValueError, match="byte order"):
        opt.step()
    assert np.all(p.data == 1)


def test_a_loaded_state_in_non_native_byte_order_is_converted(backend):
    swapped = np.dtype(np.float32).newbyteorder("S")
    p = P(np.ones(4, np.float32))
    opt = SGD([p], lr=0.1, momentum=0.5, backend=backend)
    buf = np.arange(4, dtype=np.float32)
    opt.load_state_dict({"state": {0: {"momentum_buffer": buf.astype(swapped)}},
                         "param_groups": [{**opt.state_dict()["param_groups"][0]}]})
    p.grad = np.ones(4, np.float32)
    opt.step()
    np.testing.assert_allclose(opt.state[p]["momentum_buffer"], 0.5 * buf + 1)


# -- 3. fork --------------------------------------------------------------------------------------
def _child_step(n: int, conn) -> None:
    p = P(np.ones(n, np.float32))
    p.grad = np.ones(n, np.float32)
    SGD([p], lr=0.25, backend="llvm").step()
    conn.send(float(p.data.sum()))


def test_a_forked_child_steps_after_the_parent_used_its_threads(monkeypatch):
    monkeypatch.setenv("STEPJIT_NUM_THREADS", "2")
    monkeypatch.setenv("STEPJIT_THREADS_BACKEND", "pool")  # torch's team: test_omp_team.py
    cpu.num_threads.cache_clear()
    cpu.threads_backend.cache_clear()
    cpu._pool.cache_clear()
    n = 4 * cpu.PARALLEL_MIN  # large enough to be split across the thread pool
    try:
        p = P(np.ones(n, np.float32))
        p.grad = np.ones(n, np.float32)
        SGD([p], lr=0.5, backend="llvm").step()  # the pool now has a worker thread
        assert cpu._pool.cache_info().currsize == 1  # the step ran on the pool
        assert run_forked(_child_step, n) == n * 0.75
    finally:
        cpu.num_threads.cache_clear()
        cpu.threads_backend.cache_clear()
        cpu._pool.cache_clear()


# -- 4. aliasing across groups and slots ----------------------------------------------------------
def test_the_same_array_in_two_groups_is_refused(backend):
    shared = np.ones(8, np.float32)
    a, b = P(shared), P(shared)
    a.grad, b.grad = np.ones(8, np.float32), np.ones(8, np.float32)
    opt = SGD([{"params": [a]}, {"params": [b]}], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="param group 0, parameter 0 and param group 1, "
                                         "parameter 0 overlap"):
        opt.step()
    assert np.all(shared == 1)


def test_a_gradient_that_is_another_parameters_data_is_refused(backend):
    a, b = P(np.ones(8, np.float32)), P(np.full(8, 2.0, np.float32))
    a.grad, b.grad = b.data, np.ones(8, np.float32)
    opt = SGD([{"params": [a]}, {"params": [b]}], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match=r"param group 0, parameter 0 \(gradient\) and "
                                         r"param group 1, parameter 0 overlap|param group 1, "
                                         r"parameter 0 and param group 0, parameter 0 "
                                         r"\(gradient\) overlap"):
        opt.step()
    assert np.all(a.data == 1) and np.all(b.data == 2)


def test_a_gradient_that_is_a_state_buffer_is_refused(backend):
    a, b = P(np.ones(8, np.float32)), P(np.ones(8, np.float32))
    opt = SGD([a, b], lr=0.1, momentum=0.9, backend=backend)
    a.grad, b.grad = np.ones(8, np.float32), np.ones(8, np.float32)
    opt.step()
    b.grad = opt.state[a]["momentum_buffer"]
    before = snapshot(opt)
    with pytest.raises(ValueError, match="state 'momentum_buffer'.*overlap|overlap.*"
                                         "state 'momentum_buffer'"):
        opt.step()
    assert_unchanged(before, opt)


def test_two_parameters_may_read_one_gradient(backend):
    a, b = P(np.ones(8, np.float32)), P(np.ones(8, np.float32))
    g = np.full(8, 2.0, np.float32)
    a.grad = b.grad = g
    SGD([{"params": [a]}, {"params": [b], "lr": 0.25}], lr=0.5, backend=backend).step()
    np.testing.assert_array_equal(a.data, np.zeros(8, np.float32))
    np.testing.assert_array_equal(b.data, np.full(8, 0.5, np.float32))


# -- 5. interrupts --------------------------------------------------------------------------------
def test_ctrl_c_during_a_step_arrives_after_a_complete_step(backend):
    n = 1 << 22 if backend == "llvm" else 1 << 18
    rng = np.random.default_rng(0)
    inits = [rng.standard_normal(n, dtype=np.float32) for _ in range(3)]
    grads = [[rng.standard_normal(n, dtype=np.float32) for _ in range(3)] for _ in range(2)]
    ps = [P(x.copy()) for x in inits]
    opt = SGD([{"params": [q]} for q in ps], lr=0.01, momentum=0.9, backend=backend)

    def feed(k: int) -> None:
        for q, g in zip(ps, grads[k]):
            q.grad = g

    twin = [P(x.copy()) for x in inits]  # the same steps, never interrupted
    twin_opt = SGD([{"params": [q]} for q in twin], lr=0.01, momentum=0.9, backend=backend)
    for q, g in zip(twin, grads[0]):
        q.grad = g
    t0 = time.perf_counter()
    twin_opt.step()
    duration = time.perf_counter() - t0

    feed(0)
    timer = threading.Timer(duration / 3, os.kill, (os.getpid(), signal.SIGINT))
    interrupted = False
    timer.start()
    try:
        opt.step()
        time.sleep(duration)  # a signal that comes late lands here
    except KeyboardInterrupt:
        interrupted = True
    timer.join()
    assert interrupted
    after = snapshot(opt)
    time.sleep(0.05)
    assert_unchanged(after, opt)  # nothing writes after step() has raised
    for q, t in zip(ps, twin):  # every group stepped once, completely
        np.testing.assert_array_equal(q.data, t.data)
    feed(1)
    for q, g in zip(twin, grads[1]):
        q.grad = g
    opt.step()  # the first-step flag was cleared: the buffer is not re-initialised
    twin_opt.step()
    for q, t, x, g in zip(ps, twin, inits, zip(*grads)):
        np.testing.assert_array_equal(q.data, t.data)
        np.testing.assert_allclose(q.data, momentum_steps(x, list(g), 0.01, 0.9), atol=1e-5)


# -- 6. threads -----------------------------------------------------------------------------------
@contextlib.contextmanager
def busy_in_another_thread(opt):
    """While inside: another thread holds `opt` as a long step would."""
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with opt._exclusive:
            inside.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    inside.wait(10)
    try:
        yield
    finally:
        release.set()
        t.join()


def test_a_step_while_another_thread_steps_the_same_optimizer_is_refused(backend):
    p = P(np.ones(4, np.float32))
    p.grad = np.ones(4, np.float32)
    opt = SGD([p], lr=0.5, backend=backend)
    with busy_in_another_thread(opt):
        for call in (opt.step, opt.accumulate_grad, opt.zero_grad):
            with pytest.raises(RuntimeError, match="already running in another thread"):
                call()
    assert np.all(p.data == 1)
    opt.step()
    assert np.all(p.data == 0.5)


def test_steps_from_two_threads_are_never_lost(backend):
    p = P(np.zeros(1 << 12, np.float32))
    p.grad = np.ones(1 << 12, np.float32)
    opt = SGD([p], lr=1.0, backend=backend)
    done = [0, 0]

    def work(k: int) -> None:
        for _ in range(200):
            try:
                opt.step()
                done[k] += 1
            except RuntimeError:
                pass

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(done) >= 200
    np.testing.assert_array_equal(p.data, np.full(1 << 12, -float(sum(done)), np.float32))


def test_two_optimizers_step_in_parallel(backend):
    ps = [P(np.zeros(1 << 14, np.float32)) for _ in range(2)]
    for q in ps:
        q.grad = np.ones(1 << 14, np.float32)
    opts = [SGD([q], lr=1.0, backend=backend) for q in ps]
    errors = []

    def work(opt) -> None:
        try:
            for _ in range(100):
                opt.step()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(o,)) for o in opts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for q in ps:
        assert np.all(q.data == -100)


# -- 10. numbers that do not survive the compute type ---------------------------------------------
def test_an_integer_too_large_for_a_float_is_a_value_error():
    with pytest.raises(ValueError, match="Invalid lr: a number too large"):
        SGD([P(np.ones(2, np.float32))], lr=10**400)


@pytest.mark.parametrize("name, value", [
    ("lr", 1e300), ("weight_decay", 1e39), ("scale", 1e-50), ("lr", 1e-39), ("momentum", 1e39),
])
def test_a_hyperparameter_float32_cannot_hold_is_refused(backend, name, value):
    p = P(np.ones(4, np.float32))
    p.grad = np.ones(4, np.float32)
    kw = dict(lr=0.1, momentum=0.5, weight_decay=1e-4)
    opt = SGD([p], **{**kw, name: value}, backend=backend) if name != "momentum" else None
    if opt is None:  # momentum > 1 is allowed by the range checks; float32 cannot hold 1e39
        opt = SGD([p], **kw, backend=backend)
        opt.param_groups[0]["momentum"] = value
    with pytest.raises(ValueError, match=rf"param group 0: {name} = .* cannot be represented "
                                         "in float32"):
        opt.step()
    assert np.all(p.data == 1) and not opt.state


def test_the_same_hyperparameters_are_fine_in_float64(backend):
    p = P(np.ones(4))
    p.grad = np.ones(4)
    SGD([p], lr=1e-300, scale=1e-50, backend=backend).step()
    assert np.all(p.data == 1.0)  # the update is below float64's resolution at 1, not refused


# -- 11. a failed step changes nothing ------------------------------------------------------------
def test_memory_error_while_creating_state_leaves_no_state_behind(backend, monkeypatch):
    a, b = P(np.ones(4, np.float32)), P(np.ones(4, np.float32))
    a.grad, b.grad = np.ones(4, np.float32), np.full(4, 2.0, np.float32)
    opt = SGD([{"params": [a]}, {"params": [b]}], lr=0.1, momentum=0.9, backend=backend)
    real, calls = arrays.zeros_as, [0]

    def zeros(*args):
        calls[0] += 1
        if calls[0] == 2:
            raise MemoryError("no memory for group 1's buffer")
        return real(*args)

    monkeypatch.setattr(arrays, "zeros_as", zeros)
    with pytest.raises(MemoryError):
        opt.step()
    assert not opt.state and np.all(a.data == 1) and np.all(b.data == 1)
    monkeypatch.setattr(arrays, "zeros_as", real)
    opt.step()
    opt.step()
    for q, g in ((a, 1.0), (b, 2.0)):
        grads = [np.full(4, g, np.float32)] * 2
        np.testing.assert_allclose(q.data, momentum_steps(np.ones(4), grads, 0.1, 0.9))


# -- 12. smaller ones -----------------------------------------------------------------------------
def test_a_bad_thread_count_names_the_variable(monkeypatch):
    monkeypatch.setenv("STEPJIT_NUM_THREADS", "abc")
    cpu.num_threads.cache_clear()
    try:
        p = P(np.ones(cpu.PARALLEL_MIN, np.float32))  # large enough to ask for threads
        p.grad = np.ones(cpu.PARALLEL_MIN, np.float32)
        opt = SGD([p], lr=0.1, backend="llvm")
        with pytest.raises(ValueError, match="STEPJIT_NUM_THREADS='abc'"):
            opt.step()
        assert np.all(p.data == 1)
    finally:
        monkeypatch.delenv("STEPJIT_NUM_THREADS")
        cpu.num_threads.cache_clear()


def test_a_group_without_params_in_a_state_dict_is_a_value_error(backend):
    p = P(np.ones(4, np.float32))
    opt = SGD([p], lr=0.1, backend=backend)
    sd = opt.state_dict()
    del sd["param_groups"][0]["params"]
    with pytest.raises(ValueError, match="param group 0 needs a 'params' list"):
        opt.load_state_dict(sd)


def test_adding_groups_does_linear_work(monkeypatch):
    opt = SGD([P(np.ones(2, np.float32))], lr=0.1, backend="reference")
    calls = [0]
    real = arrays.device

    def device(x):
        calls[0] += 1
        return real(x)

    monkeypatch.setattr(arrays, "device", device)
    for _ in range(300):
        opt.add_param_group({"params": [P(np.ones(2, np.float32))]})
    assert calls[0] <= 2 * 300  # not one call per earlier parameter for every new group


def test_torch_meta_and_sparse_tensors_get_a_clear_error():
    torch = pytest.importorskip("torch")
    import stepjit.torch
    meta = torch.nn.Parameter(torch.empty(4, device="meta"))
    with pytest.raises(ValueError, match="'meta' device"):
        stepjit.optim.SGD([meta], lr=0.1)  # torch's face accepts it, as torch does: deferred
    deferred = stepjit.torch.SGD([meta], lr=0.1)
    meta.grad = torch.ones(4, device="meta")
    with pytest.raises(RuntimeError, match="parameter 0: .* is on the meta device"):
        deferred.step()
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = stepjit.torch.SGD(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    weight = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight, weight)


def test_zero_grad_after_a_smaller_gradient_writes_only_that_gradient(backend):
    """zero_grad's table holds each gradient's size: a smaller new gradient is not zeroed past
    its end (the tables are rebuilt, or re-pointed only for the same shape)."""
    p = P(np.ones(1024, np.float32))
    p.grad = np.ones(1024, np.float32)
    opt = SGD([p], lr=0.1, backend=backend)
    opt.zero_grad()
    base = np.full(1024, 7.0, np.float32)
    p.grad = base[:8]  # a view: zeroing 1024 elements from its start would clobber `base`
    opt.zero_grad()
    assert np.all(base[:8] == 0) and np.all(base[8:] == 7)


def test_a_product_of_hyperparameters_beyond_float64_is_refused(backend):
    p = P(np.ones(3))
    p.grad = np.ones(3)
    opt = SGD([{"params": [p], "lr_mult": 1e200}], lr=1e200, backend=backend)
    with pytest.raises(ValueError, match="param group 0: lr = inf is not finite"):
        opt.step()
    assert np.all(p.data == 1)


# -- tables re-pointed instead of rebuilt -----------------------------------------------------
def test_torch_data_replaced_at_the_same_address_is_checked_again():
    torch = pytest.importorskip("torch")
    import stepjit.torch

    full = torch.zeros(1000)
    p = torch.nn.Parameter(torch.zeros(1000))
    p.data = full
    opt = stepjit.torch.SGD([p], lr=1.0, momentum=0.9)
    p.grad = torch.ones(1000)
    opt.step()
    victim = full[10:]
    victim.fill_(5.0)
    p.data = full[:10]  # the same address, a tenth of the size
    p.grad = torch.full((10,), 3.0)
    with pytest.raises(ValueError, match="momentum_buffer' has shape \\(1000,\\)"):
        opt.step()
    assert torch.all(victim == 5.0)


def test_torch_strided_gradient_at_the_same_address_is_refused():
    torch = pytest.importorskip("torch")
    import stepjit.torch

    p = torch.nn.Parameter(torch.zeros(4))
    opt = stepjit.torch.SGD([p], lr=1.0)
    g = torch.arange(1.0, 9.0)
    p.grad = g[:4]
    opt.step()
    p.grad = g[::2]  # starts where the old one did
    with pytest.raises(ValueError, match="gradient has gaps or overlaps in memory"):
        opt.step()


def test_a_parameter_list_edited_in_place_is_seen(backend):
    a, b = P(np.zeros(3, np.float32)), P(np.zeros(3, np.float32))
    a.grad = np.ones(3, np.float32)
    opt = SGD([a], lr=1.0, backend=backend)
    opt.step()
    opt.param_groups[0]["params"][0] = b
    b.grad = np.ones(3, np.float32)
    opt.step()
    assert np.all(a.data == -1) and np.all(b.data == -1)


def test_deleting_a_parameters_state_starts_it_afresh(backend):
    p = P(np.zeros(2))
    p.grad = np.ones(2)
    opt = SGD([p], lr=1.0, momentum=0.5, backend=backend)
    opt.step()  # buffer 1
    del opt.state[p]
    opt.step()  # a new buffer: 1 again, not 0.5 * 1 + 1
    np.testing.assert_array_equal(p.data, [-2.0, -2.0])


def test_torch_tensors_and_parameters_do_not_mix():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="either torch tensors or stepjit.Parameters"):
        SGD([{"params": [torch.nn.Parameter(torch.zeros(2))]},
             {"params": [P(np.zeros(2, np.float32))]}], lr=0.1)
    with pytest.raises(TypeError, match="numpy or cupy array"):
        P(torch.zeros(2))


def test_zero_grad_reset_waits_its_turn(backend):
    p = P(np.ones(4, np.float32))
    p.grad = np.ones(4, np.float32)
    opt = SGD([p], lr=0.5, backend=backend)
    with busy_in_another_thread(opt), pytest.raises(RuntimeError, match="already running"):
        opt.zero_grad(reset=True)
    assert p.grad is not None


def test_a_per_tensor_value_float32_cannot_hold_is_refused_before_any_group_steps(backend):
    a, b = P(np.ones(3, np.float32)), P(np.ones(3, np.float32))
    a.grad, b.grad = np.ones(3, np.float32), np.ones(3, np.float32)
    opt = stepjit.optim.Adam([{"params": [a], "lr": 1e-3}, {"params": [b]}], lr=1e38,
                             backend=backend)
    with pytest.raises(ValueError, match="param group 1: per-tensor value step_size"):
        opt.step()
    assert np.all(a.data == 1) and np.all(b.data == 1)  # neither group stepped
    assert all(int(st.get("step", 0)) == 0 for st in opt.state.values())


def test_hyperparameters_edited_in_place_take_effect_at_the_next_step(backend):
    """A group's settings are reused while they compare equal to the last checked copy: an edit
    inside a list (betas as a list), a new value of another type (a flag set to 1) and a changed
    number are all seen."""
    def run(edit):
        p = P(np.ones(4))
        opt = stepjit.optim.Adam([p], lr=0.1, betas=[0.9, 0.999], backend=backend)
        for k in range(3):
            p.grad = np.full(4, float(k + 1))
            opt.step()
            if k == 0:
                edit(opt.param_groups[0])
        return p.data

    def in_place(group):
        group["betas"][0] = 0.5

    def replaced(group):
        group["betas"] = (0.5, 0.999)

    np.testing.assert_array_equal(run(in_place), run(replaced))
    assert not np.array_equal(run(in_place), run(lambda group: None))
    p = P(np.ones(4))
    opt = stepjit.optim.Adam([p], lr=0.1, amsgrad=True, backend=backend)
    p.grad = np.ones(4)
    opt.step()
    opt.param_groups[0]["amsgrad"] = 1  # == True, yet not a bool
    with pytest.raises(TypeError, match="amsgrad"):
        opt.step()
