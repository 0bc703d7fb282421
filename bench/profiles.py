"""What each kind of run measures, and on how much data: ``full`` (``mistnet bench``), ``quick``
(``--quick``, under three minutes on a 2-core machine) and ``smoke`` (the test suite's seconds)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scenario:
    """A YOLOv5 size at an input size, cut after layer ``cut - 1`` (the reference example's 4)."""

    arch: str
    imgsz: int
    cut: int = 4

    @property
    def name(self) -> str:
        return f"{self.arch}@{self.imgsz}"


@dataclass(frozen=True)
class Profile:
    name: str
    scenarios: tuple[Scenario, ...]
    edges: int = 2
    edge_images: int = 128  # COCO128 images, shared out between the edges
    transfer_batch: int = 16  # samples per transfer (the job's edge batch_size)
    epsilon: float = 4.0  # p ≈ 0.881: randomized response really flips bits (at 100: 2^-64 of them)
    repeats: int = 3
    # Extractor optimisations switched one at a time, end to end (scenario list; empty: skipped).
    ablation: tuple[Scenario, ...] = ()
    ablation_images: int = 64
    ablation_repeats: int = 2
    transport_mib: int = 256
    transport_repeats: int = 5
    train: tuple[Scenario, ...] = ()
    train_images: int = 16
    train_batch: int = 8
    train_repeats: int = 3
    mnist_train_samples: int = 3000
    mnist_train_batch: int = 64
    memory_edge: Scenario = Scenario("yolov5s", 640)
    memory_images: int = 128
    memory_factor: int = 4
    memory_cloud: Scenario = Scenario("yolov5n", 320)
    memory_cloud_images: int = 32
    memory_cloud_validation: int = 4
    memory_cloud_train: bool = True  # False: the cloud's growth is measured while collecting only
    # The torch and onnx edge runtimes side by side: one edge with all the CPUs, end to end.
    runtimes: Scenario = Scenario("yolov5s", 640)
    runtime_images: int = 32
    runtime_repeats: int = 3
    scaling_edges: tuple[int, ...] = (1, 2, 4, 8)
    scaling_samples: int = 24000  # MNIST samples shared out between the edges (fixed total)
    scaling_repeats: int = 2
    # Tail training on 1..N DDP processes (bench.train_scaling; on CUDA: 1..every visible GPU).
    train_scaling_ranks: tuple[int, ...] = (1, 2)
    train_scaling_repeats: int = 3
    train_scaling_epochs: int = 3
    profile: bool = True  # cProfile (and py-spy when installed) of an edge and the cloud
    timeouts: dict[str, float] = field(default_factory=lambda: {"run": 900.0, "ready": 180.0})


FULL = Profile(
    name="full",
    scenarios=(Scenario("yolov5n", 640), Scenario("yolov5n", 320), Scenario("yolov5s", 640), Scenario("yolov5s", 320)),
    ablation=(Scenario("yolov5s", 640),),
    train=(Scenario("yolov5n", 320), Scenario("yolov5s", 320)),
)

QUICK = Profile(
    name="quick",
    scenarios=(Scenario("yolov5n", 320), Scenario("yolov5s", 320)),
    edge_images=32,
    repeats=2,
    transport_mib=32,
    transport_repeats=2,
    train=(Scenario("yolov5n", 320),),
    train_images=8,
    train_batch=4,
    train_repeats=2,
    mnist_train_samples=1000,
    memory_edge=Scenario("yolov5s", 320),
    memory_images=16,
    memory_cloud=Scenario("yolov5n", 128),
    memory_cloud_images=8,
    memory_cloud_validation=2,
    runtime_images=16,
    runtime_repeats=1,
    scaling_edges=(1, 2),
    scaling_samples=4000,
    scaling_repeats=1,
    train_scaling_repeats=1,
    train_scaling_epochs=2,
    profile=False,
    timeouts={"run": 300.0, "ready": 120.0},
)

SMOKE = Profile(
    name="smoke",
    scenarios=(Scenario("yolov5n", 64),),
    edges=1,
    edge_images=4,
    transfer_batch=2,
    repeats=1,
    transport_mib=2,
    transport_repeats=1,
    train=(Scenario("yolov5n", 64),),
    train_images=4,
    train_batch=2,
    train_repeats=1,
    mnist_train_samples=256,
    memory_edge=Scenario("yolov5n", 64),
    memory_images=2,
    memory_cloud=Scenario("yolov5n", 64),
    memory_cloud_images=2,
    memory_cloud_validation=2,
    memory_cloud_train=False,
    runtimes=Scenario("yolov5n", 64),
    runtime_images=2,
    runtime_repeats=1,
    scaling_edges=(1,),
    scaling_samples=128,
    scaling_repeats=1,
    train_scaling_ranks=(),  # torchrun's start-up alone would double the suite's benchmark test
    profile=False,
    timeouts={"run": 180.0, "ready": 120.0},
)

PROFILES = {p.name: p for p in (FULL, QUICK, SMOKE)}
