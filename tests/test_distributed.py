"""Distributed calibration, auto-tune, rules, export and DDP QAT, with 2 and 3 gloo processes on the CPU.

Each test starts its ranks with ``torch.multiprocessing`` (forkserver: the server imports torch and qdq once, every
rank is then a cheap fork of a process that never ran a torch op), rendezvous through a ``FileStore`` in the test's
``tmp_path`` and a process-group timeout, and joins them under a deadline: a hang fails the test instead of
blocking the suite. The workers are top-level functions (picklable); each writes what it saw to ``rank{r}.pt`` and
the test compares the ranks with each other and with one process run on the union of the data.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import qdq
from qdq import calibrate_model
from qdq import nn as quant_nn
from qdq.calibrate.autotune import autotune
from qdq.calib import HistogramCalibrator, MaxCalibrator
from qdq.calib.calibrator import StatsMismatchError
from qdq.calib.histogram import rebin
from qdq.distributed import (
    NotSynchronizedError,
    all_reduce_calibrators,
    gather_objects,
    prepare_for_ddp,
    sync_calibrators,
    verify_synchronized,
)
from qdq.onnx.export import export_onnx_distributed
from qdq.transform.replace import replace_to_quantization_module
from qdq.transform.switches import quantizers
from qdq.tensor_quant import QuantDescriptor

PG_TIMEOUT = 20  # seconds: a collective that waits longer raises
JOIN_TIMEOUT = 90  # seconds: the test fails (and kills its ranks) when they have not finished by then
METHODS = ["max", "entropy", "mse", "percentile", "kld"]
HIST_METHODS = METHODS[1:]


# ------------------------------------------------------------------------------------------------------------------
# harness
# ------------------------------------------------------------------------------------------------------------------
def _entry(rank: int, fn, world: int, out: str, timeout: float, args: tuple) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(out, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        fn(rank, world, Path(out), *args)
    finally:
        dist.destroy_process_group()


def _launch(fn, world: int, out: Path, *args, timeout: float = PG_TIMEOUT, expect_exit: dict | None = None):
    """Runs ``fn(rank, world, out, *args)`` on ``world`` gloo ranks; returns ``[rank0 result, ...]``.

    A rank that raises fails the test with its traceback; ranks still running after ``JOIN_TIMEOUT`` are killed
    and fail the test. ``expect_exit`` maps ranks to the exit codes they are meant to die with.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "qdq", "qdq.distributed", "qdq.onnx.rules", __name__])
    procs = mp.start_processes(_entry, args=(fn, world, str(out), timeout, args), nprocs=world, join=False,
                               start_method="forkserver").processes
    deadline = time.monotonic() + JOIN_TIMEOUT
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        if hung:
            pytest.fail(f"ranks {hung} still running after {JOIN_TIMEOUT} s: a hang")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    expect_exit = expect_exit or {}
    codes = {r: p.exitcode for r, p in enumerate(procs)}
    bad = {r: c for r, c in codes.items() if c != expect_exit.get(r, 0)}
    assert not bad, f"rank exit codes {codes} (expected {expect_exit or 'all 0'}); see the captured stderr"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) if (out / f"rank{r}.pt").exists() else None
            for r in range(world)]


def _save(out: Path, rank: int, obj) -> None:
    torch.save(obj, out / f"rank{rank}.pt")


# ------------------------------------------------------------------------------------------------------------------
# models and data shared by the workers and the single-process references
# ------------------------------------------------------------------------------------------------------------------
def _calib_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 4))
    replace_to_quantization_module(model)
    return model


def _batches(n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    out = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]
    # batch 0 (rank 0's first) holds every quantizer's maximum, so one process on all batches and the group grow
    # the same histogram range: then they differ only by the rebinning of the other ranks' counts
    out[0] = out[0] * 3
    return out


def _shard(batches: list, rank: int, world: int, empty: tuple[int, ...] = ()) -> list:
    if rank in empty:
        return []
    holders = [r for r in range(world) if r not in empty]
    return batches[holders.index(rank)::len(holders)]


