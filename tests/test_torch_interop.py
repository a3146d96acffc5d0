"""torch tensors as parameters, and stepjit.torch.SGD as a torch.optim drop-in."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import stepjit  # noqa: E402
import stepjit.torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).to(
        dtype)


def _train(model, opt, steps=6, lr_schedule=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g).to(dtype), torch.randn(32, 2, generator=g).to(dtype)
    for k in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).float().pow(2).mean()
        loss.backward()
        if lr_schedule:
            for group in opt.param_groups:
                group["lr"] = 0.1 / (k + 1)
        opt.step()


def test_import_stepjit_does_not_import_torch():
    code = "import sys, stepjit, stepjit.optim; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_tensors_in_stepjit_optim_follow_torch(backend, dtype):
    kw = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3)
    a, b = _model(dtype), _model(dtype)
    _train(a, torch.optim.SGD(a.parameters(), **kw), dtype=dtype)
    opt = stepjit.optim.SGD(list(b.parameters()), backend=backend, **kw)
    _train(b, opt, dtype=dtype)
    assert opt.backend == backend
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, **tol)
        assert isinstance(opt.state[pb]["momentum_buffer"], torch.Tensor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_torch_tensors_keep_float32_state(backend, dtype):
    model = _model(dtype)
    opt = stepjit.optim.SGD(list(model.parameters()), lr=0.05, momentum=0.9, backend=backend)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, steps=2, dtype=dtype)
    for p, p0 in zip(model.parameters(), before):
        assert opt.state[p]["momentum_buffer"].dtype == torch.float32
        assert p.dtype == dtype and not torch.equal(p, p0)


def test_updates_are_in_place_and_zero_copy():
    model = _model()
    ptrs = [p.data_ptr() for p in model.parameters()]
    opt = stepjit.optim.SGD(list(model.parameters()), lr=0.1)
    w = next(model.parameters())
    w.grad = torch.ones_like(w)
    view = w.detach()  # shares storage: sees the update
    before = view.clone()
    opt.step()
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    torch.testing.assert_close(view, before - 0.1)


def test_stepjit_zero_grad_on_torch_grads():
    model = _model()
    opt = stepjit.optim.SGD(list(model.parameters()), lr=0.1)
    _train(model, opt, steps=1)
    opt.zero_grad()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad(reset=True)
    assert all(p.grad is None for p in model.parameters())


def test_non_leaf_and_frozen_tensors_are_refused():
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="parameter 0: the torch tensor is not a leaf"):
        stepjit.optim.SGD([w * 2], lr=0.1)
    with pytest.raises(ValueError, match="parameter 1: the torch tensor does not require grad"):
        stepjit.optim.SGD([w, torch.randn(3)], lr=0.1)


def test_lr_scheduler_hooks_and_set_to_none_without_recompiling():
    model = _model()
    opt = stepjit.torch.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append(1))
    _train(model, opt, steps=1, lr_schedule=False)
    compiles = stepjit.cache_info().compiles
    for _ in range(6):
        _train(model, opt, steps=1, lr_schedule=False)
        sched.step()
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in model.parameters())
    assert stepjit.cache_info().compiles == compiles
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert len(calls) == 7


def test_the_example_matches_torch_step_for_step():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import example_torch
    finally:
        sys.path.pop(0)
    history = example_torch.train(steps=30)
    for loss_torch, loss_ours, diff in history:
        assert loss_ours == pytest.approx(loss_torch, rel=1e-5)
        assert diff < 1e-5
    assert history[-1][0] < history[0][0] / 2  # it trained


DDP_WORKER = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    # Imported after init_process_group (as torch.optim does on first use), torch._dynamo keeps
    # the default group, and so gloo's threads, alive until the interpreter exits.
    import torch._dynamo
    import stepjit.torch
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    starve = os.environ.get("STARVE_GLOO") == "1"
    if starve:  # make the exit race likely: one CPU per rank, gloo's threads at the lowest priority
        print("ready", flush=True)
        sys.stdin.readline()  # then run when told, alone on otherwise idle CPUs
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]})
        threads = set(os.listdir("/proc/self/task"))
    if world > 1:  # rendezvous through a file: no TCP port to race for
        dist.init_process_group("gloo", init_method="file://" + os.environ["RENDEZVOUS"],
                                rank=rank, world_size=world)
    if starve:
        for tid in set(os.listdir("/proc/self/task")) - threads:
            os.setpriority(os.PRIO_PROCESS, int(tid), 19)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = stepjit.torch.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3,
                            process_group=dist.group.WORLD if world > 1 else None,
                            bucket_cap_mb=0.0001)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
        part = slice(rank * 16 // world, (rank + 1) * 16 // world)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[part]), y[part]).backward()
        opt.step()
    print(json.dumps([p.detach().flatten().tolist() for p in model.parameters()]))
    if world > 1 and starve:
        # As most scripts end: the optimizer still holds the group, so gloo's threads live until
        # the interpreter exits. Safe only if they hold nothing of Python's by then.
        dist.destroy_process_group()
    elif world > 1:
        # With no reference left (the optimizer holds one), destroy_process_group frees the group
        # and joins gloo's threads here, before the interpreter begins to exit: then nothing
        # gloo does can abort the exit.
        del opt
        dist.destroy_process_group()
""")


