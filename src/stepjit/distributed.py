"""Data parallelism through torch.distributed: gradients reduced while backward runs, and
optimizer state sharded across ranks (ZeRO stages 1 and 2). Used by `stepjit.torch`'s faces
given a `process_group`; imports torch.

Buckets. The parameters, in reverse order (the order backward produces their gradients), are
grouped into buckets of at most `bucket_cap_mb` of one dtype and device (the first at most 1 MiB,
as DDP's, so that communication starts early in backward). Each bucket owns a flat
buffer laid out once. A hook on every parameter (`register_post_accumulate_grad_hook`) notes its
gradient; when every gradient of a bucket is there, the gradients are copied into the buffer and
its collective starts, asynchronously, while backward goes on. Buckets start in index order on
every rank, whatever order their gradients arrive in, so that the ranks' collectives match.
`finish()`, at the step, waits for what is in flight and runs what has not started (a parameter
without a gradient on this rank counts as zeros). A bucket whose gradients change after it
started (a second backward before the step, gradient accumulation) is reduced again then.

- Unsharded (`shard=False`): an all-reduce of the buffer; the means are copied back into the
  `.grad`s, which keep their identity and layout. Every rank then steps every parameter.
- Sharded (`shard=True`): each bucket's buffer is split into `world` equal shards, and rank r
  owns shard r. Parameters start at multiples of QUANT_BLOCK in the buffer (so a shard boundary
  never cuts an 8-bit state block of a parameter in two: codes and scales of a parameter's
  pieces join into the parameter's own), and a parameter may be split between ranks.
  `reduce_scatter` leaves rank r the summed gradient of its shard; its optimizer holds state
  for the pieces of parameters in its shards only (1/world of the state) and steps them with
  the same compiled kernel (`Shards.step`); `all_gather` of the updated shards then rebuilds
  every parameter on every rank.

Per-tensor clipping of a split tensor needs its whole norm: each rank sums the squares of its
pieces of each parameter (one vectorized pass per bucket), one all-reduce of those partial sums
gives every rank the norms, and the shard's gradients are scaled by `clip_norm / norm` where
the norm exceeds it before the kernel runs (without its own clipping). An update that reads
other whole-tensor norms (LARS's trust ratio) is sharded by whole tensors instead: no parameter
is split, each goes to the least loaded rank (`plan_buckets(whole=True)`), and the kernel
computes its norms as unsharded.

gloo is never handed a temporary nor a `.grad`: only buffers that outlive the collective, each
waited on and released before `finish()` returns (see `stepjit.torch.average_gradients`).
"""

from __future__ import annotations

import hashlib
import time
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .ir import QUANT_BLOCK, DType
from .runtime import arrays

# torch 2.13 renamed the flat collectives (the old names warn)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

ALIGN = QUANT_BLOCK
"""Where parameters start in a sharded bucket (elements): an 8-bit state block boundary."""


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor's elements in memory order."""
    return t.detach().as_strided((t.numel(),), (1,))


def wait_until_released(tensors: list, timeout: float = 5.0) -> None:
    """Sleep (GIL released) until nothing but their Python objects holds these CPU tensors.

    gloo's thread lets go of a completed collective, and so of its tensors, a little after the
    handle completes. CUDA tensors are not waited for: NCCL's watchdog thread lets go of its
    work only every so often. Without `Tensor._use_count` (torch < 2.3) this returns at once.
    """
    held = [t for t in tensors if t.device.type == "cpu" and hasattr(t, "_use_count")]
    delay, deadline = 1e-5, time.monotonic() + timeout
    while any(t._use_count() > 1 for t in held):
        if time.monotonic() > deadline:
            warnings.warn(f"the process group still holds gradient buffers {timeout} s after "
                          "their collective completed", RuntimeWarning, stacklevel=3)
            return
        time.sleep(delay)
        delay = min(2 * delay, 1e-3)


