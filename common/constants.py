"""Every tunable number and name of the system, in one place."""

from __future__ import annotations

from typing import Final

# Protocol ----------------------------------------------------------------------------------------
PROTOCOL_VERSION: Final = 1
TOPIC_ROOT = "mistnet/v1"
QOS = 1
SESSION_EXPIRY_S = 3600
KEEPALIVE_S = 15
# How long an agent keeps retrying an unreachable broker at start (it may still be starting).
CONNECT_TIMEOUT_S = 30.0
RECONNECT_MIN_DELAY_S = 1
RECONNECT_MAX_DELAY_S = 16

# Chunks stay far below mosquitto 2.1's default 2,000,000-byte max_packet_size.
DEFAULT_CHUNK_BYTES = 256 * 1024
MAX_CHUNK_BYTES = 1024 * 1024
# The smallest chunk size a job may set: a transfer of N bytes has at most ceil(N / this) chunks.
MIN_CHUNK_BYTES = 1024
ENVELOPE_OVERHEAD_BYTES = 512
# Application-level window: chunks sent but not yet acknowledged by the cloud (16 MiB at the default
# chunk size). The cloud acknowledges a transfer once it is committed, so the window must span a few
# transfers: 64 chunks moved 2-11% more than 16 on loopback (docs/benchmarks.md).
DEFAULT_WINDOW_CHUNKS = 64
# Resend a chunk whose acknowledgement has not arrived after this long.
RETRANSMIT_AFTER_S = 10.0
# Retrying a failed object-store upload: first delay, doubled up to the maximum.
STORE_RETRY_MIN_S = 1.0
STORE_RETRY_MAX_S = 30.0
# Objects at least this large are uploaded in parts of this size (S3 multipart upload; minimum 5 MiB).
MULTIPART_BYTES = 8 * 1024 * 1024
# Upper bounds checked before anything is allocated.
MAX_TRANSFER_BYTES = 256 * 1024 * 1024
MAX_CHUNKS_PER_TRANSFER = MAX_TRANSFER_BYTES // 1024
MAX_SAMPLES_PER_TRANSFER = 4096
MAX_FEATURE_ELEMENTS = 64 * 1024 * 1024
MAX_THRESHOLD_CHANNELS = 4096  # channels of one head output that may carry quantisation thresholds
MAX_JSON_MESSAGE_BYTES = 1024 * 1024
MAX_HEAD_BYTES = 512 * 1024 * 1024
MAX_ONNX_NODES = 10_000  # operators in a head graph an edge accepts (yolov5s up to cut 10: ~150)
# Head chunks an edge buffers for jobs it has no assignment for yet (retained order is not guaranteed).
MAX_UNASSIGNED_HEAD_BYTES = 64 * 1024 * 1024
# Object keys of the S3 transmitter (claim-check): at most this long.
MAX_OBJECT_KEY_CHARS = 1024

# Jobs --------------------------------------------------------------------------------------------
DEFAULT_EPSILON = 100.0
# privacy.bits: auto. The bits a job sends are the most of AUTO_BITS_CHOICES at which randomized response
# at the smallest edge ε replaces no larger share of the levels than 1 bit does at AUTO_BITS_EPSILON (12%):
# on coco-person contrast:5, 4 bits at ε 100 gave 94% of the centralized gain against 77% with 1 bit, and
# at ε 4 1 bit held (71%) where 4 bits fell below the start (docs/privacy-utility.md).
AUTO_BITS_CHOICES = (1, 2, 4)
AUTO_BITS_EPSILON = 4.0
# Below this ε the received samples held back to choose the epoch that ships are randomized too much to
# show what the deployed model (clean levels) does: on coco-person every epoch they chose at ε 2 and 1 scored
# below the start on held-out images (docs/privacy-utility.md). A job there without cloud.validation says so.
SELECTION_MIN_EPSILON = 4.0
DEFAULT_BATCH_SIZE = 32
DEFAULT_EPOCHS = 10
DEFAULT_LEARNING_RATE = 0.01
# Detection demos fine-tune on a few hundred images, which memorises them: at 0.01 held-out mAP collapses
# within a few epochs (shared/notes/mistnet-utility-measurements.md); 0.001, the Sedna example's rate, keeps it.
DETECTION_LEARNING_RATE = 0.001
DEFAULT_DECODER_EPOCHS = 10
# Images (spread over its dataset) an edge re-estimates its head's BatchNorm statistics on
# (model.head_statistics: local): one head pass over them, no more than extracting as many.
HEAD_STATISTICS_IMAGES = 256
DEFAULT_SELECTION_FRACTION = 0.1
DEFAULT_TRANSLATE_CELLS = 0  # cloud.translate: docs/privacy-utility.md measures it
# Fewer received samples than this: no selection split (too few to tell epochs apart), the last epoch ships.
MIN_SELECTION_SAMPLES = 20
DEFAULT_DECODER_WIDTH = 128
CUT_DECODER_ATTRIBUTE = "cut_decoder"  # the model attribute that holds the cut decoder, saved under this prefix
DEFAULT_DECODER_LEARNING_RATE = 2e-3
DEFAULT_COLLECT_TIMEOUT_S = 600.0
STATUS_INTERVAL_S = 1.0

# Training on several processes (``mistnet cloud --nproc-per-node``, torchrun): how long a collective
# may wait (rank 0 evaluates and checkpoints between epochs while the others wait in the next one),
# how often a rank waiting for rank 0's collection says so, and the environment variable naming a
# folder where every rank writes the (node, id) of the samples it trained on, per epoch (tests, debugging).
DDP_TIMEOUT_S = 3600.0
RANK_WAIT_LOG_S = 30.0
SAMPLE_LOG_ENV = "MISTNET_SAMPLE_LOG"
# Restarts of the training processes after one of them fails (``mistnet cloud --max-restarts``).
DEFAULT_MAX_RESTARTS = 3

# COCO-C corruptions (``mistnet data shift``, ``common.datasets.shift``) and their severities.
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)  # fmt: skip
SEVERITIES = range(1, 6)
