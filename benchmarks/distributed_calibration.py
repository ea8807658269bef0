"""Cost of distributed calibration: 2 gloo processes over half the data each against 1 process over all of it.

For each method, in fresh processes started with torch.multiprocessing (start-up not timed), ``t`` threads per
process (``--threads``, default ``cores / 2``):

* ``single``: one process, all batches, ``t`` threads;
* ``single_all`` (with ``--all-cores``): one process, all batches, all the cores (what one process on the same
  machine can do; slow to measure on a loaded machine, where intra-op threads wait for each other);
* ``half``: one process, half the batches, ``t`` threads - what each rank of the pair does, minus the
  synchronisation;
* ``ddp2``: two gloo processes, half the batches each, ``t`` threads each; the time is ``calibrate_model``'s wall
  time (after a barrier) on the slower rank, and the combination's own time and bytes come from ``report.sync``.

It prints the ratios ``ddp2 / single`` (and ``ddp2 / single_all``; below 1: two processes calibrate faster than
one), the synchronisation time and its share of ``ddp2``, and the bytes each rank contributes to the collectives
per quantizer: a per-tensor histogram quantizer sends its metadata (200 bytes), its range and max (8 bytes) and its
2048 int64 counts (16 KiB); a max calibrator its metadata and ``3 x channels`` float32 values. The model is the
CIFAR ResNet of ``examples/ddp_qat`` on random 3x32x32 batches (the timing does not depend on the pixels).

Run: python benchmarks/distributed_calibration.py [--batches 32] [--json out/distributed_calibration.json]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import machine, write_json  # noqa: E402
from examples.ddp_qat.train import CifarResNet  # noqa: E402

import qdq  # noqa: E402


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = CifarResNet(blocks=2).eval()
    qdq.replace_to_quantization_module(model)
    return model


def _data(batches: int, batch_size: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch_size, 3, 32, 32, generator=g) for _ in range(batches)]


def _worker(rank: int, world: int, threads: int, method: str, batches: list, repeat: int, out: str) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        store = dist.FileStore(os.path.join(out, "store"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
    try:
        mine = batches[rank::world]
        model = _model()
        qdq.calibrate_model(model, mine[:1], method=method, progress=False)  # warm-up (lazy init, histograms swap)
        times, sync_seconds, report = [], [], None
        for _ in range(repeat):
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            report = qdq.calibrate_model(model, mine, method=method, progress=False)
            times.append(time.perf_counter() - t0)
            sync_seconds.append(report.sync.seconds if report.sync is not None else 0.0)
        per_quantizer = report.sync.per_quantizer if report.sync is not None else {}
        torch.save({"times": times, "sync": sync_seconds, "per_quantizer": per_quantizer,
                    "quantizers": report.calibrated}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run(world: int, threads: int, method: str, batches: list, repeat: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="qdq-bench-dist-") as out:
        mp.start_processes(_worker, args=(world, threads, method, batches, repeat, out), nprocs=world,
                           start_method="spawn")
        return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=32, help="calibration batches in all (split between ranks)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="timed calibrations per configuration (median)")
    parser.add_argument("--methods", default="max,entropy,percentile")
    parser.add_argument("--threads", type=int, default=None, help="threads per process (default: cores / 2)")
    parser.add_argument("--all-cores", action="store_true", help="also time one process on all the cores")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // 2)
    data = _data(args.batches, args.batch_size)
    results: dict = {"machine": machine(), "batches": args.batches, "batch_size": args.batch_size,
                     "threads": {"single": threads, "single_all": cores, "half": threads, "ddp2": threads},
                     "methods": {}}
    print(f"{args.batches} batches of {args.batch_size} x 3x32x32, {cores} cores, {threads} threads per process "
          f"(single_all: {cores}); median of {args.repeat}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'method':<11}{'single s':>9}{'single_all s':>13}{'half s':>8}{'ddp2 s':>8}{'ddp2/single':>12}"
          f"{'ddp2/single_all':>16}{'sync ms':>8}{'sync share':>11}  bytes/quantizer mean (min-max)")
    for method in args.methods.split(","):
        single = _run(1, threads, method, data, args.repeat)[0]
        single_all = _run(1, cores, method, data, args.repeat)[0] if args.all_cores else None
        half = _run(1, threads, method, data[: len(data) // 2], args.repeat)[0]
        pair = _run(2, threads, method, data, args.repeat)
        t_single = statistics.median(single["times"])
        t_all = statistics.median(single_all["times"]) if single_all else math.nan
        t_half = statistics.median(half["times"])
        t_pair = statistics.median(max(a, b) for a, b in zip(pair[0]["times"], pair[1]["times"]))
        t_sync = statistics.median(max(a, b) for a, b in zip(pair[0]["sync"], pair[1]["sync"]))
        sent = [list(p["per_quantizer"].values()) for p in pair]
        per_q = sent[0]
        row = {
            "single_s": t_single, "single_all_s": t_all, "half_s": t_half, "ddp2_s": t_pair,
            "ratio_ddp2_single": t_pair / t_single, "ratio_ddp2_single_all": t_pair / t_all,
            "sync_s": t_sync, "sync_share": t_sync / t_pair, "quantizers": len(per_q),
            "bytes_per_quantizer_mean": sum(per_q) / max(1, len(per_q)), "bytes_per_quantizer_min": min(per_q),
            "bytes_per_quantizer_max": max(per_q), "bytes_per_rank": [sum(s) for s in sent],
        }
        results["methods"][method] = row
        print(f"{method:<11}{t_single:>9.3f}{t_all:>13.3f}{t_half:>8.3f}{t_pair:>8.3f}{t_pair / t_single:>12.2f}"
              f"{t_pair / t_all:>16.2f}{t_sync * 1000:>8.1f}{t_sync / t_pair:>11.1%}"
              f"  {row['bytes_per_quantizer_mean']:.0f} ({min(per_q)}-{max(per_q)}) x {len(per_q)} quantizers")
    print("bytes: what each rank contributes to the collectives (identical on both ranks: "
          f"{all(r['bytes_per_rank'][0] == r['bytes_per_rank'][1] for r in results['methods'].values())})")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
