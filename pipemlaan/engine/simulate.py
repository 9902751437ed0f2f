"""Replays every rank's action list (engine/schedule.py) under a model of the transports, to
prove that a schedule cannot deadlock and that every message finds its partner.

Pure Python, no torch: `simulate(programs, groups, rules)` takes each rank's ordered actions and
the process groups (name -> member global ranks), runs them to a fixed point and returns a
`SimResult`: whether every rank ran to the end of its list with every posted operation complete
and no protocol error, the chain of waiting if it got stuck, and the protocol errors.
`simulate_run(spec, events, eval_batches)` builds the programs of a whole run from a `PipeSpec`.
tests/test_schedule.py runs it over the supported pipeline shapes; tests/test_simulate.py tests
the simulator itself on small hand-written programs.

Matching (both rules): messages travel on (group, src, dst) channels; the n-th send from A to B
on group G matches the n-th receive on B from A on G. A matched pair whose `Msg`s differ is a
protocol error (a mismatch); the pair is still treated as matched so the replay goes on.

Rules "nccl":
- every process group is its own communicator, and on it each rank has one in-order stream;
- `Post(ops)` enqueues ONE kernel holding all its ops (a `batch_isend_irecv` group progresses as
  one unit) on the stream of the ops' group (a Post mixing groups is an error; it is then split
  into one kernel per group);
- `Collective(group, name)`, and a `Compute` with `collective=G`, enqueue one collective kernel
  on the group's stream and the host blocks until it completes; `StartCollective` enqueues it
  without blocking, and the matching `WaitCollective` blocks until it completes;
- only the head kernel of a stream is active; an op of an active kernel completes when its
  matching op is in an active kernel too (both complete together); a kernel leaves the stream
  when all its ops completed, and the next one becomes active; a collective kernel completes
  when it is the active head on every member's stream;
- `Wait(op)` blocks the host (nothing later of that rank runs) until the op completes;
  `Compute` without a collective runs instantly.
Rules "gloo": sends are buffered (a send completes when posted), a receive completes once its
matching send has been posted, there is no ordering between ops, and a collective completes when
every member has reached it (the host blocks until then; a `StartCollective` arrives without
blocking, its `WaitCollective` blocks until every member has arrived).

Checks (protocol errors, in `SimResult.errors`): mismatched pairs; an op never matched (or, under
nccl, never completed) at the end; a `Compute` consuming a message whose receive this rank has
not yet waited for (posting a receive again, as each evaluation pass does, needs a new wait);
a send of a message no earlier `Compute` of this rank produced (each production covers one
send); the members of a group calling different collectives at the same position of their
collective sequence on it; a `Wait` on an op this rank never posted; an op posted again while
the same op of this rank is still outstanding; ops on unknown groups, by non-members, or naming
another rank as their own side.

Deadlock: when nothing can move and some rank has not finished its list, the report follows the
wait-for relation from the lowest blocked rank: the item a rank's host waits for (under nccl, if
its kernel is not at the head of its stream, the head's first incomplete item instead), then the
rank owning the partner op (or the first member missing from a collective): into the partner op
if it was posted, else into that rank's own host wait, until an item repeats (a cycle) or a rank
that has finished its list without posting the partner ends the chain (peer None).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pipemlaan.engine.schedule import (Action, Collective, Compute, Op, Post, RankSchedule,
                                       StartCollective, Wait, WaitCollective, process_groups,
                                       program)

RULES = ("nccl", "gloo")


@dataclass
class SimResult:
    """`ok`: every rank ran to the end of its list, every posted op completed, no errors.
    `deadlock`: the cycle (or chain) of waiting, as (rank, what it is stuck on, peer rank it
    waits for), or None. `positions`: each rank's (actions run, actions in all)."""
    ok: bool
    deadlock: list[tuple[int, str, int | None]] | None
    errors: list[str]
    rules: str = "nccl"
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)

    def describe(self, max_errors: int = 20) -> str:
        parts = []
        where = ", ".join(f"rank {r} {a}/{n}" for r, (a, n) in sorted(self.positions.items()))
        if self.ok:
            parts.append(f"ok under {self.rules}: every rank ran its list to the end ({where}); "
                         "every op matched and completed.")
        elif self.deadlock:
            steps = []
            for rank, what, peer in self.deadlock:
                if peer is None:            # the end of a chain: `what` is a whole predicate
                    steps.append(f"rank {rank} {what}")
                else:
                    steps.append(f"rank {rank} is stuck on {what}, waiting for rank {peer}")
            first, last = self.deadlock[0], self.deadlock[-1]
            closes = last[2] == first[0] and last[2] is not None
            kind = "cycle" if closes else "chain"
            parts.append(f"DEADLOCK under {self.rules} ({kind} of {len(self.deadlock)}): "
                         + "; ".join(steps)
                         + (f" (back to rank {first[0]})." if closes else ".")
                         + f" Progress: {where}.")
        else:
            parts.append(f"not ok under {self.rules} ({where}).")
        if self.errors:
            shown = self.errors[:max_errors]
            more = len(self.errors) - len(shown)
            parts.append(f"{len(self.errors)} error(s): " + "; ".join(shown)
                         + (f"; ... and {more} more." if more else "."))
        return " ".join(parts)

    def __str__(self) -> str:
        return self.describe()