def _spawn_gloo_pair(code: str, rendezvous: Path, **env: str) -> list[subprocess.Popen]:
    """`code` started as ranks 0 and 1 of a gloo group."""
    env = {**os.environ, "RENDEZVOUS": str(rendezvous), "WORLD_SIZE": "2",
           "GLOO_SOCKET_IFNAME": "lo", **env}
    return [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r)},
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for r in range(2)]


def _finish(procs: list[subprocess.Popen], stdin: str = "") -> list[tuple[int, str, str]]:
    """Write `stdin` to every process, then (returncode, stdout, stderr) of each once it exits."""
    for p in procs:
        with contextlib.suppress(BrokenPipeError):
            p.stdin.write(stdin)
            p.stdin.flush()
    outputs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def _gloo_pair(code: str, rendezvous: Path) -> list[tuple[int, str, str]]:
    """Run `code` as ranks 0 and 1 of a gloo group: (returncode, stdout, stderr) per rank."""
    return _finish(_spawn_gloo_pair(code, rendezvous))


def _one_process_on_the_whole_batch() -> list:
    single = subprocess.run([sys.executable, "-c", DDP_WORKER], capture_output=True, text=True,
                            env={**os.environ, "RANK": "0", "WORLD_SIZE": "1"}, check=True)
    return json.loads(single.stdout.strip().splitlines()[-1])


def _assert_matches_whole_batch(outs: list, whole: list) -> None:
    for r0, r1, w in zip(outs[0], outs[1], whole):
        assert r0 == r1  # both ranks end identical
        np.testing.assert_allclose(r0, w, rtol=1e-5, atol=1e-6)


def test_data_parallel_gloo_matches_one_process_on_the_whole_batch(tmp_path):
    ranks = _gloo_pair(DDP_WORKER, tmp_path / "rendezvous")
    for returncode, _, err in ranks:
        assert returncode == 0, err
    outs = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in ranks]
    _assert_matches_whole_batch(outs, _one_process_on_the_whole_batch())


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="starves threads the Linux way")
def test_data_parallel_gloo_never_aborts_at_exit_under_starved_gloo_threads(tmp_path):
    """Six 2-process runs, one after the other, that keep the group until the interpreter
    exits, with gloo's threads starved (one CPU per rank, nice 19) so that they let go of their
    last all-reduce late. If that is a tensor Python can see and the interpreter has begun to
    exit, the process aborts ("terminate called without an active exception"): with the
    all-reduced temporaries of the old `average_gradients`, about two processes in three did.
    All twelve start (import torch) at once; each run then goes when told. Every run must exit
    cleanly and match one process on the whole batch."""
    runs = 6
    pairs = [_spawn_gloo_pair(DDP_WORKER, tmp_path / f"rendezvous{i}", STARVE_GLOO="1")
             for i in range(runs)]
    whole = _one_process_on_the_whole_batch()
    results = []
    for pair in pairs:
        if all(p.stdout.readline() == "ready\n" for p in pair):
            results.append(_finish(pair, "go\n"))
        else:
            for p in pair:
                p.kill()
            results.append(_finish(pair))
    failed = [(i, rank, returncode, err[-300:]) for i, ranks in enumerate(results)
              for rank, (returncode, _, err) in enumerate(ranks) if returncode != 0]
    aborts = sum("terminate called" in err for *_, err in failed)
    assert not failed, f"{aborts} aborts, {len(failed)} failed processes of {2 * runs}: {failed}"
    for ranks in results:
        _assert_matches_whole_batch([json.loads(out.strip().splitlines()[-1])
                                     for _, out, _ in ranks], whole)


