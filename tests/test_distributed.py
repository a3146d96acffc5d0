"""Data parallelism over gloo on loopback: buckets reduced during backward, and sharded state.

Real processes, one per rank, rendezvous through a file. Each launch runs a list of scenarios
one after the other in the same processes (a fresh model and optimizer each), so that torch is
imported and the kernels compiled once per launch: one process alone (the references, on the
whole batch), then 2 ranks, then 3 (uneven partitions), each rank training on its part of every
batch. Ranks must end with identical parameters, equal to one process on the whole batch within
float tolerance (rtol 1e-5: the ranks sum their gradients in another order than one process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

WORKER = textwrap.dedent("""
    import json, os, sys, warnings, torch, torch.distributed as dist
    import torch._dynamo  # imported before the group, as torch.optim does on first use
    import stepjit.torch as st
    # a buffer gloo still holds after its collective: every step would wait seconds for it
    warnings.filterwarnings("error", message="the process group still holds")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method="file://" + os.environ["RENDEZVOUS"],
                            rank=rank, world_size=world)
    torch.set_num_threads(1)

    def scenario(kind, shard=False, group=True, steps=4, first=0, wide=False, load=None,
                 save=None, again=False, branch=False, accum=1, virtual=1, unfreeze=False,
                 scaler=False, f64=False, gaps=False):
        torch.manual_seed(0)
        width = 1500 if wide else 45  # 48K parameters, or 1442
        model = torch.nn.Sequential(torch.nn.Linear(7, width), torch.nn.Tanh(),
                                    torch.nn.Linear(width, 23), torch.nn.Tanh(),
                                    torch.nn.Linear(23, 1))
        if branch:  # a head only some ranks use, in some micro-batches (see `used`)
            model.append(torch.nn.Linear(1, 1))
        if f64:
            model[4].double()
        if gaps:  # a weight with gaps in memory: torch's own update runs, on the means
            w = model[2].weight.detach()
            holder = torch.zeros(w.shape[0], 2 * w.shape[1])
            holder[:, ::2] = w
            model[2].weight = torch.nn.Parameter(holder[:, ::2])
        if unfreeze:  # frozen when the optimizer is made, trained from the second step
            model[0].requires_grad_(False)
        options = dict(process_group=dist.group.WORLD if group else None, shard_state=shard,
                       bucket_cap_mb=(40000 if wide else 1200) / 2**20)
        if kind == "sgd":
            opt = st.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3,
                         **options)
        elif kind == "clip":
            opt = st.SGD(model.parameters(), lr=0.05, momentum=0.9, clip_norm=0.05, **options)
        elif kind == "lars":
            opt = st.LARS(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3,
                          **options)
        else:
            opt = st.AdamW(model.parameters(), lr=0.01, weight_decay=0.01,
                           state_dtype="int8" if kind == "adamw8" else None, **options)
        left = None
        if again:  # an optimizer over the same model, used once and dropped: its hooks go too
            import gc, weakref
            other = type(opt)(model.parameters(), **{k: v for k, v in opt.defaults.items()
                                                    if k in ("lr", "weight_decay")}, **options)
            model(torch.ones(2, 7)).sum().backward()  # its hooks start collectives
            other.step()
            dropped = weakref.ref(other._comm)
            del other
            gc.collect()
            left = {"communicator": dropped() is not None,
                    "hooks": sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
                                 for p in model.parameters())}
        if load:
            saved = torch.load(load)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
        parts = world if group else virtual  # one process may stand in for several ranks
        mine = [rank] if group else range(virtual)
        amp = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaler else None
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(12, 7, generator=g), torch.randn(12, 1, generator=g))
                   for _ in range(first + steps)]
        for step, (x, y) in enumerate(batches[first:]):
            if unfreeze and step == 1:
                model[0].requires_grad_(True)
            opt.zero_grad()
            for m in range(accum):  # micro-batches: several backward passes, one step
                loss = 0.0
                for v in mine:
                    xs, ys = x[v * 12 // parts : (v + 1) * 12 // parts], y[
                        v * 12 // parts : (v + 1) * 12 // parts]
                    half = slice(m * len(xs) // accum, (m + 1) * len(xs) // accum)
                    h = model[:4](xs[half])
                    out = model[4](h.to(model[4].weight.dtype))
                    used = v == parts - 1 or (m == accum - 1 and v == 0)
                    if branch and used:
                        out = model[5](out)
                    loss = loss + torch.nn.functional.mse_loss(
                        out.float(), ys[half]) / accum / len(mine)
                (amp.scale(loss) if amp else loss).backward()
            if amp:
                amp.step(opt)
                amp.update()
            else:
                opt.step()
        if save:
            if shard:
                opt.consolidate_state_dict(to=0)
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, save)
        return {"params": [p.detach().flatten().tolist() for p in model.parameters()],
                "state_bytes": opt.state_bytes(), "left": left}

    def refusals():
        said = {}
        w = torch.nn.Parameter(torch.ones(300))
        group = dist.group.WORLD
        for what, attempt in [
                ("accumulate_grad", lambda: st.SGD([w], lr=0.1, process_group=group
                                                   ).accumulate_grad()),
                ("state_dict", lambda: st.AdamW([w], process_group=group,
                                                shard_state=True).state_dict()),
                ("add_param_group", lambda: st.AdamW([w], process_group=group, shard_state=True
                                                     ).add_param_group({"params": [
                                                         torch.nn.Parameter(torch.ones(2))]}))]:
            try:
                attempt()
                said[what] = "accepted"
            except (ValueError, RuntimeError) as exc:
                said[what] = str(exc)
        return said

    results = {}
    for name, args in json.loads(os.environ["SCENARIOS"]).items():
        results[name] = refusals() if name == "refusals" else scenario(**args)
        dist.barrier()  # a checkpoint is written before the next scenario reads it
    print(json.dumps(results))
    dist.destroy_process_group()
""")


def _launch(world: int, workdir, scenarios: dict) -> list[dict]:
    """Run `scenarios` (name -> arguments of the worker's `scenario`) on `world` ranks: each
    rank's results by name."""
    env = {**os.environ, "WORLD_SIZE": str(world), "GLOO_SOCKET_IFNAME": "lo",
           "RENDEZVOUS": str(workdir / f"rendezvous-{world}-{len(scenarios)}"),
           "OMP_NUM_THREADS": "1", "SCENARIOS": json.dumps(scenarios)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario's results: runs[world][name] is the list of ranks' results."""
    work = tmp_path_factory.mktemp("distributed")
    saved = {k: str(work / f"{k}.pt") for k in ("adamw", "adamw8")}
    one = {f"whole-{k}": dict(kind=k, group=False) for k in ("sgd", "clip", "adamw", "adamw8")}
    one |= {"whole-adamw-5": dict(kind="adamw", group=False, steps=5),
            "full-adamw-wide": dict(kind="adamw", group=False, steps=1, wide=True),
            "full-adamw8-wide": dict(kind="adamw8", group=False, steps=1, wide=True),
            "alone-adamw": dict(kind="adamw", shard=True),  # a group of one process
            "refusals": {},
            "whole-branch": dict(kind="adamw", group=False, branch=True, accum=2, virtual=2),
            "whole-unfreeze": dict(kind="adamw", group=False, unfreeze=True),
            "whole-scaler": dict(kind="clip", group=False, scaler=True),
            "whole-gaps": dict(kind="adamw", group=False, gaps=True),
            "whole-lars": dict(kind="lars", group=False)}
    two = {f"sharded-{k}": dict(kind=k, shard=True) for k in ("sgd", "clip", "adamw", "adamw8")}
    two |= {f"unsharded-{k}": dict(kind=k) for k in ("sgd", "clip", "adamw")}
    two |= {f"{mode}-{case}": dict(kind=kind, shard=mode == "sharded", **more)
            for mode in ("sharded", "unsharded")
            for case, kind, more in [("branch", "adamw", dict(branch=True, accum=2)),
                                     ("unfreeze", "adamw", dict(unfreeze=True)),
                                     ("scaler", "clip", dict(scaler=True))]}
    two |= {"unsharded-gaps": dict(kind="adamw", gaps=True)}
    two |= {"f64-adamw": dict(kind="adamw", shard=True, steps=2, f64=True,
                              save=str(work / "f64.pt"))}
    two |= {"shares-adamw": dict(kind="adamw", shard=True, steps=1, wide=True),
            "again-adamw": dict(kind="adamw", shard=True, again=True)}
    two |= {f"save-{k}": dict(kind=k, shard=True, steps=3, save=path)
            for k, path in saved.items()}
    two |= {"sharded-lars": dict(kind="lars", shard=True)}
    three = {f"sharded-{k}": dict(kind=k, shard=True) for k in ("clip", "adamw", "lars")}
    three |= {"shares-adamw8": dict(kind="adamw8", shard=True, steps=1, wide=True),
              "resume-adamw": dict(kind="adamw", shard=True, first=3, steps=2,
                                   load=saved["adamw"]),
              "reload-adamw8": dict(kind="adamw8", shard=True, steps=0, load=saved["adamw8"],
                                    save=str(work / "again.pt"))}
    found = {}
    for world, scenarios in ((1, one), (2, two), (3, three)):
        ranks = _launch(world, work, scenarios)
        found[world] = {name: [r[name] for r in ranks] for name in scenarios}
    found["files"] = {**saved, "again": str(work / "again.pt"), "f64": str(work / "f64.pt")}
    return found


def _same_everywhere_and_close(ranks: list[dict], whole: dict, rtol=1e-5, atol=1e-6) -> None:
    for r in ranks[1:]:
        assert r["params"] == ranks[0]["params"]  # every rank ends identical
    for got, want in zip(ranks[0]["params"], whole["params"], strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize(("world", "kind"), [(2, "sgd"), (2, "clip"), (3, "clip"),
                                             (2, "adamw"), (3, "adamw"), (2, "lars"),
                                             (3, "lars")])
def test_sharded_state_follows_one_process_on_the_whole_batch(runs, world, kind):
    whole = runs[1][f"whole-{kind}"][0]
    _same_everywhere_and_close(runs[world][f"sharded-{kind}"], whole)
    if world == 2 and kind != "lars":  # unsharded: buckets all-reduced during backward
        _same_everywhere_and_close(runs[2][f"unsharded-{kind}"], whole)


@pytest.mark.parametrize(("world", "kind"), [(2, "adamw"), (3, "adamw8")])
def test_each_rank_holds_its_share_of_the_state(runs, world, kind):
    # 48K parameters in 4 buckets: each shard is whole 256-element blocks, and each parameter
    # starts a block, so a rank may hold a few blocks more than 1/world
    full = runs[1][f"full-{kind}-wide"][0]["state_bytes"]
    shares = [r["state_bytes"] / full for r in runs[world][f"shares-{kind}"]]
    assert sum(shares) >= 1 and max(shares) <= 1.06 / world, shares


def test_sharded_int8_state_trains_as_one_process_with_int8_state_does(runs):
    full, single = runs[1]["whole-adamw"][0], runs[1]["whole-adamw8"][0]
    ranks = runs[2]["sharded-adamw8"]
    for r in ranks[1:]:
        assert r["params"] == ranks[0]["params"]

    def distance(run):
        return max(float(np.max(np.abs(np.subtract(a, b))))
                   for a, b in zip(run["params"], full["params"]))

    # the ranks draw other rounding streams than one process: as far from float32 state as
    # one process with int8 state is (4 steps of lr 0.01: a few thousandths), not equal to it
    assert 0 < distance(single) < 0.01 and distance(ranks[0]) < 2 * distance(single)


def test_a_checkpoint_saved_at_two_ranks_resumes_at_three(runs):
    saved = torch.load(runs["files"]["adamw"])["optimizer"]
    assert set(saved["state"]) == set(range(6)) and saved["state"][0]["exp_avg"].shape == (45, 7)
    # the ordinary state dict: 3 ranks continue as one process does, and torch's AdamW loads it
    _same_everywhere_and_close(runs[3]["resume-adamw"], runs[1]["whole-adamw-5"][0])
    torch_opt = torch.optim.AdamW(torch.nn.Linear(7, 45).parameters())
    torch_opt.load_state_dict({"state": {0: saved["state"][0], 1: saved["state"][1]},
                               "param_groups": [{**saved["param_groups"][0], "params": [0, 1]}]})


def test_int8_state_saved_at_two_ranks_comes_back_bit_for_bit_at_three(runs):
    saved = torch.load(runs["files"]["adamw8"])["optimizer"]["state"]
    codes = saved[0]["exp_avg"]
    assert codes.dtype == torch.int8 and codes.shape == (45, 7)
    assert saved[0]["exp_avg_absmax"].shape == (-(-315 // 256),)
    resaved = torch.load(runs["files"]["again"])["optimizer"]["state"]  # loaded at 3, gathered
    for i, buffers in saved.items():
        assert resaved[i].keys() == buffers.keys()
        for name, value in buffers.items():
            assert torch.equal(resaved[i][name], value), (i, name)


def test_a_dropped_optimizer_leaves_no_hooks_behind(runs):
    # an optimizer over the same model, stepped once and dropped: its communicator is freed and
    # the parameters keep only the hooks of the optimizer made next (one each)
    for rank in runs[2]["again-adamw"]:
        assert rank["left"] == {"communicator": False, "hooks": 6}


@pytest.mark.parametrize("case", ["branch", "unfreeze", "scaler"])
def test_what_real_training_loops_do(runs, case):
    """A head that one rank uses in both micro-batches and the other in the second only
    (gradient accumulation, parameters used unevenly: the ranks must agree on what to reduce
    and step), a layer unfrozen after the optimizer was made, GradScaler with clipping."""
    whole = runs[1][f"whole-{case}"][0]
    for mode in ("sharded", "unsharded"):
        _same_everywhere_and_close(runs[2][f"{mode}-{case}"], whole)


def test_a_parameter_with_gaps_is_averaged_before_torchs_own_update(runs):
    _same_everywhere_and_close(runs[2]["unsharded-gaps"], runs[1]["whole-gaps"][0])


def test_consolidated_state_keeps_each_parameter_dtype(runs):
    saved = torch.load(runs["files"]["f64"])["optimizer"]["state"]
    assert saved[4]["exp_avg"].dtype == torch.float64  # the float64 layer's
    assert saved[0]["exp_avg"].dtype == torch.float32


def test_a_group_of_one_process_works_sharded(runs):
    _same_everywhere_and_close(runs[1]["alone-adamw"], runs[1]["whole-adamw"][0])


MISMATCH = textwrap.dedent("""
    import os, torch, torch.distributed as dist
    import stepjit.torch as st
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method="file://" + os.environ["RENDEZVOUS"],
                            rank=rank, world_size=2)
    model = torch.nn.Linear(4, 3 + rank)  # rank 1 built another model
    try:
        st.AdamW(model.parameters(), process_group=dist.group.WORLD, shard_state=True)
    except ValueError as exc:
        print("refused:", exc)
    dist.destroy_process_group()
""")


def test_ranks_with_different_parameters_are_refused_on_every_rank(tmp_path):
    env = {**os.environ, "RENDEZVOUS": str(tmp_path / "rendezvous"), "GLOO_SOCKET_IFNAME": "lo"}
    procs = [subprocess.Popen([sys.executable, "-c", MISMATCH], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        assert "refused:" in out and "hold different parameters" in out
        assert "rank 0: 2 parameters of 15 elements, rank 1: 2 parameters of 20" in out


def test_shard_state_without_a_process_group_is_refused():
    import stepjit.torch as st

    with pytest.raises(ValueError, match="shard_state=True .* pass process_group="):
        st.AdamW([torch.nn.Parameter(torch.ones(3))], shard_state=True)
    with pytest.raises(TypeError, match="shard_state must be a bool"):
        st.AdamW([torch.nn.Parameter(torch.ones(3))], shard_state="yes")


def test_lars_keeps_each_tensor_whole_on_one_rank(runs):
    # its trust ratio reads whole-tensor norms: sharded, no tensor is split (checked by the
    # optimizer itself), and the ranks step as one process does (test above); the largest
    # tensor (45 x 23) alone exceeds half the model, so one rank holds more than half
    whole, ranks = runs[1]["whole-lars"][0], runs[2]["sharded-lars"]
    _same_everywhere_and_close(ranks, whole)
    assert sum(r["state_bytes"] for r in ranks) == sum(4 * n for n in
                                                       (315, 45, 1035, 23, 23, 1))


def test_a_sharded_optimizer_refuses_what_it_cannot_do(runs):
    said = runs[1]["refusals"][0]
    assert "call consolidate_state_dict(to=rank) on every rank" in said["state_dict"]
    assert "partitions its parameters once" in said["add_param_group"]
    assert "accumulate by running backward several times" in said["accumulate_grad"]