def _state(model: nn.Module) -> dict:
    out = {}
    for name, q in quantizers(model):
        out[name] = {
            "amax": None if q.amax is None else q.amax.detach().clone(),
            "amin": None if q.amin is None else q.amin.detach().clone(),
            "num_batches": q.calibrator.num_batches if q.calibrator is not None else None,
        }
        if isinstance(q.calibrator, HistogramCalibrator) and q.calibrator.collected:
            counts, edges = q.calibrator.histogram()
            out[name]["counts"], out[name]["width"] = counts.clone(), float(edges.reshape(-1, edges.shape[-1])[0, 1])
    return out


# ------------------------------------------------------------------------------------------------------------------
# single process: the pieces that need no process group
# ------------------------------------------------------------------------------------------------------------------
def test_rebin_integer_ratio_is_exact_and_other_ratios_move_at_most_one_bin():
    n = 64
    values = torch.rand(20000) * 1.7
    old_top, new_top = 1.7, 2.9
    old = torch.histc(values, bins=n, min=0, max=old_top).to(torch.int64)[None]
    direct = torch.histc(values, bins=n, min=0, max=new_top).to(torch.int64)
    moved = rebin(old, torch.tensor([old_top]), torch.tensor([new_top]))[0]
    assert int(moved.sum()) == values.numel()
    # every value's new bin is its true bin or a neighbour: the cumulative counts bracket the true ones
    cum_true, cum_moved = direct.cumsum(0), moved.cumsum(0)
    assert bool((cum_moved[1:] >= cum_true[:-1]).all()) and bool((cum_moved[:-1] <= cum_true[1:]).all())
    # an integer ratio merges exactly
    merged = rebin(old, torch.tensor([old_top]), torch.tensor([old_top * 3]))[0]
    assert torch.equal(merged, torch.zeros(n, dtype=torch.int64).scatter_add_(0, torch.arange(n) // 3, old[0]))
    # per-channel rows with their own ranges; a channel that saw only zeros keeps them in bin 0
    rows = torch.tensor([[5, 1, 0, 0], [7, 0, 0, 0]])
    assert rebin(rows, torch.tensor([2.0, 0.0]), torch.tensor([4.0, 3.0])).tolist() == [[6, 0, 0, 0], [7, 0, 0, 0]]
    with pytest.raises(ValueError, match="cover"):
        rebin(rows, torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0]))


def test_single_process_sync_is_a_no_op():
    model = _calib_model()
    calibrate_model(model, _batches(2), method="entropy", progress=False)
    before = _state(model)
    assert sync_calibrators(model).bytes_sent == 0
    assert gather_objects(3) == [3]
    assert verify_synchronized(model) == 0
    after = _state(model)
    assert all(torch.equal(before[k]["amax"], after[k]["amax"]) for k in before)


# ------------------------------------------------------------------------------------------------------------------
# calibration: every method, identical across ranks, equal to one process on the union
# ------------------------------------------------------------------------------------------------------------------
def _calibrate_worker(rank: int, world: int, out: Path, empty: tuple[int, ...]) -> None:
    data = _shard(_batches(), rank, world, empty)
    results = {}
    for method in METHODS:
        model = _calib_model()
        report = calibrate_model(model, data, method=method, progress=False)
        results[method] = _state(model)
        results[method + "/bytes"] = report.sync.per_quantizer
        # computing amax again from the same, already combined, statistics must not combine twice
        if method == "entropy":
            again = qdq.compute_amax(model, method="percentile", percentile=99.9)
            results["again"] = (_state(model), again.sync.bytes_sent)
    # the asymmetric (signed min/max) and per-channel histogram calibrators, directly
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(rank)) * (rank + 1) + rank
    signed = MaxCalibrator(8, axis=1)
    per_channel = HistogramCalibrator(8, axis=1, num_bins=128)
    if rank not in empty:
        signed.collect(x)
        per_channel.collect(x)
    all_reduce_calibrators([signed])
    all_reduce_calibrators([per_channel])
    results["signed"] = (signed.compute_range(), signed.compute_amax())
    results["per_channel"] = (per_channel.histogram(), per_channel.compute_amax("max"))
    _save(out, rank, results)