AVERAGE_WORKER = textwrap.dedent("""
    import json, os, weakref, torch, torch.distributed as dist
    import torch._dynamo  # before the group, as in DDP_WORKER
    import stepjit.torch
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method="file://" + os.environ["RENDEZVOUS"],
                            rank=rank, world_size=2)
    k = rank + 1.0  # the means are these with k = 1.5, exact in every dtype here
    grads = [(torch.arange(12.0).reshape(4, 3) * k).t(),  # transposed
             (torch.arange(24.0).reshape(4, 6) * k)[:, ::2],  # strided; shares a bucket
             torch.arange(40.0) * k,  # bigger than a bucket
             torch.arange(5.0, dtype=torch.float64) * k,
             (torch.arange(4.0).reshape(2, 2) * k).to(torch.bfloat16)]
    params = [torch.zeros(g.shape, dtype=g.dtype, requires_grad=True) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    strides = [g.stride() for g in grads]
    opt = stepjit.torch.SGD(params, lr=0.1, process_group=dist.group.WORLD,
                            bucket_cap_mb=100 / 2**20)
    handed, all_reduce = [], dist.all_reduce
    def recording_all_reduce(tensor, *args, **kwargs):
        handed.append(weakref.ref(tensor))
        return all_reduce(tensor, *args, **kwargs)
    dist.all_reduce = recording_all_reduce
    opt.average_gradients()
    dist.all_reduce = all_reduce
    held = [t() for t in handed]
    print(json.dumps({
        "means": [p.grad.double().tolist() for p in params],
        "same_tensors": all(p.grad is g for p, g in zip(params, grads)),
        "same_strides": [p.grad.stride() for p in params] == strides,
        "handed": len(handed),
        "alive": sum(t is not None for t in held),
        "released": sum(t is not None and t._use_count() == 1 for t in held),
        "grads_handed": sum(t is g for t in held for g in grads),
    }))
    del opt, held
    dist.destroy_process_group()
""")


def test_average_gradients_of_mixed_dtypes_and_layouts_in_place_never_leaving_gloo_a_tensor(
        tmp_path):
    """Transposed, strided and mixed-dtype gradients are averaged in place (same tensors, same
    strides). gloo is handed neither temporaries nor `.grad`s, only tensors that outlive the
    call, and on return it holds none of them: a tensor Python can see that gloo's thread lets
    go of after the interpreter began to exit aborts the process."""
    ranks = _gloo_pair(AVERAGE_WORKER, tmp_path / "rendezvous")
    for returncode, _, err in ranks:
        assert returncode == 0, err
    k = 1.5
    means = [(torch.arange(12.0).reshape(4, 3) * k).t(),
             (torch.arange(24.0).reshape(4, 6) * k)[:, ::2],
             torch.arange(40.0) * k,
             torch.arange(5.0, dtype=torch.float64) * k,
             (torch.arange(4.0).reshape(2, 2) * k).to(torch.bfloat16)]
    for _, out, _ in ranks:
        result = json.loads(out.strip().splitlines()[-1])
        assert result["means"] == [m.double().tolist() for m in means]
        assert result["same_tensors"] and result["same_strides"]
        # the buckets (two float32 gradients, the big one, 2 others), then the flags the ranks
        # agree on (which parameters have a gradient anywhere, which buckets changed)
        assert result["handed"] == 5
        assert result["alive"] == result["released"] == result["handed"]
        assert result["grads_handed"] == 0


def test_bucketing_splits_by_size_and_dtype():
    grads = [torch.zeros(10), torch.zeros(10), torch.zeros(10, dtype=torch.float64),
             torch.zeros(100)]
    buckets = stepjit.distributed.plan_buckets(grads, 100, world=1, shard=False)
    assert [len(b.params) for b in buckets] == [1, 1, 2]  # reverse order: as backward makes them


def test_gradients_are_not_kept_alive_by_the_launch_table(backend):
    """After set_to_none the old gradients are freed (backward can reuse their memory), and a
    new gradient at another address is picked up."""
    import gc
    import weakref

    if backend == "reference":
        pytest.skip("the interpreter works through numpy views, which hold their arrays")
    w = torch.zeros(1000, requires_grad=True)
    opt = stepjit.torch.SGD([w], lr=1.0, backend=backend)
    w.grad = torch.ones(1000)
    opt.step()
    old = weakref.ref(w.grad)
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert old() is None
    keep = torch.full((1000,), 5.0)  # occupies memory so the next gradient lands elsewhere
    w.grad = torch.full((1000,), 2.0)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((1000,), -3.0))
    del keep
