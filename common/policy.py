"""An edge's privacy policy: the limits its owner sets, which no job assignment can raise.

In local differential privacy the data owner sets the noise. The cloud proposes a job (ε, bits,
model, cut); an edge whose policy the job exceeds refuses it before reading a single image. The
same model checks a job file offline (``mistnet job validate --policy FILE``). Every limit is
optional: the default policy accepts every job, as edges did before policies existed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.errors import SpecError

if TYPE_CHECKING:
    from common.jobspec import JobSpec

# Environment variables of ``mistnet edge`` (its flags win over them), by policy field.
ENV = {
    "max_epsilon": "MISTNET_MAX_EPSILON",
    "min_cut_layer": "MISTNET_MIN_CUT_LAYER",
    "allow_arch": "MISTNET_ALLOW_ARCH",
    "max_bits": "MISTNET_MAX_BITS",
}


class EdgePolicy(BaseModel):
    """Limits an edge puts on the jobs it runs; None: no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_epsilon: float | None = Field(
        default=None, gt=0, description="largest ε per activation the edge accepts (less ε: more noise)"
    )
    min_cut_layer: int | None = Field(
        default=None, ge=1, description="the edge runs at least this many layers before anything leaves it"
    )
    allow_arch: tuple[str, ...] | None = Field(
        default=None, min_length=1, description="model architectures the edge runs"
    )
    max_bits: int | None = Field(default=None, ge=1, le=8, description="most bits per activation the edge sends")

    @field_validator("allow_arch", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(a.strip() for a in value.split(",") if a.strip())
        return value

    def violations(self, arch: str, cut_layer: int, epsilon: float, bits: int) -> list[str]:
        """Why a job with these settings is outside the policy (empty: inside). Plain words, no
        paths: a refusal is published on the broker."""
        out = []
        if self.max_epsilon is not None and not epsilon <= self.max_epsilon:
            out.append(f"epsilon {epsilon:g} exceeds this edge's limit {self.max_epsilon:g}")
        if self.min_cut_layer is not None and cut_layer < self.min_cut_layer:
            out.append(f"cut_layer {cut_layer} is below this edge's minimum {self.min_cut_layer}")
        if self.allow_arch is not None and arch not in self.allow_arch:
            out.append(f"model {arch} is not among this edge's allowed architectures ({', '.join(self.allow_arch)})")
        if self.max_bits is not None and bits > self.max_bits:
            out.append(f"{bits} bits per activation exceed this edge's limit {self.max_bits}")
        return out

    def describe(self) -> str:
        limits = [f"{k}={_shown(v)}" for k, v in self.model_dump().items() if v is not None]
        return ", ".join(limits) or "no limits"


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def build_policy(values: Mapping[str, object], where: str) -> EdgePolicy:
    """An EdgePolicy from untrusted values, or SpecError naming the field and ``where`` it came from."""
    try:
        return EdgePolicy.model_validate(dict(values))
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "policy"
        raise SpecError(f"{where}: {field}: {err['msg']}") from None


def policy_from_env(flags: Mapping[str, object], environ: Mapping[str, str] = os.environ) -> EdgePolicy:
    """The edge's policy: each limit from its flag when given, else from its MISTNET_* variable."""
    values: dict[str, object] = {k: environ[v] for k, v in ENV.items() if environ.get(v, "").strip()}
    values.update({k: v for k, v in flags.items() if v is not None})
    return build_policy(values, "edge policy (flags and MISTNET_* environment)")


def load_policy(path: Path) -> EdgePolicy:
    """A policy file: YAML (or JSON) with any of max_epsilon, min_cut_layer, allow_arch, max_bits."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise SpecError(f"policy file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"policy file {path}: not valid YAML ({exc})") from None
    if not isinstance(data, Mapping):
        raise SpecError(f"policy file {path}: must be a mapping of limits ({', '.join(ENV)})")
    return build_policy(data, f"policy file {path}")


def job_violations(spec: JobSpec, policy: EdgePolicy) -> dict[str, list[str]]:
    """Per edge of a job, why an edge with this policy would refuse its assignment."""
    found = {
        edge.node: policy.violations(spec.model.arch, spec.cut_layer, spec.epsilon_for(edge.node), spec.bits)
        for edge in spec.edges
    }
    return {node: reasons for node, reasons in found.items() if reasons}