# ---- the simulator's state -------------------------------------------------------------------
class _OpState:
    __slots__ = ("rank", "op", "key", "seq", "kernel", "active", "done", "partner")

    def __init__(self, rank: int, op: Op, key: tuple, seq: int):
        self.rank, self.op, self.key, self.seq = rank, op, key, seq
        self.kernel: _Kernel | None = None
        self.active = False
        self.done = False
        self.partner: _OpState | None = None

    def __str__(self) -> str:
        return str(self.op)


class _Coll:
    """One collective call of a group: the n-th of every member on that group."""
    __slots__ = ("group", "seq", "members", "names", "kernels", "reached", "done", "mismatch")

    def __init__(self, group: str, seq: int, members: tuple[int, ...]):
        self.group, self.seq, self.members = group, seq, members
        self.names: dict[int, str] = {}
        self.kernels: dict[int, _Kernel] = {}
        self.reached: set[int] = set()      # nccl: active on that member; gloo: member arrived
        self.done = False
        self.mismatch = False


class _Kernel:
    """One entry of a rank's stream on a group: point-to-point ops (one Post) or a collective.
    Under gloo collectives get a kernel too (not on any stream), to name them in reports."""
    __slots__ = ("rank", "group", "ops", "coll", "left", "active")

    def __init__(self, rank: int, group: str, ops: list[_OpState] | None = None,
                 coll: _Coll | None = None):
        self.rank, self.group = rank, group
        self.ops = ops or []
        self.coll = coll
        self.left = len(self.ops)
        self.active = False

    def __str__(self) -> str:
        if self.coll is not None:
            return f"collective {self.coll.names.get(self.rank, '?')} on {self.group}"
        return "post {" + ", ".join(map(str, self.ops)) + "}"


class _Rank:
    __slots__ = ("rank", "prog", "pc", "blocker", "posted", "waited", "produced", "send_seq",
                 "recv_seq", "coll_seq", "streams", "queued", "started", "streams_last")

    def __init__(self, rank: int, prog: list[Action]):
        self.rank, self.prog = rank, prog
        self.pc = 0
        self.blocker: _OpState | _Kernel | None = None
        self.posted: dict[Op, _OpState] = {}
        self.waited: set = set()
        self.produced: dict = {}
        self.send_seq: dict = {}
        self.recv_seq: dict = {}
        self.coll_seq: dict = {}
        self.streams: dict[str, deque[_Kernel]] = {}
        self.queued = False
        self.started: dict[tuple[str, int], _Kernel] = {}     # non-blocking collectives
        self.streams_last: _Kernel | None = None

    @property
    def finished(self) -> bool:
        return self.pc >= len(self.prog) and self.blocker is None


