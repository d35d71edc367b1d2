"""Pre-training methods: the contract (`base.Method`), one module per method, and the registry.

A built-in method is a module of this package named after the method (`mae.py` is `method.name=mae`)
holding a `Method` subclass decorated with `@register`, plus its config `sweeps/conf/method/<name>.yaml`.
A method from outside the tree is a class in any installed package, declared as an entry point of the
group `mimsweep.methods` (`[project.entry-points."mimsweep.methods"] toy = "toy_mim.method:Toy"`); its
config is `<its package>/conf/method/<name>.yaml`, which the config search path picks up (core.config).
Nothing greps source files: built-ins are this package's modules, plug-ins are entry points.
May import: core.targets, core.vit, core.figures, core.config (never training, evaluation or tracking).
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from core.config import METHOD_ENTRY_POINTS as ENTRY_POINT_GROUP
from core.config import ConfigError
CONTRACT_MODULES = ("base",)          # modules of this package that are not methods

_REGISTRY: dict[str, type] = {}


def register(cls):
    """Class decorator: make `cls` (a core.methods.base.Method subclass) available as `method.name=<cls.name>`."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} needs a class attribute `name`")
    _REGISTRY[cls.name] = cls
    return cls


def builtin_names() -> list[str]:
    """The methods shipped here: the modules of this package, less the contract."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if not m.name.startswith("_") and m.name not in CONTRACT_MODULES)


def plugins() -> dict:
    """{method name: entry point} of the installed packages' `mimsweep.methods` entry points."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def names() -> list[str]:
    return sorted(set(builtin_names()) | set(plugins()) | set(_REGISTRY))


def get(name: str):
    """The Method class registered as `name`: a built-in module of this package, imported the first time,
    else an installed entry point of the group `mimsweep.methods`."""
    from core.methods.base import Method
    if name not in _REGISTRY and isinstance(name, str):
        if name in builtin_names():
            importlib.import_module(f"{__name__}.{name}")
            if name not in _REGISTRY:
                raise ImportError(f"core/methods/{name}.py registers no method named {name!r}: decorate its "
                                  f"Method subclass with @register and set name = {name!r}")
        elif name in plugins():
            ep = plugins()[name]
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Method)):
                raise ConfigError("method.name", name, f"names the entry point {ep.value!r} of the group "
                                  f"{ENTRY_POINT_GROUP}, which is not a core.methods.base.Method subclass")
            if cls.name != name:
                raise ConfigError("method.name", name, f"names the entry point {ep.value!r}, whose class says "
                                  f"name = {cls.name!r}", "Make the entry point's name and the class's name agree.")
            _REGISTRY.setdefault(name, cls)
    if name not in _REGISTRY:
        raise ConfigError("method.name", name, "must name a registered method (" + ", ".join(names()) + ")",
                          "A new method is a module core/methods/<name>.py with a @register'ed Method subclass "
                          "plus sweeps/conf/method/<name>.yaml, or an installed package's entry point in the "
                          f"group {ENTRY_POINT_GROUP}.")
    return _REGISTRY[name]


def uses_teacher(cfg) -> bool:
    """Whether the point's method builds a frozen teacher (its teacher_request is not None)."""
    return get(cfg.method.name).teacher_request(cfg) is not None
