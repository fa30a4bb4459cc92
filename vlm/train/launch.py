"""`vlm train RECIPE [key=value ...]`: validate the recipe here, then run it under the real `deepspeed` launcher.

The launcher starts one `vlm.train.loop` process per GPU (per rank on the CPU), or fans out over the nodes of a
DeepSpeed hostfile for multi-node runs.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

from .preflight import check_inputs
from .recipe import load_recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_processes() -> int:
    try:
        import torch

        return max(torch.cuda.device_count(), 1)
    except ImportError:
        return 1


def launcher_command(
    recipe: str,
    overrides: list[str],
    resume: bool = False,
    num_gpus: int | None = None,
    hostfile: str | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile:
        if not Path(hostfile).is_file():
            raise FileNotFoundError(f"hostfile not found: {hostfile}")
        cmd += ["--hostfile", hostfile]
        if master_addr:
            cmd += ["--master_addr", master_addr]
    else:
        cmd += ["--num_gpus", str(num_gpus or default_processes())]
    cmd += ["--master_port", str(master_port or free_port())]
    cmd += ["--module", "vlm.train.loop", recipe, *overrides]
    if resume:
        cmd.append("--resume")
    return cmd


CPU_MMAP_THRESHOLD = 1 << 20  # bytes; see launch_env


def launch_env(num_procs: int) -> dict[str, str]:
    env = dict(os.environ)
    if not _has_cuda():
        # Share the cores between CPU ranks instead of oversubscribing them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(num_procs, 1))))
        env.setdefault("DS_ACCELERATOR", "cpu")
        # glibc raises its mmap threshold to the size of each freed block (up to 32 MiB), so ZeRO-3's gathered
        # parameters and the activations, all on the CPU heap, then fragment it and are never given back: a
        # real-shape 2-rank LoRA stage 2 grew to 20.0 GiB PSS. A fixed 1 MiB threshold returns such blocks to the
        # kernel on free: 11.6 GiB, the same losses (BENCHMARKS.md, real shapes).
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(CPU_MMAP_THRESHOLD))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def cmd_train(args: argparse.Namespace) -> int:
    recipe = load_recipe(
        args.recipe, args.overrides
    )  # fail fast here, with one clear message, before spawning ranks
    cmd = launcher_command(
        args.recipe,
        args.overrides,
        resume=args.resume,
        num_gpus=args.num_gpus,
        hostfile=args.hostfile,
        master_addr=args.master_addr,
        master_port=(port := free_port()),
    )
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    check_inputs(recipe, args.recipe)  # files and checkpoints; a dry run only prints the command
    try:
        return subprocess.call(cmd, env=launch_env(args.num_gpus or default_processes()))
    finally:
        remove_shm_buffers(port)


def remove_shm_buffers(port: int, shm: Path = Path("/dev/shm")) -> list[Path]:
    """Unlink the CPU ranks' allreduce buffers of the run on `port`. DeepSpeed's shm comm op creates one
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> per rank (66 MB) and never unlinks it, so each
    CPU run would leave them in RAM-backed tmpfs until reboot (hundreds of runs had filled 16 of 24 GiB)."""
    found = list(shm.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    for path in found:
        path.unlink(missing_ok=True)
    return found


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="run a training recipe (stages/*.yaml) under the deepspeed launcher")
    p.add_argument("recipe", help="recipe YAML, e.g. stages/stage1.yaml")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. lr=2e-5 lora.r=64"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest good checkpoint in output_dir"
    )
    p.add_argument("--num-gpus", type=int, default=None, help="processes on this machine (CPU: ranks)")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile for a multi-node run")
    p.add_argument("--master-addr", default=None, help="rendezvous address for multi-node runs")
    p.add_argument("--dry-run", action="store_true", help="print the launcher command and exit")
    p.set_defaults(func=cmd_train)
