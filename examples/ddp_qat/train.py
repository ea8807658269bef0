"""Distributed PTQ and QAT of a CIFAR-10 ResNet with DistributedDataParallel: one amax on every rank.

Run it with torchrun (see README.md beside this file)::

    python -m torch.distributed.run --standalone --nproc_per_node=2 examples/ddp_qat/train.py --tiny   # CPU, gloo
    torchrun --standalone --nproc_per_node=8 examples/ddp_qat/train.py --device cuda                  # GPUs, NCCL

What every rank does, on its own shard of the data (``DistributedSampler``):

1. builds the same CIFAR ResNet (torchvision ``BasicBlock`` stages, a 3x3 stem for 32x32 images) from the same
   seed, optionally trains it in float for ``--float-steps`` steps under DDP;
2. quantizes it (:func:`qdq.replace_to_quantization_module`, the ResNet residual-add recipe) and matches scales
   with :func:`qdq.apply_custom_rules_to_quantizer`: rank 0 exports and reads the graph, every rank applies the pairs;
3. calibrates (:func:`qdq.calibrate_model`): each rank collects statistics on its own images, the ranks combine
   them, and every rank ends with the same amax, that of all the ranks' images;
4. runs QAT under ``DistributedDataParallel`` (:func:`qdq.distributed.prepare_for_ddp` first), checks that the
   ranks are still identical, evaluates on the test split (sharded, counts summed);
5. saves a checkpoint on rank 0 and loads it on every rank, then exports the QDQ ONNX model on rank 0
   (:func:`qdq.onnx.export.export_onnx_distributed`) and runs the TensorRT rule checker on it.

The weights start from a random initialisation: the example shows the mechanics, not an accuracy (give it
``--float-steps`` and a few thousand ``--max-steps`` on GPUs for a meaningful model).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (torchrun examples/ddp_qat/train.py): import from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from torch.utils.data.distributed import DistributedSampler  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402
from torchvision.models.resnet import BasicBlock  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import qdq  # noqa: E402
from examples.common import first_per_class  # noqa: E402
from qdq.distributed import broadcast_buffers, prepare_for_ddp, run_on_rank0, verify_synchronized  # noqa: E402
from qdq.onnx.check import check_tensorrt  # noqa: E402
from qdq.onnx.export import export_onnx_distributed  # noqa: E402
from qdq.transform.qat import freeze_bn_stats  # noqa: E402
from qdq.rules import apply_resnet_rules  # noqa: E402
from qdq.transform.switches import quantizers  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = Path(os.environ.get("QDQ_SHARED_DATA", REPO.parent / "shared" / "data")) / "cifar10-jpeg.tar.gz"
DEFAULT_OUT = Path(tempfile.gettempdir()) / "qdq-examples" / "ddp_qat"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

logger = logging.getLogger("ddp_qat")


# ------------------------------------------------------------------------------------------------------------------
# model and data
# ------------------------------------------------------------------------------------------------------------------
class CifarResNet(nn.Module):
    """A ResNet for 32x32 images: a 3x3 stem (no max pooling), three stages of torchvision ``BasicBlock``s."""

    def __init__(self, blocks: int = 2, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        stages, inplanes = [], widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers = []
            for b in range(blocks):
                down = None
                if b == 0 and (stride != 1 or inplanes != planes):
                    down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
                layers.append(BasicBlock(inplanes, planes, stride if b == 0 else 1, down))
                inplanes = planes
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def extract_cifar(archive: Path, limit_per_class: int | None) -> Path:
    """Extracts CIFAR-10 (the first ``limit_per_class`` images of each class and split) into a new temporary folder.

    Runs on one rank (see :func:`run`), which removes the folder at the end; returns the ``cifar10`` folder holding
    ``train/`` and ``test/``. For repeated runs, extract once yourself and pass the folder with ``--data``.
    """
    dest = Path(tempfile.mkdtemp(prefix="qdq-ddp-cifar10-"))
    taken: dict[str, int] = {}
    with tarfile.open(archive) as tar:
        members = []
        for member in tqdm(tar, desc="Extracting", unit="file", leave=False, disable=limit_per_class is not None):
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 4 and parts[3].lower().endswith(".jpg"):
                key = "/".join(parts[:3])
                if limit_per_class is not None and taken.get(key, 0) >= limit_per_class:
                    continue
                taken[key] = taken.get(key, 0) + 1
                members.append(member)
        tar.extractall(dest, members=members, filter="data")
    root = dest / "cifar10"
    logger.info("extracted %d images into %s", len(members), root)
    return root


def datasets_for(root: Path, limit: int | None) -> tuple[torch.utils.data.Dataset, ...]:
    normalize = transforms.Normalize(MEAN, STD)
    augment = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                  transforms.ToTensor(), normalize])
    plain = transforms.Compose([transforms.ToTensor(), normalize])
    train = first_per_class(datasets.ImageFolder(str(root / "train"), augment), limit)
    calib = first_per_class(datasets.ImageFolder(str(root / "train"), plain), limit)
    test = first_per_class(datasets.ImageFolder(str(root / "test"), plain), limit)
    return train, calib, test


# ------------------------------------------------------------------------------------------------------------------
# the steps
# ------------------------------------------------------------------------------------------------------------------
def train_steps(ddp: DistributedDataParallel, loader: DataLoader, sampler: DistributedSampler, steps: int,
                lr: float, device: torch.device, what: str, rank: int, freeze_bn: bool = False) -> float:
    """``steps`` SGD steps (cosine learning rate) on the ranks' shards; returns the last loss averaged over ranks.

    ``freeze_bn`` keeps the BatchNorm running statistics (the QAT recipe: TensorRT folds BN with them), which also
    keeps them identical on every rank.
    """
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                                weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    ddp.train()
    if freeze_bn:
        freeze_bn_stats(ddp.module)
    step, epoch, loss = 0, 0, torch.zeros((), device=device)
    with tqdm(total=steps, desc=what, unit="step", disable=rank != 0, leave=False) as bar:
        while step < steps:
            sampler.set_epoch(epoch)  # a new shuffle per epoch, the same on every rank
            for images, labels in loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                loss = nn.functional.cross_entropy(ddp(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                bar.update(1)
                if step >= steps:
                    break
            epoch += 1
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return mean.item() / dist.get_world_size()


@torch.no_grad()
def evaluate(model: nn.Module, test: torch.utils.data.Dataset, batch_size: int, device: torch.device) -> float:
    """Top-1 accuracy over the whole test split: each rank scores every world_size-th image, counts are summed."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = Subset(test, range(rank, len(test), world))  # no padding, unlike DistributedSampler: exact counts
    model.eval()
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    for images, labels in tqdm(DataLoader(shard, batch_size=batch_size), desc="Evaluating", disable=rank != 0,
                               leave=False):
        logits = model(images.to(device))
        counts[0] += (logits.argmax(1) == labels.to(device)).sum()
        counts[1] += labels.numel()
    dist.all_reduce(counts)
    return counts[0].item() / max(1, counts[1].item())


