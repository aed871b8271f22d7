"""Class names and colours: the built-in datasets' tables, a default palette and class-file parsing.

A class file lists one class per line in id order, either ``name`` or ``name r g b`` (commas allowed), with
``#`` comments; or a JSON list of names or of ``{"name": ..., "color": [r, g, b]}`` objects. Entries named
``void``/``ignore`` are not classes: their colour marks ignored pixels (label 255) in RGB colour masks. Class
names (compared exactly) and class colours must be unique.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from maskworks.data.io import DatasetError

Color = tuple[int, int, int]

IGNORE_NAMES = frozenset({"void", "ignore", "__ignore__"})

CAMVID_CLASSES = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
CAMVID_PALETTE: tuple[Color, ...] = (
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
)
CAMVID_VOID_COLOR: Color = (0, 0, 0)

ISBI_CLASSES = ("cell", "membrane")
ISBI_PALETTE: tuple[Color, ...] = ((40, 40, 40), (255, 64, 64))


def default_palette(num_classes: int) -> list[Color]:
    """Deterministic, pairwise distinct colours: the PASCAL VOC colour map.

    Class 0 is black ``(0, 0, 0)``, class 1 ``(128, 0, 0)``, class 2 ``(0, 128, 0)``, ... (bits of the id are
    spread over the high bits of R, G and B).

    Args:
        num_classes: number of colours (>= 0, < 2**24).

    Returns:
        ``num_classes`` ``(r, g, b)`` tuples of ints in ``0..255``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or not 0 <= num_classes < 2**24:
        raise ValueError(f"num_classes must be an int in 0..2**24-1, got {num_classes!r}")
    colors = []
    for i in range(int(num_classes)):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors.append((r, g, b))
    return colors


def _parse_color(values: list, path: Path, where: str) -> Color:
    try:
        color = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        color = ()
    if len(color) != 3 or not all(0 <= c <= 255 for c in color):
        raise DatasetError(f"{path}: {where}: expected a colour of three integers 0..255, got {values!r}")
    return color  # type: ignore[return-value]


def _read_entries(path: Path) -> list[tuple[str, Color | None]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DatasetError(f"class file {path} does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read class file {path}: {e}; expected a UTF-8 text or JSON file") from e
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"cannot read class file {path}: {e}; expected a JSON list of class names") from e
        if not isinstance(data, list):
            raise DatasetError(
                f"{path}: expected a JSON list of names or {{'name', 'color'}} objects, got {type(data).__name__}"
            )
        entries = []
        for i, item in enumerate(data):
            if isinstance(item, str) and item.strip():
                entries.append((item.strip(), None))
            elif isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"].strip():
                color = item.get("color")
                name = item["name"].strip()
                entries.append((name, None if color is None else _parse_color(color, path, f"entry {i}")))
            else:
                raise DatasetError(
                    f"{path}: entry {i}: expected a non-empty name or {{'name', 'color'}} object, got {item!r}"
                )
        return entries
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) >= 4 and all(p.lstrip("-").isdigit() for p in parts[-3:]):
            entries.append((" ".join(parts[:-3]), _parse_color(parts[-3:], path, f"line {lineno}")))
        else:
            entries.append((line, None))
    return entries


def read_class_file(path: str | Path) -> tuple[list[str], list[Color] | None, list[Color]]:
    """Parse a class file (see the module docstring).

    Args:
        path: a ``.txt`` or ``.json`` class file.

    Returns:
        ``(class_names, colors, ignore_colors)``: ``colors`` is None when the file gives no colours; it must give
        one for every class or for none. ``ignore_colors`` are the colours of ``void``/``ignore`` entries.

    Raises:
        DatasetError: an unreadable file, no classes, colours for only some classes, a malformed colour, two classes
            with the same name or the same colour, or a class colour that is also a void/ignore colour. The message
            names the file.
    """
    path = Path(path)
    entries = _read_entries(path)
    classes = [(n, c) for n, c in entries if n.lower() not in IGNORE_NAMES]
    ignore_colors = [c for n, c in entries if n.lower() in IGNORE_NAMES and c is not None]
    if not classes:
        raise DatasetError(f"class file {path} lists no classes; expected one class name per line")
    with_color = [c is not None for _, c in classes]
    if any(with_color) and not all(with_color):
        missing = [n for n, c in classes if c is None]
        raise DatasetError(f"class file {path}: give a colour for every class or for none; missing for {missing}")
    _check_unique(path, classes, ignore_colors)
    colors = [c for _, c in classes] if all(with_color) else None
    return [n for n, _ in classes], colors, sorted(set(ignore_colors), key=ignore_colors.index)


def _check_unique(path: Path, classes: list[tuple[str, Color | None]], ignore_colors: list[Color]) -> None:
    """Class names and colours must be unique, and no class colour may also mark ignored pixels."""
    names: dict[str, int] = {}
    by_color: dict[Color, str] = {}
    for i, (name, color) in enumerate(classes):
        if name in names:
            raise DatasetError(
                f"class file {path}: class name {name!r} appears twice (classes {names[name]} and {i}); expected "
                f"unique class names"
            )
        names[name] = i
        if color is not None:
            if color in by_color:
                raise DatasetError(
                    f"class file {path}: classes {by_color[color]!r} and {name!r} share the colour {color}; expected "
                    f"one colour per class (a colour mask could not tell them apart)"
                )
            by_color[color] = name
    for color in ignore_colors:
        if color in by_color:
            raise DatasetError(
                f"class file {path}: colour {color} is both class {by_color[color]!r} and a void/ignore colour; "
                f"expected distinct colours"
            )
