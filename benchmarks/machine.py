"""What a benchmark prints about the machine it ran on."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def add_timing_options(parser) -> None:
    """The options the loop-against-vectorized benchmarks share: repeats, loop sampling, threads."""
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=None, help="repeats of the vectorized and bare variants")
    parser.add_argument("--loop-repeats", type=int, default=None, help="repeats of the per-sample loop")
    parser.add_argument("--loop-samples", type=int, default=None,
                        help="samples the loop is timed on (scaled to the batch); default 64, --quick 16")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")


def timing_plan(args) -> tuple[int, int, int, float]:
    """Apply --threads; return (repeats, loop repeats, loop samples, loop-to-batch scale)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 15)
    loop_repeats = args.loop_repeats or (1 if args.quick else 3)
    loop_samples = min(args.batch, args.loop_samples or (16 if args.quick else 64))
    return repeats, loop_repeats, loop_samples, args.batch / loop_samples