def say(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        for key, value in (("limit_images", 20), ("max_steps", 4), ("batch_size", 16), ("calib_batches", 2)):
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.max_steps = 200 if args.max_steps is None else args.max_steps
    args.batch_size = 128 if args.batch_size is None else args.batch_size
    args.calib_batches = 16 if args.calib_batches is None else args.calib_batches
    rank_tag = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"[rank {rank_tag}] %(name)s: %(message)s")

    device_kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = args.backend or ("nccl" if device_kind == "cuda" else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)  # before any collective: NCCL and qdq's collectives use this device
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        run(args, rank, world, device)
    finally:
        dist.destroy_process_group()
    return 0


def run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    say(rank, f"{world} ranks, backend {dist.get_backend()}, device {device.type}")
    # data: one rank extracts, every rank reads (on one machine; several machines need --data on a shared folder)
    data = Path(args.data)
    if data.is_dir():
        root = data / "cifar10" if (data / "cifar10").is_dir() else data
        qat(args, rank, world, device, root, args.limit_images)
        return
    root = run_on_rank0(extract_cifar, data, args.limit_images, broadcast_result=True, what="extracting CIFAR-10")
    try:
        qat(args, rank, world, device, root, None)  # the extraction already kept only --limit-images per class
    finally:
        if rank == 0:  # every rank has passed the last collective (the export) or failed: nobody reads any more
            shutil.rmtree(root.parent, ignore_errors=True)


