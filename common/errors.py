"""Errors a user can cause: the CLI prints them as one clear line, never as a traceback."""

from __future__ import annotations


class MistnetError(Exception):
    """Base of every error caused by input, configuration or environment (not by a bug)."""


class SpecError(MistnetError):
    """A job specification is invalid; the message names document, field and problem."""


class ProtocolError(MistnetError):
    """A message on the wire is malformed; the message says why it was rejected."""


class CheckpointError(MistnetError):
    """A model file cannot be read safely or does not fit the architecture."""


class DatasetError(MistnetError):
    """A dataset path or its contents are unusable."""


class TransportError(MistnetError):
    """The broker or the object store cannot be reached or refused us."""


class JobCancelled(MistnetError):
    """The job was called off while it ran: an operator cancelled it (``mistnet job cancel``), and on an
    edge also when the cloud withdrew it or the edge's policy refused it. Its agent stops the job, not itself."""