def _reference(data: list) -> dict:
    results = {}
    for method in METHODS:
        model = _calib_model()
        calibrate_model(model, data, method=method, progress=False)
        results[method] = _state(model)
    return results


def _check_calibration(results: list, world: int, empty: tuple[int, ...]) -> None:
    reference = _reference(_batches())
    for method in METHODS:
        first = results[0][method]
        for rank in range(1, world):  # identical on every rank, bit for bit
            for name, st in results[rank][method].items():
                assert torch.equal(st["amax"], first[name]["amax"]), (method, name, rank)
                assert st["num_batches"] == first[name]["num_batches"]
        for name, st in first.items():
            ref = reference[method][name]
            if not name.endswith("_weight_quantizer"):  # a weight is collected once per rank, not once per batch
                assert st["num_batches"] == ref["num_batches"] == len(_batches()), (method, name)
            # exact for every method: max combines exactly, histograms on power-of-two bins merge exactly
            assert torch.equal(st["amax"], ref["amax"]), (method, name, st["amax"], ref["amax"])
            if "counts" in ref:
                assert st["width"] == ref["width"] and torch.equal(st["counts"], ref["counts"]), (method, name)
        assert all(b > 0 for b in results[0][method + "/bytes"].values())
    state, sent = results[0]["again"]
    assert sent == 200 * len(state)  # metadata only: the statistics were already combined
    # asymmetric min/max and per-channel histograms
    xs = [torch.randn(64, 6, generator=torch.Generator().manual_seed(r)) * (r + 1) + r
          for r in range(world) if r not in empty]
    union = torch.cat(xs)
    for rank in range(world):
        (low, high), amax = results[rank]["signed"]
        assert torch.equal(low.flatten(), union.amin(0)) and torch.equal(high.flatten(), union.amax(0))
        assert torch.equal(amax.flatten(), union.abs().amax(0))
        (counts, edges), hmax = results[rank]["per_channel"]
        assert torch.equal(counts, results[0]["per_channel"][0][0]) and torch.equal(hmax.flatten(), union.abs().amax(0))
        assert counts.sum(1).tolist() == [union.shape[0]] * 6


@pytest.mark.slow
def test_two_ranks_calibrate_to_the_union_for_every_method(tmp_path):
    results = _launch(_calibrate_worker, 2, tmp_path, ())
    _check_calibration(results, 2, ())


_CONFIG = {"version": 2, "global": {"num_batches": None, "input": {"calib_method": "entropy"}}}


def _config_model() -> nn.Module:
    from qdq.config import apply_quant_config

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    apply_quant_config(model, _CONFIG)
    return model


def _config_worker(rank: int, world: int, out: Path) -> None:
    from qdq.config import calibrate_from_config

    model = _config_model()
    report = calibrate_from_config(model, _shard(_batches(), rank, world), _CONFIG, progress=False)
    _save(out, rank, {"state": _state(model), "world": report.sync.world_size})


def test_per_layer_config_calibration_agrees_across_ranks_with_one_process(tmp_path):
    """calibrate_from_config combines the ranks' histograms as calibrate_model does: one amax, that of all data."""
    from qdq.config import calibrate_from_config

    ranks = _launch(_config_worker, 2, tmp_path)
    reference = _config_model()
    calibrate_from_config(reference, _batches(), _CONFIG, progress=False)
    expected = _state(reference)
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        for name, want in expected.items():
            assert torch.equal(r["state"][name]["amax"], want["amax"]), name


@pytest.mark.slow
def test_three_ranks_one_without_batches(tmp_path):
    """A rank whose data yields nothing takes part with empty statistics and ends with the same amax."""
    results = _launch(_calibrate_worker, 3, tmp_path, (1,))
    _check_calibration(results, 3, (1,))