def qat(args: argparse.Namespace, rank: int, world: int, device: torch.device, root: Path, limit: int | None) -> None:
    t0 = time.perf_counter()
    train_set, calib_set, test_set = datasets_for(root, limit)
    workdir = Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    say(rank, f"data: {len(train_set)} train / {len(test_set)} test images under {root}; output in {workdir}")

    train_sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed, drop_last=True)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler,
                              num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True)

    # 1. the same float model on every rank (same seed); DDP also broadcasts rank 0's weights when it wraps
    torch.manual_seed(args.seed)
    model = CifarResNet(blocks=args.blocks).to(device)
    if args.float_steps:
        loss = train_steps(DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None),
                           train_loader, train_sampler, args.float_steps, args.lr, device, "float training", rank)
        broadcast_buffers(model)  # each rank's BatchNorm statistics saw its own last batch: take rank 0's
        say(rank, f"float: {args.float_steps} steps, loss {loss:.3f}, "
                  f"top-1 {evaluate(model, test_set, args.batch_size, device):.3f}")

    # 2. quantize, residual-add recipe, scale matching (rank 0 exports and reads the graph, every rank applies)
    qdq.replace_to_quantization_module(model)
    apply_resnet_rules(model)
    example = torch.randn(1, 3, 32, 32, device=device)
    pairs = qdq.apply_custom_rules_to_quantizer(model, example)
    say(rank, f"rules: {len(pairs)} quantizer pairs share a scale")

    # 3. calibration: every rank its own shard; the statistics are combined, every rank gets the union's amax
    calib_sampler = DistributedSampler(calib_set, shuffle=True, seed=args.seed + 1)
    calib_loader = DataLoader(calib_set, batch_size=args.batch_size, sampler=calib_sampler, num_workers=args.workers)
    report = qdq.calibrate_model(model, calib_loader, num_batches=args.calib_batches, method=args.method,
                                 progress=rank == 0)
    say(rank, f"calibrated {report.calibrated} quantizers with {args.method!r} on {report.batches} batches per rank; "
              f"this rank sent {report.sync.bytes_sent} bytes "
              f"({report.sync.bytes_sent / max(1, report.sync.quantizers):.0f} per quantizer) in "
              f"{report.sync.seconds * 1000:.1f} ms")
    checked = verify_synchronized(model)
    say(rank, f"amax identical on {world} ranks ({checked} tensors compared)")
    ptq_top1 = evaluate(model, test_set, args.batch_size, device)
    say(rank, f"PTQ top-1 {ptq_top1:.3f}")

    # 4. QAT under DDP
    if args.learn_amax:
        for _, q in quantizers(model):
            if q.is_enabled and q.amax is not None and q.axis is None:
                q.init_learn_amax()
    frozen = prepare_for_ddp(model)
    if frozen:
        say(rank, f"froze the learned amax of {len(frozen)} disabled quantizers")
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss = train_steps(ddp, train_loader, train_sampler, args.max_steps, args.lr * args.qat_lr_scale, device, "QAT",
                       rank, freeze_bn=True)
    verify_synchronized(model)
    qat_top1 = evaluate(model, test_set, args.batch_size, device)
    say(rank, f"QAT: {args.max_steps} steps, loss {loss:.3f}, top-1 {qat_top1:.3f}; models identical on {world} ranks")

    # 5. checkpoint on rank 0, loaded on every rank; export on rank 0
    checkpoint = workdir / "qat_checkpoint.pt"
    if rank == 0:
        torch.save(model.state_dict(), checkpoint)
    dist.barrier()
    model.load_state_dict(torch.load(checkpoint, map_location=device))
    verify_synchronized(model)
    say(rank, f"checkpoint {checkpoint} saved on rank 0, loaded on {world} ranks")
    info = export_onnx_distributed(model, example, workdir / "resnet_qdq.onnx")
    if rank == 0:
        findings = check_tensorrt(info.model)
        errors = [f for f in findings if f.severity == "error"]
        print(f"exported {info.path}: {info.num_qdq_pairs} Q/DQ pairs; check_tensorrt: {len(errors)} errors, "
              f"{len(findings) - len(errors)} warnings/info", flush=True)
        for finding in findings[:10]:
            print(f"  {finding}", flush=True)
    say(rank, f"done in {time.perf_counter() - t0:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="cifar10-jpeg.tar.gz, or a folder holding cifar10/{train,test} (default: %(default)s)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="checkpoint and ONNX folder (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true",
                        help="a quick run: 20 images per class, 4 QAT steps, batch 16, 2 calibration batches per rank")
    parser.add_argument("--limit-images", type=int, default=None, help="images per class and split")
    parser.add_argument("--max-steps", type=int, default=None, help="QAT steps (default 200)")
    parser.add_argument("--float-steps", type=int, default=0, help="float training steps before quantization")
    parser.add_argument("--batch-size", type=int, default=None, help="per rank (default 128)")
    parser.add_argument("--calib-batches", type=int, default=None, help="calibration batches per rank (default 16)")
    parser.add_argument("--method", default="entropy",
                        choices=["max", "entropy", "mse", "percentile", "kld"], help="calibration method")
    parser.add_argument("--learn-amax", action="store_true", help="learn the activation amax in QAT")
    parser.add_argument("--lr", type=float, default=0.1, help="float learning rate")
    parser.add_argument("--qat-lr-scale", type=float, default=0.01, help="QAT learning rate = lr * this")
    parser.add_argument("--blocks", type=int, default=2, help="BasicBlocks per stage")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--backend", default=None, help="default: nccl on cuda, gloo on cpu")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    parser.add_argument("--timeout", type=float, default=600, help="process group timeout in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="log qdq's INFO messages")
    return parser


if __name__ == "__main__":
    sys.exit(main())
