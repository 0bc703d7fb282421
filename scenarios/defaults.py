"""The scenarios' data beside a checkout and the numbers `mistnet demo` and the benchmarks share."""

from __future__ import annotations

from pathlib import Path

# The read-only data beside a checkout (COCO128, the official yolov5n weights): the commands' defaults.
SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_COCO128 = SHARED / "data" / "coco128"
DEFAULT_COCO_PERSON = SHARED / "data" / "coco-person"
DEFAULT_PUBLIC_IMAGES = SHARED / "data" / "public-images"
DEFAULT_YOLO_WEIGHTS = SHARED / "weights" / "yolov5n.pt"

MNIST_EPOCHS = 6
MNIST_CUT = 2
COCO_EPOCHS = 10
COCO_CUT = 4  # edges run layers 0-3, as the reference example
COCO_IMAGE_SIZE = 320
COCO_HELD_OUT = 32
COCO_PUBLIC = 32  # the cloud's public images: threshold calibration and cut decoder (privacy-utility.md)
PERSON_HELD_OUT = 200  # of coco-person's 800 images; the other 600 go to the edges
PERSON_EPOCHS = 6  # held-out AP levels off after 4-5 epochs on 540 images (bench.person)
COCO_BATCH_SIZE = 16
COCO_TRANSFER_SAMPLES = 16