def _group_worker(rank: int, world: int, out: Path) -> None:
    pair, alone = dist.new_group([0, 2]), dist.new_group([1])  # every rank creates every group, in one order
    group = pair if rank in (0, 2) else alone
    model = _calib_model()
    report = calibrate_model(model, _shard(_batches(), rank, world), method="percentile", group=group, progress=False)
    pairs = qdq.apply_custom_rules_to_quantizer(_Block(), torch.randn(1, 3, 4, 4), group=group)
    _save(out, rank, {"state": _state(model), "world": report.sync.world_size, "pairs": pairs})


@pytest.mark.slow
def test_group_argument_calibrates_within_the_group(tmp_path):
    """Ranks 0 and 2 calibrate together, rank 1 alone: each group ends with the amax of its own ranks' data."""
    ranks = _launch(_group_worker, 3, tmp_path)
    batches = _batches()
    together = _reference([b for i, b in enumerate(batches) if i % 3 != 1])["percentile"]
    alone = _reference(batches[1::3])["percentile"]
    assert [r["world"] for r in ranks] == [2, 1, 2]
    for name, ref in together.items():
        assert torch.equal(ranks[0]["state"][name]["amax"], ranks[2]["state"][name]["amax"])
        if not name.endswith("_weight_quantizer"):  # a weight is collected once per rank
            assert ranks[0]["state"][name]["num_batches"] == ref["num_batches"] == 4
        diff = (ranks[0]["state"][name]["amax"] - ref["amax"]).abs().max().item()
        assert diff <= ref.get("width", 0.0) * 1.0001, name
        assert torch.equal(ranks[1]["state"][name]["amax"], alone[name]["amax"])
    assert all(r["pairs"] == [("a._input_quantizer", "b._input_quantizer")] for r in ranks)


def _exact_merge_worker(rank: int, world: int, out: Path) -> None:
    g = torch.Generator().manual_seed(7 + rank)
    cal = HistogramCalibrator(8, None, False, num_bins=256)
    top = 4.0 / 2**rank  # ranges 4, 2, 1: integer ratios, so the counts merge exactly
    x = torch.rand(5000, generator=g) * top
    x[0] = top
    cal.collect(x)
    sent = all_reduce_calibrators([cal])[0]
    _save(out, rank, {"hist": cal.histogram(), "entropy": cal.compute_amax("entropy"), "sent": sent})


@pytest.mark.slow
def test_integer_range_ratios_merge_exactly(tmp_path):
    results = _launch(_exact_merge_worker, 3, tmp_path)
    single = HistogramCalibrator(8, None, False, num_bins=256)
    for rank in range(3):
        g = torch.Generator().manual_seed(7 + rank)
        top = 4.0 / 2**rank
        x = torch.rand(5000, generator=g) * top
        x[0] = top
        single.collect(x)  # rank 0's range first: the single process never grows
    counts, edges = single.histogram()
    merged = HistogramCalibrator(8, None, False, num_bins=256)  # the ranks' calibrators merged in one process
    for rank in reversed(range(3)):
        g = torch.Generator().manual_seed(7 + rank)
        top = 4.0 / 2**rank
        x = torch.rand(5000, generator=g) * top
        x[0] = top
        share = HistogramCalibrator(8, None, False, num_bins=256)
        share.collect(x)
        merged.merge(share)
    for r in results:  # bins 2**e wide merge exactly: one process on all the data, bit for bit
        assert torch.equal(r["hist"][0], counts) and torch.equal(r["hist"][1], edges)
        assert torch.equal(r["hist"][0], merged.histogram()[0])  # the collectives compute what merge computes
        assert torch.equal(r["entropy"], single.compute_amax("entropy"))
        assert r["sent"] == 200 + 3 * 4 + 256 * 8  # metadata, bin exponent, max and min, counts


