"""Typed module attributes: durable facts that print with the IR and parse back.

An attribute kind is a dataclass registered under a name with :func:`register_attribute`;
its text form is ``attr NAME = KIND JSON`` where JSON is produced by ``to_json`` and read by
``from_json`` (which validates). Higher layers add kinds (groups, saliency, keep masks,
training logs) and name them under the ``lorashear.attributes`` entry point group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

_ATTRIBUTE_KINDS: dict[str, type[Attribute]] = {}


class Attribute:
    """Base class of typed attributes; subclasses set ``kind`` and (de)serialise to JSON."""

    kind: ClassVar[str]

    def to_json(self) -> Any:
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: Any) -> Attribute:
        raise NotImplementedError


class RecordListAttr(Attribute):
    """Base of attributes that are a list of JSON records (training logs); the subclass names
    its one tuple field in ``records_field``."""

    records_field: ClassVar[str]

    def to_json(self) -> Any:
        return list(getattr(self, self.records_field))

    @classmethod
    def from_json(cls, data: Any) -> RecordListAttr:
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise ValueError(f"{cls.kind} must be a JSON list of objects")
        return cls(tuple(dict(d) for d in data))


def register_attribute(cls: type[Attribute]) -> type[Attribute]:
    """Class decorator: make an attribute kind printable and parseable by its ``kind``."""
    existing = _ATTRIBUTE_KINDS.get(cls.kind)
    if existing is not None and existing is not cls:
        raise ValueError(f"attribute kind {cls.kind!r} is already registered by {existing}")
    _ATTRIBUTE_KINDS[cls.kind] = cls
    return cls


#: The entry point group through which packages name their attribute kinds, so that any `.ir`
#: file parses in a fresh process: the module defining a kind need not have been imported by a
#: pipeline first. lorashear's own kinds (groups, saliency, masks, training logs) are declared
#: there too (pyproject.toml), so this layer names no module above it.
ENTRY_POINT_GROUP = "lorashear.attributes"


def attribute_kind(name: str) -> type[Attribute] | None:
    """The attribute class registered as ``name``; a kind not registered yet is looked up among
    the ``lorashear.attributes`` entry points and imported (which registers it)."""
    cls = _ATTRIBUTE_KINDS.get(name)
    if cls is None:
        import importlib.metadata

        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name):
            loaded = entry.load()
            if isinstance(loaded, type) and issubclass(loaded, Attribute):
                register_attribute(loaded)
        cls = _ATTRIBUTE_KINDS.get(name)
    return cls


def dump_json(data: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, so printing is deterministic."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


@register_attribute
@dataclass(frozen=True)
class HFConfigAttr(Attribute):
    """The Hugging Face config the model was lowered from (a plain JSON dict).

    Emission writes it back as ``config.json`` (updated with pruned sizes)."""

    kind: ClassVar[str] = "hf.config"
    config: dict

    def to_json(self) -> Any:
        return self.config

    @classmethod
    def from_json(cls, data: Any) -> HFConfigAttr:
        if not isinstance(data, dict):
            raise ValueError("hf.config must be a JSON object")
        return cls(data)

    def __hash__(self) -> int:
        return hash(dump_json(self.config))


@register_attribute
@dataclass(frozen=True)
class StoredTransposedAttr(Attribute):
    """Parameters that the IR holds ``[out, in]`` while the checkpoint stores them transposed
    (GPT-2's ``Conv1D`` weights, ``[in, out]``): the lowering turns such a layer into a
    ``linear`` so every pass sees one layout, and HF emission writes these names back in the
    checkpoint's layout."""

    kind: ClassVar[str] = "stored-transposed"
    params: tuple[str, ...]

    def to_json(self) -> Any:
        return list(self.params)

    @classmethod
    def from_json(cls, data: Any) -> StoredTransposedAttr:
        if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
            raise ValueError("stored-transposed must be a JSON list of parameter names")
        return cls(tuple(data))


@register_attribute
@dataclass(frozen=True)
class SourceAttr(Attribute):
    """Where the module came from: the model directory and the adapter, for the record."""

    kind: ClassVar[str] = "source"
    model: str
    adapter: str | None = None

    def to_json(self) -> Any:
        return {"model": self.model, "adapter": self.adapter}

    @classmethod
    def from_json(cls, data: Any) -> SourceAttr:
        if not isinstance(data, dict) or not isinstance(data.get("model"), str):
            raise ValueError("source needs a string 'model'")
        return cls(data["model"], data.get("adapter"))
