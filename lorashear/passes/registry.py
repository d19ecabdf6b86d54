"""The pass registry: names -> pass classes, from built-ins, entry points and plugin files.

Built-in passes are imported lazily (a name maps to ``module:Class``) so that listing or
parsing a pipeline does not import every pass. Third-party packages add passes through the
``lorashear.passes`` entry point group; a single file adds them with ``--load-pass-plugin``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from lorashear.errors import PassError, PluginError
from lorashear.passes.base import ModulePass

#: Built-in passes: name -> "module:Class", imported on first use.
BUILTIN_PASSES: dict[str, str] = {
    "dce": "lorashear.passes.dce:DeadCodeElimination",
    "saliency": "lorashear.passes.saliency:Saliency",
    "prune": "lorashear.passes.prune:Prune",
    "merge-lora": "lorashear.passes.merge_lora:MergeLora",
    "lora": "lorashear.passes.lora:Lora",
    "discover": "lorashear.passes.discover:Discover",
    "compress": "lorashear.passes.compress:Compress",
    "lhspg": "lorashear.passes.lhspg:Lhspg",
    "knowledge": "lorashear.passes.knowledge:Knowledge",
    "recover": "lorashear.passes.recover:Recover",
    "reconstruct": "lorashear.passes.reconstruct:Reconstruct",
    "kv-cache": "lorashear.passes.kv_cache:KVCache",
}

_registered: dict[str, type[ModulePass]] = {}
_entry_points_loaded = False


def register_pass(cls: type[ModulePass]) -> type[ModulePass]:
    """Class decorator: make a pass available by its ``name`` in pipelines."""
    if not isinstance(cls, type) or not issubclass(cls, ModulePass):
        raise TypeError("register_pass expects a ModulePass subclass")
    name = cls.name
    if not name or name != name.lower() or " " in name:
        raise PassError(f"pass class {cls.__qualname__} needs a kebab-case `name`, got {name!r}")
    existing = _registered.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise PassError(f"pass name {name!r} is taken by {existing.__module__}.{existing.__qualname__}")
    _registered[name] = cls
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group="lorashear.passes"):
        try:
            cls = ep.load()
        except Exception as exc:
            raise PluginError(f"entry point {ep.name} = {ep.value} (lorashear.passes) fails to "
                              f"load: {exc}") from exc
        register_pass(cls)


def available_passes() -> list[str]:
    """Every pass name known now (built-ins, entry points, loaded plugins), sorted."""
    _load_entry_points()
    return sorted(set(BUILTIN_PASSES) | set(_registered))


def get_pass(name: str) -> type[ModulePass]:
    """The pass class registered as ``name``; an unknown name suggests the closest one."""
    cls = _registered.get(name)
    if cls is not None:
        return cls
    target = BUILTIN_PASSES.get(name)
    if target is not None:
        module_name, _, class_name = target.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        if cls.name != name:
            raise PassError(f"built-in pass {target} is registered as {name!r} but is named {cls.name!r}")
        _registered[name] = cls
        return cls
    _load_entry_points()
    if name in _registered:
        return _registered[name]
    close = difflib.get_close_matches(name, available_passes(), n=1)
    hint = f"did you mean '{close[0]}'?" if close else "see lorashear-opt --list-passes"
    raise PassError(f"unknown pass {name!r}", hint=hint)


def load_pass_plugin(path: str | Path) -> list[str]:
    """Import a Python file that defines passes; return the names it registered.

    Classes decorated with :func:`register_pass` register themselves; any other
    :class:`ModulePass` subclass with a ``name`` defined in the file is registered too.
    """
    path = Path(path)
    if not path.is_file():
        raise PluginError(f"pass plugin {path} does not exist")
    before = dict(_registered)
    module_name = f"lorashear_plugin_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"pass plugin {path} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise PluginError(f"pass plugin {path} fails to import: {type(exc).__name__}: {exc}") from exc
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, ModulePass) and obj is not ModulePass \
                and obj.__module__ == module_name and obj.name:
            register_pass(obj)
    added = sorted(n for n, c in _registered.items() if before.get(n) is not c)
    if not added:
        raise PluginError(f"pass plugin {path} defines no pass",
                          hint="define a ModulePass subclass with a `name` (and @register_pass)")
    return added