def _shuffled_data(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(240, 3, 6, 6, generator=g) * torch.logspace(-1, 1, 240)[:, None, None, None]


def _invariance_worker(rank: int, world: int, out: Path) -> None:
    """Each rank takes a shuffled share of the samples, in batches of its own sizes."""
    data = _shuffled_data(5)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(world))
    mine = data[order[rank::world]]
    sizes = [1, 7, 16] * len(mine)
    batches, start = [], 0
    for size in sizes:
        if start >= len(mine):
            break
        batches.append(mine[start:start + size + rank])
        start += size + rank
    per_tensor = HistogramCalibrator(8, None, False)
    per_channel = HistogramCalibrator(8, 1, False, num_bins=128)
    for b in batches:
        per_tensor.collect(b)
        per_channel.collect(b)
    all_reduce_calibrators([per_tensor])
    all_reduce_calibrators([per_channel])
    _save(out, rank, {name: (cal.histogram(), {m: cal.compute_amax(m) for m in HIST_METHODS + ["max"]})
                      for name, cal in (("tensor", per_tensor), ("channel", per_channel))})


@pytest.mark.parametrize("world", [2, 3])
def test_histograms_are_order_batch_and_shard_invariant(tmp_path, world):
    """2 or 3 ranks, shuffled shares in batches of mixed sizes: the histograms and every method's amax are those of
    one process on all the data in one batch, bit for bit (they differed by several bins while ranges grew)."""
    results = _launch(_invariance_worker, world, tmp_path)
    data = _shuffled_data(5)
    for name, cal in (("tensor", HistogramCalibrator(8, None, False)),
                      ("channel", HistogramCalibrator(8, 1, False, num_bins=128))):
        cal.collect(data)
        counts, edges = cal.histogram()
        for r in results:
            (got_counts, got_edges), amax = r[name]
            assert torch.equal(got_counts, counts) and torch.equal(got_edges, edges), name
            for method, value in amax.items():
                assert torch.equal(value, cal.compute_amax(method)), (name, method)


# ------------------------------------------------------------------------------------------------------------------
# auto-tune: distances summed over the ranks
# ------------------------------------------------------------------------------------------------------------------
def _autotune_worker(rank: int, world: int, out: Path) -> None:
    data = _shard(_batches(), rank, world)
    model = _calib_model()
    calibrate_model(model, data, method="kld", progress=False)
    initial = _state(model)
    results = autotune(model, data, num_batches=None, method_init=None, progress=False)
    _save(out, rank, {"initial": initial, "tuned": _state(model),
                      "results": {k: (r.candidates, r.distances, r.amax, r.calls) for k, r in results.items()}})


@pytest.mark.slow
def test_autotune_sums_distances_over_ranks(tmp_path):
    ranks = _launch(_autotune_worker, 2, tmp_path)
    assert ranks[0]["results"] == ranks[1]["results"]
    # one process on all the data, starting from the same amax, tries the same candidates and measures the same sums
    model = _calib_model()
    calibrate_model(model, _batches(), method="kld", progress=False)
    for name, q in quantizers(model):
        q.amax = ranks[0]["initial"][name]["amax"]
    single = autotune(model, _batches(), num_batches=None, method_init=None, progress=False)
    assert set(single) == set(ranks[0]["results"])
    for layer, r in single.items():
        candidates, distances, amax, calls = ranks[0]["results"][layer]
        assert candidates == r.candidates and calls == r.calls == len(_batches())
        assert distances == pytest.approx(r.distances, rel=1e-9)
        assert amax == r.amax


# ------------------------------------------------------------------------------------------------------------------
# failures surface as errors on every rank, not as hangs
# ------------------------------------------------------------------------------------------------------------------
class _Failing:
    def __init__(self, batches, fail_at: int | None, die: bool = False):
        self.batches, self.fail_at, self.die = batches, fail_at, die

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if i == self.fail_at:
                if self.die:
                    os._exit(3)  # a crash without an exception
                raise ValueError(f"corrupt file in batch {i}")
            yield b