def check_same_parameters(params: list, group, what: str) -> None:
    """Raise ValueError on every rank unless every rank of `group` holds parameters of the same
    count, shapes and dtypes (one all-gather of a fingerprint: never a hang)."""
    text = ";".join(f"{tuple(p.shape)}:{p.dtype}" for p in params)
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
    mine = torch.tensor([len(params), sum(p.numel() for p in params), digest], dtype=torch.int64)
    world = dist.get_world_size(group)
    found = torch.empty(world * 3, dtype=torch.int64)
    _all_gather(found, mine, group=group)
    rows = found.view(world, 3).tolist()
    wait_until_released([found, mine])
    if any(r != rows[0] for r in rows):
        described = ", ".join(f"rank {r}: {n} parameters of {e} elements"
                              for r, (n, e, _) in enumerate(rows))
        raise ValueError(f"{what}: the ranks of the process group hold different parameters "
                         f"({described}; or shapes and dtypes differ): every rank must build the "
                         "same model and optimizer")


def _view(buffer: torch.Tensor, p, offset: int) -> torch.Tensor:
    """Parameter p's elements in a bucket buffer: in p's memory order for a dense p (a shard
    cuts it as memory lies), else in C order."""
    if arrays.is_dense(p):
        return buffer.as_strided(p.shape, p.stride(), offset)
    return buffer[offset : offset + p.numel()].view(p.shape)


@dataclass
class Bucket:
    """Parameters whose gradients are reduced together (see the module docstring)."""

    index: int  # its place in the order buckets start in
    params: list
    offsets: list[int]  # where each parameter's elements start in `flat`
    numel: int  # the flat buffer's length (sharded: world * shard)
    shard: int  # sharded: the elements of each rank's shard, else 0
    flat: torch.Tensor
    reduced: torch.Tensor | None = None  # sharded: this rank's summed gradient shard
    work: object | None = None  # the collective in flight
    ready: set = field(default_factory=set)  # parameters whose gradient is in (ids)
    stale: bool = False  # a gradient changed after the collective started


FIRST_BUCKET_BYTES = 1 << 20
"""The first bucket's cap (as DDP's): the last layers' gradients start communicating early."""


