"""The weighting registry: weighting.method -> the class that implements it.

A method's name and how the loop treats it (`gram`, `split_gram`) are declared in
`cats_ds.config.METHODS`, below this package, so that the config check and the defaults
that depend on the method need no import of weighting/ (tests/test_layout.py: config.py
sits below weighting/). Here a class binds itself to a declared name:

    @register_method("cats")
    class CatsWeighting(Weighting):
        @classmethod
        def from_config(cls, cfg, languages, vocab_size=None): ...

`register_method` refuses a name METHODS does not declare and a second class for a name;
it sets the class's `name`. `method_class` is what `make_weighting` looks up.
"""

from __future__ import annotations

from cats_ds.config import METHODS

REGISTRY: dict[str, type] = {}
"""weighting.method -> its class (filled when the method modules are imported:
cats_ds/weighting/__init__.py imports them all)."""


def register_method(name: str):
    """Class decorator: `name` (declared in cats_ds.config.METHODS) is implemented by the class."""
    if name not in METHODS:
        raise ValueError(f"weighting method {name!r} is not declared in cats_ds.config.METHODS (declared: "
                         f"{', '.join(METHODS)}); add it there with its gram / split_gram flags")

    def bind(cls: type) -> type:
        if REGISTRY.get(name, cls) is not cls:
            raise ValueError(f"weighting method {name!r} is registered twice: {REGISTRY[name].__qualname__} and "
                             f"{cls.__qualname__}")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return bind


def method_class(name: str) -> type:
    """The class registered for weighting.method `name`."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"weighting.method={name!r} has no class registered (@register_method({name!r}) in a "
                         f"module cats_ds/weighting/__init__.py imports); registered: "
                         f"{', '.join(REGISTRY)}") from None