def _failing_worker(rank: int, world: int, out: Path, die: bool) -> None:
    data = _Failing(_shard(_batches(), rank, world), 1 if rank == 1 else None, die)
    try:
        calibrate_model(_calib_model(), data, method="percentile", progress=False)
        outcome = "no error"
    except Exception as err:  # noqa: BLE001 - recorded for the test to inspect
        outcome = f"{type(err).__name__}: {err}"
    _save(out, rank, outcome)


@pytest.mark.slow
def test_an_exception_on_one_rank_is_raised_on_every_rank(tmp_path):
    outcomes = _launch(_failing_worker, 2, tmp_path, False)
    for outcome in outcomes:
        assert outcome.startswith("RuntimeError: calibration failed on 1 of 2 ranks - rank 1"), outcome
        assert "corrupt file in batch 1" in outcome


@pytest.mark.slow
def test_a_rank_that_dies_makes_the_others_fail_not_hang(tmp_path):
    outcomes = _launch(_failing_worker, 2, tmp_path, True, timeout=10, expect_exit={1: 3})
    assert outcomes[1] is None
    assert outcomes[0].startswith("RuntimeError: calibration: lost the other ranks"), outcomes[0]


def _mismatch_worker(rank: int, world: int, out: Path) -> None:
    outcomes = []
    cal = HistogramCalibrator(8, None, False, num_bins=128 if rank == 0 else 256)  # built differently per rank
    cal.collect(torch.randn(100))
    try:
        all_reduce_calibrators([cal])
    except StatsMismatchError as err:
        outcomes.append(str(err))
    cal = MaxCalibrator()
    cal.collect(torch.randn(10))
    all_reduce_calibrators([cal])
    if rank == 1:
        cal.collect(torch.randn(10))  # more data after combining: combining again would count rank 0's twice
    try:
        all_reduce_calibrators([cal])
    except StatsMismatchError as err:
        outcomes.append(str(err))
    model = _calib_model()
    if rank == 1:
        model[0].input_quantizer.disable()
    qdq.collect_stats(model, _shard(_batches(), rank, world), progress=False)
    try:
        qdq.compute_amax(model)
    except StatsMismatchError as err:
        outcomes.append(str(err))
    _save(out, rank, outcomes)


@pytest.mark.slow
def test_mismatched_calibrators_fail_on_every_rank(tmp_path):
    outcomes = _launch(_mismatch_worker, 2, tmp_path)
    assert outcomes[0] == outcomes[1] and len(outcomes[0]) == 3, outcomes
    bins, again, model = outcomes[0]
    assert "rank 1 has num_bins=256, skip_zeros=False, rank 0 num_bins=128" in bins
    assert "rank 1 collected more data since" in again and "reset()" in again
    assert "differ across ranks - only on rank 0: ('0._input_quantizer', 'MaxCalibrator')" in model


