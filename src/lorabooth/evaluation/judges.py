"""Which judges score the pictures, by name: "" is DINO and CLIP (the
paper's), any other name one registered here. The product's layers never
import the toy world; the command dispatch registers its judges ("toy") with
`register`, and `tune`, `sweep` and the studies load them with `load_judges`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..core.errors import UserError

if TYPE_CHECKING:
    from .embedders import Judges

_LOADERS: dict[str, Callable[[], Judges]] = {}


def register(name: str, loader: Callable[[], Judges]) -> None:
    """Make ``name`` load its judges with ``loader`` (called with no arguments)."""
    if not name:
        raise ValueError("the empty name is DINO and CLIP")
    _LOADERS[name] = loader


def names() -> list[str]:
    return sorted(_LOADERS)


def load_judges(name: str, dino: str, clip: str) -> Judges:
    """The judges called ``name``; "" is DINO ``dino`` and CLIP ``clip``."""
    if not name:
        from .embedders import default_judges

        return default_judges(dino, clip)
    if name not in _LOADERS:
        raise UserError(f"judges {name!r}: none by that name (known: {', '.join(names()) or 'none'})")
    return _LOADERS[name]()