class _Sim:
    def __init__(self, programs: dict[int, list[Action]], groups: dict[str, tuple[int, ...]],
                 rules: str):
        if rules not in RULES:
            raise ValueError(f"rules must be one of {RULES}, not {rules!r}")
        self.nccl = rules == "nccl"
        self.rules = rules
        self.groups = {g: tuple(m) for g, m in groups.items()}
        self.members = {g: frozenset(m) for g, m in groups.items()}
        self.ranks = {r: _Rank(r, list(p)) for r, p in programs.items()}
        self.errors: list[str] = []
        self.chans: dict[tuple, tuple[list, list]] = {}   # key -> (sends, recvs) by seq
        self.colls: dict[str, list[_Coll]] = {}
        self.work: deque[int] = deque()
        self.activate: deque[_Kernel] = deque()
        self.all_ops: list[_OpState] = []

    # -- scheduling
    def wake(self, r: int) -> None:
        st = self.ranks.get(r)
        if st is not None and not st.queued:
            st.queued = True
            self.work.append(r)

    def run(self) -> None:
        for r in sorted(self.ranks):
            self.wake(r)
        while self.work or self.activate:
            while self.activate:
                self.do_activate(self.activate.popleft())
            if self.work:
                r = self.work.popleft()
                self.ranks[r].queued = False
                self.advance(self.ranks[r])

    # -- completion
    def complete_op(self, o: _OpState) -> None:
        if o.done:
            return
        o.done = True
        st = self.ranks[o.rank]
        if st.blocker is o:
            st.blocker = None
            self.wake(o.rank)
        k = o.kernel
        if k is not None:
            k.left -= 1
            if k.left == 0:
                self.finish_kernel(k)

    def finish_kernel(self, k: _Kernel) -> None:
        stream = self.ranks[k.rank].streams[k.group]
        assert stream and stream[0] is k
        stream.popleft()
        if stream:
            self.activate.append(stream[0])

    def do_activate(self, k: _Kernel) -> None:
        if k.active:
            return
        k.active = True
        if k.coll is not None:
            c = k.coll
            c.reached.add(k.rank)
            if len(c.reached) == len(c.members):
                self.complete_coll(c)
            return
        for o in k.ops:
            o.active = True
        for o in list(k.ops):
            p = o.partner
            if p is not None and p.active and not o.done:
                self.complete_op(o)
                self.complete_op(p)
        if k.left == 0 and not k.ops:      # an empty Post
            self.finish_kernel(k)

    def complete_coll(self, c: _Coll) -> None:
        c.done = True
        for m in c.members:
            k = c.kernels.get(m)
            if k is not None and self.nccl:
                self.finish_kernel(k)
            st = self.ranks.get(m)
            if st is not None and st.blocker is k and k is not None:
                st.blocker = None
                self.wake(m)

    # -- the host
    def err(self, st: _Rank, action, text: str) -> None:
        self.errors.append(f"rank {st.rank} action {st.pc} ({action}): {text}")

    def advance(self, st: _Rank) -> None:
        if st.blocker is not None:
            return
        prog = st.prog
        while st.pc < len(prog):
            a = prog[st.pc]
            if isinstance(a, Post):
                self.post(st, a)
            elif isinstance(a, Wait):
                o = st.posted.get(a.op)
                if o is None:
                    self.err(st, a, "waits on an op it never posted")
                elif not o.done:
                    st.blocker = o          # woken when o completes: the Wait runs again
                    return
                if o is not None and not a.op.send:
                    st.waited.add(a.op.msg)
            elif isinstance(a, Compute):
                for m in a.consumes:
                    if m not in st.waited:
                        self.err(st, a, f"consumes {m} before waiting for its receive")
                for m in a.produces:
                    st.produced[m] = st.produced.get(m, 0) + 1
                if a.collective is not None:
                    if self.collective(st, a, a.collective, f"{a.name}[{a.index}]"):
                        return
            elif isinstance(a, Collective):
                if self.collective(st, a, a.group, a.name):
                    return
            elif isinstance(a, StartCollective):
                if (a.group, a.index) in st.started:
                    self.err(st, a, "started again while the earlier one is outstanding")
                self.collective(st, a, a.group, f"{a.name} {a.index}", block=False)
                if st.streams_last is not None:
                    st.started[(a.group, a.index)] = st.streams_last
            elif isinstance(a, WaitCollective):
                k = st.started.pop((a.group, a.index), None)
                if k is None:
                    self.err(st, a, "waits on a collective it never started")
                elif not k.coll.done:
                    st.blocker = k
                    st.pc += 1
                    return
            else:
                self.err(st, a, f"unknown action type {type(a).__name__}")
            st.pc += 1

    def collective(self, st: _Rank, action, group: str, name: str, block: bool = True) -> bool:
        """Enqueues a collective; True if the host now blocks on it (pc already advanced).
        `block=False` (a StartCollective): the host goes on; the kernel is left in
        `st.streams_last` for the matching WaitCollective."""
        st.streams_last = None
        if group not in self.groups:
            self.err(st, action, f"collective on unknown group {group}")
            return False
        if st.rank not in self.members[group]:
            self.err(st, action, f"collective on {group}, which rank {st.rank} is not in")
            return False
        n = st.coll_seq.get(group, 0)
        st.coll_seq[group] = n + 1
        calls = self.colls.setdefault(group, [])
        while len(calls) <= n:
            calls.append(_Coll(group, len(calls), self.groups[group]))
        c = calls[n]
        c.names[st.rank] = name
        if not c.mismatch and len(set(c.names.values())) > 1:
            c.mismatch = True
            self.errors.append(f"collective #{n} on {group}: members call different "
                               f"collectives: " + ", ".join(f"rank {r} {x!r}" for r, x in
                                                              sorted(c.names.items())))
        k = _Kernel(st.rank, group, coll=c)
        c.kernels[st.rank] = k
        st.streams_last = k
        if block:
            st.blocker = k
            st.pc += 1
        if self.nccl:
            stream = st.streams.setdefault(group, deque())
            stream.append(k)
            if len(stream) == 1:
                self.activate.append(k)
        else:
            k.active = True
            c.reached.add(st.rank)
            if len(c.reached) == len(c.members):
                self.complete_coll(c)
        return block

    def post(self, st: _Rank, a: Post) -> None:
        by_group: dict[str, list[_OpState]] = {}
        if len({op.group for op in a.ops}) > 1:
            self.err(st, a, "a Post mixes process groups")
        for op in a.ops:
            o = self.register(st, a, op)
            if o is not None:
                by_group.setdefault(op.group, []).append(o)
        for group, ops in by_group.items():
            if self.nccl:
                k = _Kernel(st.rank, group, ops=ops)
                for o in ops:
                    o.kernel = k
                stream = st.streams.setdefault(group, deque())
                stream.append(k)
                if len(stream) == 1:
                    self.activate.append(k)
            else:
                for o in ops:
                    if o.op.send:
                        self.complete_op(o)
                        if o.partner is not None:
                            self.complete_op(o.partner)
                    elif o.partner is not None:
                        self.complete_op(o)

    def register(self, st: _Rank, a: Post, op: Op) -> _OpState | None:
        m, g = op.msg, op.group
        if g not in self.groups:
            self.err(st, a, f"{op}: unknown group")
            return None
        own = m.src if op.send else m.dst
        if own != st.rank:
            self.err(st, a, f"{op}: rank {st.rank} is not its {'sender' if op.send else 'receiver'}")
            return None
        if m.src not in self.members[g] or m.dst not in self.members[g]:
            self.err(st, a, f"{op}: ranks {m.src} and {m.dst} are not both in {g}")
            return None
        old = st.posted.get(op)
        if old is not None and not old.done:
            self.err(st, a, f"{op} posted again while the earlier one is outstanding")
            return None
        if op.send:
            n = st.produced.get(m, 0)
            if n <= 0:
                self.err(st, a, f"sends {m}, which no earlier compute produced")
            else:
                st.produced[m] = n - 1
        else:
            st.waited.discard(m)
        key = (g, m.src, m.dst)
        counters = st.send_seq if op.send else st.recv_seq
        seq = counters.get(key, 0)
        counters[key] = seq + 1
        o = _OpState(st.rank, op, key, seq)
        st.posted[op] = o
        self.all_ops.append(o)
        sends, recvs = self.chans.setdefault(key, ([], []))
        mine, theirs = (sends, recvs) if op.send else (recvs, sends)
        assert len(mine) == seq
        mine.append(o)
        if seq < len(theirs):
            p = theirs[seq]
            o.partner, p.partner = p, o
            if p.op.msg != m:
                s, r = (o, p) if op.send else (p, o)
                self.errors.append(
                    f"mismatch on {g}: receive #{seq} of rank {m.dst} from rank {m.src} expects "
                    f"{r.op.msg}, but the matching send is {s.op.msg}")
        return o

    # -- the report
    def head_item(self, rank: int, group: str):
        stream = self.ranks[rank].streams.get(group)
        if not stream:
            return None
        k = stream[0]
        if k.coll is not None:
            return k
        for o in k.ops:
            if not o.done:
                return o
        return k

    def resolve(self, item):
        """The item that actually holds `item` up: under nccl, the head of its stream."""
        if not self.nccl:
            return item
        active = item.kernel.active if isinstance(item, _OpState) else item.active
        if active:
            return item
        head = self.head_item(item.rank, item.group if isinstance(item, _Kernel)
                              else item.op.group)
        return head if head is not None else item

    def chain(self, start: int) -> list[tuple[int, str, int | None]]:
        out: list[tuple[int, str, int | None]] = []
        seen: dict[tuple[int, int], int] = {}
        r = start
        entry, how, note = self.ranks[r].blocker, "host", ""
        while True:
            if entry is None:                 # the rank's host is not blocked (cannot happen)
                out.append((r, "is not blocked (a simulator bug)", None))
                return out
            item = self.resolve(entry)
            notes = []
            if how == "host":
                desc = f"wait {entry}" if isinstance(entry, _OpState) else str(entry)
            else:
                desc = str(entry)
                notes.append("posted" if isinstance(entry, _OpState) else "enqueued")
            if item is not entry:
                notes.append(f"behind {item}")
            if note:
                notes.append(note)
            nxt = None
            end = None
            if isinstance(item, _OpState):
                peer = item.op.peer
                p = item.partner
                pst = self.ranks.get(peer)
                if p is not None:
                    nxt = (peer, p, "posted", "")
                else:
                    want = Op(not item.op.send, item.op.msg, item.op.group)
                    if pst is None:
                        end = (peer, f"has no program (it would post {want})")
                    elif pst.finished:
                        end = (peer, f"finished its program without posting {want} "
                                     f"(#{item.seq} on that channel)")
                    else:
                        nxt = (peer, pst.blocker, "host", f"has not yet posted {want}")
            else:
                c = item.coll
                missing = [m for m in c.members if m not in c.reached]
                if not missing:
                    missing = [m for m in c.members if m != r]
                peer = missing[0]
                pst = self.ranks.get(peer)
                if peer in c.kernels:
                    nxt = (peer, c.kernels[peer], "posted", "")
                elif pst is None:
                    end = (peer, f"has no program (it would call {c.names[r]} on {c.group})")
                elif pst.finished:
                    end = (peer, f"finished its program without calling collective "
                                 f"#{c.seq} on {c.group}")
                else:
                    nxt = (peer, pst.blocker, "host",
                           f"has not yet called collective #{c.seq} on {c.group}")
                if len(missing) > 1:
                    notes.append(f"members not there yet: {', '.join(map(str, missing))}")
            if notes:
                desc += " (" + "; ".join(notes) + ")"
            node = (r, id(item))
            if node in seen:
                return out[seen[node]:]
            seen[node] = len(out)
            out.append((r, desc, peer))
            if end is not None:
                out.append((end[0], end[1], None))
                return out
            r, entry, how, note = nxt

    def result(self) -> SimResult:
        stuck = [r for r in sorted(self.ranks) if not self.ranks[r].finished]
        deadlock = self.chain(stuck[0]) if stuck else None
        errors = list(self.errors)
        if not stuck:
            for r in sorted(self.ranks):
                for group, index in self.ranks[r].started:
                    errors.append(f"rank {r}: collective round {index} on {group} was started "
                                  f"and never waited for")
            for o in self.all_ops:
                if o.partner is None:
                    errors.append(f"rank {o.rank}: {o.op} (#{o.seq} on its channel) was never "
                                  f"matched")
                elif not o.done:
                    errors.append(f"rank {o.rank}: {o.op} never completed")
        positions = {r: (st.pc, len(st.prog)) for r, st in self.ranks.items()}
        ok = not stuck and not errors
        return SimResult(ok, deadlock, errors, self.rules, positions)


def simulate(programs: dict[int, list[Action]], groups: dict[str, tuple[int, ...]],
             rules: str = "nccl") -> SimResult:
    """Replays `programs` (rank -> ordered actions) on `groups` under `rules` ("nccl" or
    "gloo"), see the module docstring."""
    sim = _Sim(programs, groups, rules)
    sim.run()
    return sim.result()


def simulate_run(spec, events, eval_batches: int, rules: str = "nccl",
                 start: int = 0, nonfinite_stop: bool = False) -> SimResult:
    """Every rank's program for a run of `spec` (engine/schedule.py), replayed together."""
    programs = {r: program(RankSchedule(spec, r, start, nonfinite_stop), events, eval_batches)
                for r in range(spec.world)}
    return simulate(programs, process_groups(spec), rules)