def plan_buckets(params: list, cap_bytes: int, world: int, shard: bool,
                 whole: bool = False) -> list[Bucket]:
    """Buckets of `params` (reverse order, one dtype and device each, at most `cap_bytes`, the
    first at most FIRST_BUCKET_BYTES; a bigger parameter alone), their flat buffers
    allocated. `whole` (sharded): no parameter is split; each goes to the least loaded rank,
    largest first, and each rank's shard is padded to the largest load."""
    groups: list[list] = []
    size = 0
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        last = groups[-1] if groups else None
        cap = min(cap_bytes, FIRST_BUCKET_BYTES) if len(groups) == 1 else cap_bytes
        if (last is None or last[0].dtype != p.dtype or last[0].device != p.device
                or size + nbytes > cap):
            groups.append([p])
            size = nbytes
        else:
            last.append(p)
            size += nbytes
    buckets = []
    for members in groups:
        if shard and whole:
            offsets, per_rank = _whole_layout(members, world)
            numel = per_rank * world
        else:
            offsets, at = [], 0
            for p in members:
                if shard:
                    at = -(-at // ALIGN) * ALIGN
                offsets.append(at)
                at += p.numel()
            if shard:
                per_rank = -(-at // (world * ALIGN)) * ALIGN
                numel = per_rank * world
            else:
                per_rank, numel = 0, at
        p0 = members[0]
        flat = torch.zeros(numel, dtype=p0.dtype, device=p0.device)
        reduced = torch.zeros(per_rank, dtype=p0.dtype, device=p0.device) if shard else None
        buckets.append(Bucket(len(buckets), members, offsets, numel, per_rank, flat, reduced))
    return buckets


def _whole_layout(members: list, world: int) -> tuple[list[int], int]:
    """(offset of each parameter, elements per rank) when parameters are not split: each to the
    least loaded rank (largest first; ties to the lower rank), at 256-element boundaries."""
    sizes = [-(-p.numel() // ALIGN) * ALIGN for p in members]
    loads = [0] * world
    where = [0] * len(members)
    at = [0] * len(members)
    for i in sorted(range(len(members)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        where[i], at[i] = r, loads[r]
        loads[r] += sizes[i]
    per_rank = max(max(loads), ALIGN)
    return [where[i] * per_rank + at[i] for i in range(len(members))], per_rank


def reads_norms(engine, groups: list[dict]) -> bool:
    """Whether a group's update reads whole-tensor norms besides clipping (LARS's trust
    ratio): sharded, such parameters are then kept whole, each on one rank."""
    for g in groups:  # (the dtypes do not change whether a rule reads norms)
        g = {**g, "clip_norm": 0.0}
        if engine.rule(engine.structure(g), DType.F32, DType.F32).reductions:
            return True
    return False


class Communicator:
    """The buckets of one optimizer, their hooks and collectives (see the module docstring)."""

    def __init__(self, params: list, group, cap_bytes: int, shard: bool,
                 whole: bool = False) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.shard = shard
        self.params = list(params)
        self.buckets = plan_buckets(self.params, cap_bytes, self.world, shard, whole)
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.next = 0  # the next bucket to start, in index order
        # each parameter's presence and each bucket's staleness, agreed on at the step (a
        # buffer of its own: gloo is never handed a temporary)
        self.flags = torch.zeros(len(self.params) + len(self.buckets))
        self.present: dict = {}
        me = weakref.ref(self)  # the parameters' hooks must not keep a dropped optimizer alive

        def hook(p) -> None:
            comm = me()
            if comm is not None:
                comm._gradient_ready(p)

        # (a parameter frozen now has no hook: its bucket starts at the step, should it be
        # unfrozen later)
        self.handles = [p.register_post_accumulate_grad_hook(hook) for p in self.params
                        if p.requires_grad]
        weakref.finalize(self, _remove, self.handles)  # and they go with it

    def remove_hooks(self) -> None:
        _remove(self.handles)

    # -- during backward --------------------------------------------------------------------
    def _gradient_ready(self, p) -> None:
        bucket = self.bucket_of.get(id(p))
        if bucket is None:
            return
        if bucket.index < self.next:
            bucket.stale = True  # started already: reduced again at the step
            return
        bucket.ready.add(id(p))
        while self.next < len(self.buckets):
            b = self.buckets[self.next]
            if len(b.ready) < len(b.params):
                break
            self._start(b)
            self.next += 1

    @torch.no_grad()
    def _start(self, b: Bucket) -> None:
        """Copy the bucket's gradients into its buffer and start its collective."""
        for p, offset in zip(b.params, b.offsets):
            view = _view(b.flat, p, offset)
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad)
        if self.shard:
            b.work = _reduce_scatter(b.reduced, b.flat, op=dist.ReduceOp.SUM, group=self.group,
                                     async_op=True)
        else:
            b.work = dist.all_reduce(b.flat, op=dist.ReduceOp.SUM, group=self.group,
                                     async_op=True)

    # -- at the step ------------------------------------------------------------------------
    @torch.no_grad()
    def finish(self) -> None:
        """Every bucket reduced (the means: divided by the world size): unsharded, copied back
        into the `.grad`s (a parameter without one on this rank but with one on another gets
        the mean); sharded, in each bucket's `reduced` shard. Returns, per parameter, whether
        any rank had its gradient (`present`).

        The ranks agree on what to run: buckets that never started, in index order, then one
        all-reduce of each parameter's presence and each bucket's staleness (its gradients
        changed after it started, on some rank: accumulation), then the stale ones again, on
        every rank."""
        work = None
        for b in self.buckets:  # what is in flight: waited on (a handle holds its tensors)
            if b.work is not None:
                work, b.work = b.work, None
                work.wait()
        for b in self.buckets[self.next :]:  # in index order on every rank
            self._start(b)
            work, b.work = b.work, None
            work.wait()
        flags = self.flags
        flags.copy_(torch.tensor([float(p.grad is not None) for p in self.params]
                                 + [float(b.stale) for b in self.buckets]))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        self.present = {id(p): bool(v) for p, v in zip(self.params, flags.tolist())}
        for b, stale in zip(self.buckets, flags[len(self.params):].tolist()):
            if stale:  # on some rank: every rank reduces it again, from its gradients now
                self._start(b)
                work, b.work = b.work, None
                work.wait()
        work = None  # a completed handle still holds its tensors
        buffers = [flags]
        for b in self.buckets:
            if self.shard:
                b.reduced.div_(self.world)
                buffers.append(b.reduced)
            else:
                b.flat.div_(self.world)
                for p, offset in zip(b.params, b.offsets):
                    if p.grad is None and self.present[id(p)]:
                        p.grad = torch.empty_like(p)
                    if p.grad is not None:
                        p.grad.copy_(_view(b.flat, p, offset))
            buffers.append(b.flat)
            b.ready.clear()
            b.stale = False
        self.next = 0
        wait_until_released(buffers)


def _remove(handles: list) -> None:
    while handles:
        handles.pop().remove()


@dataclass
class Piece:
    """The part of one parameter in this rank's shard of a bucket: elements [start, stop) of
    the parameter (memory order) at `at` in the shard."""

    param: object
    index: int  # the parameter's position in the optimizer (its state_dict index)
    start: int
    stop: int
    at: int
    bucket: int


def pieces_of(buckets: list[Bucket], rank: int, index: dict) -> list[Piece]:
    """This rank's pieces, bucket by bucket, in shard order."""
    found = []
    for k, b in enumerate(buckets):
        lo, hi = rank * b.shard, (rank + 1) * b.shard
        for p, offset in zip(b.params, b.offsets):
            a, z = max(lo, offset), min(hi, offset + p.numel())
            if a < z:
                found.append(Piece(p, index[id(p)], a - offset, z - offset, a - lo, k))
    return found


class Shards:
    """This rank's share of a sharded optimizer: the pieces of parameters in its shards, their
    state, and the stepjit optimizer (`engine`) that steps them with the face's kernels."""

    def __init__(self, comm: Communicator, groups: list[dict], engine: type, *, backend,
                 storage) -> None:
        self.comm = comm
        params = [p for g in groups for p in g["params"]]
        self.index = {id(p): i for i, p in enumerate(params)}
        self.pieces = pieces_of(comm.buckets, comm.rank, self.index)
        self.state: dict = {}
        self._views()
        self.lists = [[t for piece, t in zip(self.pieces, self.tensors)
                       if any(piece.param is p for p in g["params"])] for g in groups]
        self.engine = engine.over(self._groups(groups), self.state, backend=backend,
                                  step_count=torch.from_numpy, storage=storage)
        split = any(p.stop - p.start < p.param.numel() for p in self.pieces)
        if split and reads_norms(self.engine, self._groups(groups)):
            raise ValueError(f"{engine.__name__}: this update reads whole-tensor norms, which "
                             "a rank holding part of a tensor does not have: shard with "
                             "whole tensors (`Communicator(whole=True)`)")
        # the pieces' segment of each shard element, for clipping: parameter index, else -1
        self.segments = []
        for k, b in enumerate(comm.buckets):
            seg = torch.full((b.shard,), len(params), dtype=torch.int64, device=b.flat.device)
            for piece in self.pieces:
                if piece.bucket == k:
                    seg[piece.at : piece.at + piece.stop - piece.start] = piece.index
            self.segments.append(seg)
        self.count = len(params)
        self.sums = torch.zeros(self.count + 1, dtype=torch.float64)  # clipping's, all-reduced

    def _views(self) -> None:
        """Views of the parameters' memory: each piece (the tensors the engine steps), each
        shard's send buffer and each parameter in its bucket's buffer (for the all-gather)."""
        self.addresses = [p.data_ptr() for b in self.comm.buckets for p in b.params]
        self.tensors = [_flat(piece.param)[piece.start : piece.stop] for piece in self.pieces]
        self.grads = [self.comm.buckets[piece.bucket].reduced[
            piece.at : piece.at + piece.stop - piece.start].detach() for piece in self.pieces]
        self.send = [torch.zeros(b.shard, dtype=b.flat.dtype, device=b.flat.device)
                     for b in self.comm.buckets]
        self.send_views = [self.send[piece.bucket][piece.at : piece.at + piece.stop - piece.start]
                           .detach() for piece in self.pieces]
        self.param_views = [p.detach() for b in self.comm.buckets for p in b.params]
        self.gathered_views = [b.flat.as_strided(p.shape, p.stride(), offset).detach()
                               for b in self.comm.buckets for p, offset in zip(b.params,
                                                                               b.offsets)]

    def _groups(self, groups: list[dict]) -> list[dict]:
        return [{**g, "params": lst} for g, lst in zip(groups, self.lists)]

    @torch.no_grad()
    def step(self, groups: list[dict], grad_scale: float) -> None:
        """Step the pieces (their gradients: the reduced shards), then all-gather the updated
        shards into every parameter."""
        if [p.data_ptr() for b in self.comm.buckets for p in b.params] != self.addresses:
            old = dict(zip(map(id, self.tensors), self.tensors))
            self._views()  # a `.data` was replaced: the same pieces, new views
            self.state = {new: self.state.pop(old_t) for old_t, new in zip(old.values(),
                                                                            self.tensors)
                          if old_t in self.state}
            self.lists = [[self.tensors[j] for j, piece in enumerate(self.pieces)
                           if any(piece.param is p for p in g["params"])] for g in groups]
        present = self.comm.present
        for piece, t, g in zip(self.pieces, self.tensors, self.grads):
            t.grad = g if present[id(piece.param)] else None  # some rank had a gradient
        inner = self._groups(groups)
        if any(g.get("clip_norm", 0) for g in groups):
            self._clip(groups, grad_scale)
            inner = [{**g, "clip_norm": 0.0} for g in inner]
        self.engine.share(inner, self.state)
        self.engine.step(grad_scale=grad_scale)
        if self.send_views:
            torch._foreach_copy_(self.send_views, self.tensors)
        for b, send in zip(self.comm.buckets, self.send):
            _all_gather(b.flat, send, group=self.comm.group)
        torch._foreach_copy_(self.param_views, self.gathered_views)
        wait_until_released([b.flat for b in self.comm.buckets] + self.send)

    def _clip(self, groups: list[dict], grad_scale: float) -> None:
        """Scale each shard's gradients by clip_norm / ||scale * g / grad_scale|| of their
        whole tensor where that norm exceeds clip_norm: partial sums of squares, one
        all-reduce (the kernel divides by `grad_scale`, a loss scale, as it reads them)."""
        sums = self.sums.zero_()
        for b, seg in zip(self.comm.buckets, self.segments):
            g = b.reduced.double()
            sums.index_add_(0, seg.cpu(), (g * g).cpu())
        dist.all_reduce(sums, group=self.comm.group)
        limit = torch.zeros(self.count + 1, dtype=torch.float64)
        scale = torch.ones(self.count + 1, dtype=torch.float64)
        at = 0
        for g in groups:
            n = len(g["params"])
            limit[at : at + n] = float(g.get("clip_norm", 0.0))
            scale[at : at + n] = abs(float(g.get("scale", 1.0))) / grad_scale
            at += n
        norm = scale * sums.sqrt()
        factor = torch.where((limit > 0) & (norm > limit), limit / norm, 1.0)
        factor[-1] = 1.0
        for b, seg in zip(self.comm.buckets, self.segments):
            b.reduced.mul_(factor.to(b.reduced.device)[seg].to(b.reduced.dtype))
        wait_until_released([sums])

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (step counts aside)."""
        return sum(v.numel() * v.element_size() for st in self.state.values()
                   for k, v in st.items() if k != "step" and isinstance(v, torch.Tensor))

    # -- checkpoints ----------------------------------------------------------------------------
    @torch.no_grad()
    def consolidate(self, to: int) -> dict | None:
        """Every parameter's whole state on rank `to` ({param: {name: tensor}}), None on the
        others: each bucket's shards of each state buffer gathered there."""
        group, rank = self.comm.group, self.comm.rank
        mine = {}  # (bucket, state name) -> (dtype, per block): a bucket holds one dtype
        for piece, t in zip(self.pieces, self.tensors):
            for name, v in self.state.get(t, {}).items():
                if name != "step":
                    mine[(piece.bucket, name)] = (str(v.dtype), name.endswith("_absmax")
                                                  and name[:-7] in self.state[t])
        present = sorted({(piece.index, name) for piece, t in zip(self.pieces, self.tensors)
                          for name in self.state.get(t, {})})
        meta = [None] * self.comm.world
        dist.all_gather_object(meta, (mine, present), group=group)
        kinds = {name: kind for m, _ in meta for name, kind in m.items()}
        has = {pair for _, pairs in meta for pair in pairs}
        steps = torch.zeros(self.count, dtype=torch.float64)
        for piece, t in zip(self.pieces, self.tensors):
            if "step" in self.state.get(t, {}):
                steps[piece.index] = float(self.state[t]["step"])
        dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=group)
        handed = [steps]  # released by gloo before they go
        params = [p for b in self.comm.buckets for p in b.params]
        full: dict = {p: {} for p in params}
        for k, b in enumerate(self.comm.buckets):
            for bucket, name in sorted(kinds):
                if bucket != k:
                    continue
                dtype_name, per_block = kinds[(bucket, name)]
                dtype = getattr(torch, dtype_name.rsplit(".", 1)[-1])
                unit = ALIGN if per_block else 1
                send = torch.zeros(b.shard // unit, dtype=dtype, device=b.flat.device)
                for piece, t in zip(self.pieces, self.tensors):
                    v = self.state.get(t, {}).get(name)
                    if piece.bucket == k and v is not None:
                        send[piece.at // unit : piece.at // unit + v.numel()].copy_(_flat(v))
                out = [torch.empty_like(send) for _ in range(self.comm.world)] if rank == to \
                    else None
                dist.gather(send, out, dst=dist.get_global_rank(group, to)
                            if group is not None else to, group=group)
                handed += [send, *(out or [])]
                if rank != to:
                    continue
                whole = torch.cat(out)
                for p, offset in zip(b.params, b.offsets):
                    if (self.index[id(p)], name) not in has:
                        continue
                    n = -(-p.numel() // unit)
                    values = whole[offset // unit : offset // unit + n]
                    if per_block:
                        full[p][name] = values.clone()
                    else:
                        buf = torch.empty_like(p, dtype=dtype)
                        _flat(buf).copy_(values)
                        full[p][name] = buf
        wait_until_released(handed)
        if rank != to:
            return None
        for p in params:
            if (self.index[id(p)], "step") in has:
                full[p]["step"] = torch.tensor(float(steps[self.index[id(p)]]),
                                               dtype=torch.float32)
        return {p: st for p, st in full.items() if st}

    def load(self, state: dict) -> None:
        """Keep this rank's pieces of whole per-parameter state (`state`: {param: {name:
        tensor}}, as torch's load_state_dict leaves it)."""
        new = {}
        for piece, t in zip(self.pieces, self.tensors):
            found = {}
            for name, v in state.get(piece.param, {}).items():
                if name == "step" or not isinstance(v, torch.Tensor):
                    found[name] = v.clone() if isinstance(v, torch.Tensor) else v
                elif name.endswith("_absmax") and name[:-7] in state[piece.param]:
                    lo = piece.start // ALIGN
                    found[name] = v.reshape(-1)[lo : -(-piece.stop // ALIGN)].clone()
                else:
                    found[name] = _flat(v)[piece.start : piece.stop].clone()
            if found:
                new[t] = found
        self.state = new