# ------------------------------------------------------------------------------------------------------------------
# QAT under DistributedDataParallel, checkpoints
# ------------------------------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, out: Path) -> None:
    model = _calib_model()
    calibrate_model(model, _shard(_batches(), rank, world), progress=False)
    for layer in (model[0], model[2]):
        layer.input_quantizer.init_learn_amax()
    model[5].input_quantizer.init_learn_amax()
    model[5].input_quantizer.disable()  # a learned amax that gets no gradient: an unused parameter for DDP
    frozen = prepare_for_ddp(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)  # every rank trains on its own data
    for _ in range(3):
        x = torch.randn(8, 3, 8, 8, generator=g)
        loss = nn.functional.cross_entropy(ddp(x), torch.randint(0, 4, (8,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    checked = verify_synchronized(model)
    changed = {n: not torch.equal(before[n], p) for n, p in model.named_parameters()}
    # a checkpoint saved on rank 0 loads on every rank
    path = out / "checkpoint.pt"
    if rank == 0:
        torch.save(model.state_dict(), path)
    dist.barrier()
    fresh = _calib_model()
    fresh.load_state_dict(torch.load(path, map_location="cpu"))
    fresh[5].input_quantizer.disable()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    model.eval()
    fresh.eval()
    same_output = torch.equal(model(x), fresh(x))
    # switches are Python attributes: a rank that flips one is caught
    if rank == 1:
        model[2].weight_quantizer.disable_quant()
    try:
        verify_synchronized(model)
        caught = None
    except NotSynchronizedError as err:
        caught = str(err)
    _save(out, rank, {"frozen": frozen, "checked": checked, "changed": changed, "same_output": same_output,
                      "state": {k: v.clone() for k, v in model.state_dict().items()}, "caught": caught})


@pytest.mark.slow
def test_ddp_qat_keeps_ranks_identical_and_checkpoints_load_everywhere(tmp_path):
    ranks = _launch(_ddp_worker, 2, tmp_path)
    for r in ranks:
        assert r["frozen"] == ["5._input_quantizer"]
        assert r["checked"] > 0 and r["same_output"]
        assert r["changed"]["0._input_quantizer._amax"] and r["changed"]["2.weight"]
        assert not r["changed"]["5._input_quantizer._amax"]
        assert r["caught"] is not None and "only on rank 1: ('2._weight_quantizer'" in r["caught"]
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key


def test_prepare_for_ddp_refuses_learned_amax_before_calibration():
    model = nn.Sequential(quant_nn.QuantLinear(4, 4, quant_desc_input=QuantDescriptor(learn_amax=True)))
    with pytest.raises(RuntimeError, match="0._input_quantizer.*calibrate"):
        prepare_for_ddp(model)


# ------------------------------------------------------------------------------------------------------------------
# the graph side runs on rank 0
# ------------------------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = quant_nn.QuantConv2d(3, 4, 1), quant_nn.QuantConv2d(3, 4, 1)
        self.head = quant_nn.QuantConv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


def _graph_worker(rank: int, world: int, out: Path) -> None:
    import qdq.onnx.rules as rules

    calls = []
    real = rules.export_with_quantizer_tags

    def counting(*args, **kwargs):
        calls.append(str(args[2]))
        return real(*args, **kwargs)

    rules.export_with_quantizer_tags = counting
    model = _Block()
    pairs = rules.apply_custom_rules_to_quantizer(model, torch.randn(1, 3, 4, 4))
    shared = model.a._input_quantizer is model.b._input_quantizer
    calibrate_model(model, [torch.randn(2, 3, 4, 4) * (rank + 1)], progress=False)
    info = export_onnx_distributed(model, torch.randn(1, 3, 4, 4), out / "model.onnx")
    written = (out / "model.onnx").exists()
    try:
        export_onnx_distributed(_Block(), torch.randn(1, 3, 4, 4), out / "uncalibrated.onnx")
        failure = None
    except RuntimeError as err:
        failure = str(err)
    _save(out, rank, {"calls": calls, "pairs": pairs, "shared": shared, "info": info is not None,
                      "written": written, "amax": _state(model), "failure": failure})


@pytest.mark.slow
def test_rules_and_export_run_on_rank_zero(tmp_path):
    ranks = _launch(_graph_worker, 2, tmp_path)
    assert len(ranks[0]["calls"]) == 1 and ranks[1]["calls"] == []
    assert ranks[0]["pairs"] == ranks[1]["pairs"] == [("a._input_quantizer", "b._input_quantizer")]
    assert ranks[0]["shared"] and ranks[1]["shared"]
    assert ranks[0]["info"] and not ranks[1]["info"] and ranks[1]["written"]
    for name, st in ranks[0]["amax"].items():
        assert torch.equal(st["amax"], ranks[1]["amax"][name]["amax"])
    for r in ranks:
        assert r["failure"] is not None and "failed on rank 0" in r["failure"] and "has no amax" in r["failure"]
    assert not (tmp_path / "uncalibrated.onnx").exists()
