"""Process-group set-up and teardown, and the few collectives start-up needs.

Works alone (world size 1, no process group) and under torchrun (reads RANK, WORLD_SIZE,
LOCAL_RANK). NCCL on CUDA with one GPU per rank, gloo on CPU, and gloo through pinned host
buffers when ranks share a GPU (`choose_backend`), unless pipeline.backend says otherwise.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pipemlaan.config import Config
from pipemlaan.engine.comm import Comm, HostStagedComm, TorchComm
from pipemlaan.engine import watchdog
from pipemlaan.engine.call_log import RecordingComm, maybe_record
from pipemlaan.engine.runtime import configure_torch
from pipemlaan.errors import ConfigError, PipelineError, PipemlaanError
from pipemlaan.ui import console


@dataclass
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str | None
    comm: Comm | None = None      # None in a single process

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def init_distributed(cfg: Config) -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use "
                          "--train.device=cpu")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    configure_torch(cfg.train)
    backend = None
    if world > 1:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        gpus = torch.cuda.device_count() if use_cuda else 0
        backend, staged, note = choose_backend(cfg.pipeline.backend, use_cuda, local_world, gpus)
        if note and rank == 0:
            console.print(note)
        timeout = timedelta(seconds=cfg.pipeline.timeout_s)
        try:
            dist.init_process_group(backend, timeout=timeout, store=_attempt_store(world, timeout),
                                    rank=rank, world_size=world,
                                    device_id=device if backend == "nccl" else None)
        except (RuntimeError, ValueError) as e:
            raise PipelineError(f"rank {rank}: could not join the process group ({e}); check "
                                f"MASTER_ADDR/MASTER_PORT or the torchrun rendezvous, and that "
                                f"every rank was started") from e
        watchdog.start(rank, world)
        comm = TorchComm(rank, world, cfg.pipeline.timeout_s)
        return DistEnv(rank, world, local_rank, device, backend,
                       maybe_record(HostStagedComm(comm) if staged else comm))
    return DistEnv(rank, world, local_rank, device, backend)


def choose_backend(requested: str, use_cuda: bool, local_world: int,
                   gpus: int) -> tuple[str, bool, str]:
    """(backend, stage device tensors through host memory?, a note for the user or "").

    NCCL wants one GPU per rank; gloo moves only host tensors. When a node's ranks outnumber
    its GPUs (or gloo is asked for on CUDA), exchanges go over gloo through pinned host buffers:
    a development and measurement mode, slower than NCCL with one GPU per rank."""
    if not use_cuda:
        if requested == "nccl":
            raise ConfigError("pipeline.backend=nccl needs CUDA devices; use gloo on CPU")
        return "gloo", False, ""
    shared = local_world > gpus
    if requested == "nccl" and shared:
        raise ConfigError(f"pipeline.backend=nccl but {local_world} ranks share {gpus} GPU(s) "
                          f"on this node, and NCCL refuses two ranks on one device; use "
                          f"--pipeline.backend=gloo (or auto) to share GPUs through host "
                          f"memory, or start one rank per GPU")
    if requested == "nccl" or (requested == "auto" and not shared):
        return "nccl", False, ""
    why = (f"{local_world} ranks share {gpus} GPU(s)" if shared
           else "pipeline.backend=gloo on CUDA")
    return "gloo", True, (f"{why}: activations, gradients and weights go through pinned host "
                          f"memory over gloo, slower than NCCL with one GPU per rank "
                          f"(a development and measurement mode)")


def _attempt_store(world: int, timeout: timedelta):
    """The rendezvous store, in a namespace of this attempt's own.

    torchrun --max-restarts hands restarted workers the same store as the failed attempt; a
    restarted rank could then read the address its dead peer registered and hang or fail while
    connecting. A prefix per restart keeps attempts apart (heartbeats included)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise ConfigError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set; launch with "
                          "torchrun (see launch/)")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    is_master = int(os.environ.get("RANK", "0")) == 0 and \
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
    base = dist.TCPStore(addr, int(port), world, is_master=is_master, timeout=timeout)
    return dist.PrefixStore(f"pipemlaan/attempt_{attempt}", base)


def cleanup(env: DistEnv) -> None:
    """Tears down the process group. A finished run's last action was the schedule's barrier
    at exit, so no rank's last collective is still in flight; after a failure nothing waits
    (the peers may be dead or stuck), so the failing rank exits at once."""
    watchdog.stop()
    if isinstance(env.comm, RecordingComm):
        env.comm.close()
    if env.backend in ("gloo", "nccl") and dist.is_initialized():
        dist.destroy_process_group()


def gather_all(env: DistEnv, obj):
    """Every rank's `obj`, in rank order, on every rank."""
    return env.comm.all_gather_object(obj) if env.distributed else [obj]


def broadcast(env: DistEnv, obj, src: int = 0):
    return env.comm.broadcast_object(obj, src) if env.distributed else obj


def barrier(env: DistEnv) -> None:
    if env.distributed:
        env.comm.barrier()


def agree(env: DistEnv, error: PipemlaanError | None) -> None:
    """Start-up checks are collective: if any rank failed one, every rank raises it, so no
    rank is left waiting for a peer that has already given up."""
    errors = gather_all(env, None if error is None else (type(error).__name__, str(error)))
    for r, e in enumerate(errors):
        if e is not None:
            if error is not None:
                raise error
            cls = {c.__name__: c for c in PipemlaanError.__subclasses__()}.get(e[0],
                                                                                PipemlaanError)
            raise cls(f"rank {r}: {e[1]}")


def check_shared_folder(env: DistEnv, folder: Path) -> None:
    """On several nodes, run.dir must be one folder every node sees: every rank writes its
    checkpoint files and metrics there, and a resumed run reads them back on whichever node.
    Rank 0 writes a probe file there and every rank reads it back; if any cannot, every rank
    raises one ConfigError naming those nodes. One node (torchrun's LOCAL_WORLD_SIZE equal to
    the world, which every rank reads alike): nothing to check, and no collective."""
    if not env.distributed or int(os.environ.get("LOCAL_WORLD_SIZE", env.world)) >= env.world:
        return
    node = f"node {os.environ.get('GROUP_RANK', '?')} ({socket.gethostname()})"
    name = None
    if env.rank == 0:
        name = f".pipemlaan-probe-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(name)
        except OSError as e:
            name = f"!{e}"
    name = broadcast(env, name)
    if name.startswith("!"):
        raise ConfigError(f"run.dir={str(folder)!r} cannot be written ({name[1:]}); point "
                          f"run.dir at a writable folder shared by every node")
    seen = False
    for _ in range(5):        # a shared filesystem may show a new file a moment later
        try:
            seen = (folder / name).read_text() == name
        except OSError:
            seen = False
        if seen:
            break
        time.sleep(1.0)
    views = gather_all(env, (node, seen))
    if env.rank == 0:
        (folder / name).unlink(missing_ok=True)
    blind = sorted({n for n, ok in views if not ok})
    if blind:
        raise ConfigError(f"run.dir={str(folder)!r} is not one folder shared by every node: "
                          f"{', '.join(blind)} cannot see the file {views[0][0]} wrote there; "
                          f"every rank writes checkpoints into run.dir, so point it at a "
                          f"filesystem mounted at the same path on every node (NFS, Lustre, ...)")
