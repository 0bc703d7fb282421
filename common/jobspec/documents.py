"""The YAML documents of a job file, and where each value in them came from.

Both readers build on these, the native one (:mod:`common.jobspec.jobfile`) and the Sedna one
(:mod:`common.jobspec.sedna`): a :class:`Document` keeps the YAML node tree for line numbers and an
:class:`Origin` names the document, path and line a value came from, so every problem is reported
where the user wrote it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.errors import SpecError
from common.jobspec.spec import Loc, format_loc, show_value

NATIVE_KIND = "MistNetJob"
NATIVE_API_VERSION = "mistnet/v1"
MAX_JOB_FILE_BYTES = 1024 * 1024
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


# Documents and where values come from --------------------------------------------------------------


@dataclass(eq=False)
class Document:
    """One YAML document of a file: its data and its node tree (for line numbers)."""

    source: str
    index: int  # 1-based position in the file, counting empty documents
    data: Any
    node: yaml.Node | None = None

    def line(self, path: Sequence[str | int]) -> int | None:
        """1-based line of the deepest node along ``path`` that exists."""
        node = self.node
        if node is None:
            return None
        line = node.start_mark.line + 1
        for part in path:
            nxt: yaml.Node | None = None
            if isinstance(node, yaml.MappingNode) and isinstance(part, str):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == part:
                        nxt = value
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
                nxt = node.value[part]
            if nxt is None:
                break
            node = nxt
            line = node.start_mark.line + 1
        return line

    @property
    def label(self) -> str:
        data = self.data
        if not isinstance(data, Mapping):
            return f"document #{self.index}"
        kind = data.get("kind")
        meta = data.get("metadata")
        name = meta.get("name") if isinstance(meta, Mapping) else None
        if is_native(data):
            kind, name = NATIVE_KIND, data.get("name")
        if isinstance(kind, str) and kind:
            return f"{kind}/{name}" if isinstance(name, str) and name else f"{kind} (document #{self.index})"
        return f"document #{self.index}"


@dataclass(frozen=True)
class Origin:
    """Where a value came from: a document, the path shown to the user, and the raw value."""

    doc: Document
    path: Loc = ()
    label: str | None = None  # overrides doc.label (e.g. an item of a List)
    field: str | None = None  # shown after the path, e.g. an env variable's name
    line_path: Loc | None = None  # path used for the line number; defaults to ``path``
    value: Any = UNSET  # the value as the user wrote it

    def line(self) -> int | None:
        return self.doc.line(self.line_path if self.line_path is not None else self.path)

    def what(self) -> str:
        """``Kind/name path field`` without file or line."""
        parts = [self.label or self.doc.label, format_loc(self.path), self.field or ""]
        return " ".join(p for p in parts if p)

    def where(self) -> str:
        line = self.line()
        return f"{self.doc.source}:{line}: {self.what()}" if line else f"{self.doc.source}: {self.what()}"

    def brief(self) -> str:
        line = self.line()
        return f"{self.what()} (line {line})" if line else self.what()

    def message(self, problem: str, value: Any = UNSET) -> str:
        shown = self.value if value is UNSET else value
        prefix = "" if shown is UNSET else show_value(shown) + " "
        return f"{self.where()}: {prefix}{problem}"

    def error(self, problem: str, value: Any = UNSET) -> SpecError:
        return SpecError(self.message(problem, value))


OriginFor = Callable[[Loc], Origin]


# Reading YAML ----------------------------------------------------------------------------------------


def read_text(path: str | Path) -> str:
    p = Path(path)
    try:
        if p.is_dir():
            raise SpecError(f"{p}: is a directory, not a job file")
        size = p.stat().st_size
        if size > MAX_JOB_FILE_BYTES:
            raise SpecError(f"{p}: {size} bytes is too large for a job file (limit {MAX_JOB_FILE_BYTES})")
        raw = p.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{p}: no such job file") from None
    except OSError as exc:
        raise SpecError(f"{p}: cannot read the job file: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{p}: not UTF-8 text (bad byte at offset {exc.start})") from None


def read_documents(text: str, source: str = "<string>") -> list[Document]:
    """Every document of a YAML stream, empty ones included (``data`` None)."""
    if len(text) > MAX_JOB_FILE_BYTES:
        raise SpecError(f"{source}: too large for a job file (limit {MAX_JOB_FILE_BYTES} bytes)")
    docs: list[Document] = []
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters first: may raise ReaderError
        while loader.check_node():
            node = loader.get_node()
            _check_duplicate_keys(node, source)
            data = loader.construct_document(node) if node is not None else None
            docs.append(Document(source, len(docs) + 1, data, node))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = "; ".join(p for p in (exc.context, exc.problem) if p) or str(exc)
        raise SpecError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise SpecError(f"{source}:{line}: YAML error: character #x{exc.character:04x} is not allowed") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: YAML error: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise SpecError(f"{source}: YAML nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:
        # e.g. a timestamp like 2001-13-45, which the YAML resolver accepts but datetime rejects
        raise SpecError(f"{source}: unreadable YAML value: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return docs


def _check_duplicate_keys(root: yaml.Node | None, source: str) -> None:
    """PyYAML keeps the last of duplicate keys silently; kubectl and we reject them."""
    stack = [root] if root is not None else []
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                    ident = (key.tag, key.value)
                    line = key.start_mark.line + 1
                    if ident in keys:
                        raise SpecError(f"{source}:{line}: duplicate key {key.value!r} (first at line {keys[ident]})")
                    keys[ident] = line
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def is_native(data: Mapping[Any, Any]) -> bool:
    """Whether a document is a native job: kind MistNetJob or apiVersion mistnet/v1, or neither given."""
    kind, api = data.get("kind"), data.get("apiVersion")
    if kind == NATIVE_KIND or api == NATIVE_API_VERSION:
        return True
    return kind is None and api is None
