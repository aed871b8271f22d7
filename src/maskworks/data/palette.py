"""Class names and colours: the built-in datasets' tables (CamVid, ISBI 2012, Pascal VOC, Cityscapes, ADE20K,
COCO-Stuff), a default palette and class-file parsing.

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


# Pascal VOC 2012 (Everingham et al., 2010): 20 object classes and background.
VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
# The VOC colour map is default_palette (bit-interleaved ids); palette index 255 (224, 224, 192) marks the object
# borders that VOC ignores.
VOC_PALETTE: tuple[Color, ...] = tuple(default_palette(len(VOC_CLASSES)))
VOC_BORDER_COLOR: Color = default_palette(256)[255]

# Cityscapes (Cordts et al., 2016): the official label table of cityscapesScripts (helpers/labels.py) as
# (label id, train id, name, colour); train id 255 = ignored in training and evaluation. The "license plate" label
# has id -1 (train id -1 there, ignored here) and is never written into *_labelIds.png files: its pixels keep the
# vehicle's id.
CITYSCAPES_LABELS: tuple[tuple[int, int, str, Color], ...] = (
    (0, 255, "unlabeled", (0, 0, 0)),
    (1, 255, "ego vehicle", (0, 0, 0)),
    (2, 255, "rectification border", (0, 0, 0)),
    (3, 255, "out of roi", (0, 0, 0)),
    (4, 255, "static", (0, 0, 0)),
    (5, 255, "dynamic", (111, 74, 0)),
    (6, 255, "ground", (81, 0, 81)),
    (7, 0, "road", (128, 64, 128)),
    (8, 1, "sidewalk", (244, 35, 232)),
    (9, 255, "parking", (250, 170, 160)),
    (10, 255, "rail track", (230, 150, 140)),
    (11, 2, "building", (70, 70, 70)),
    (12, 3, "wall", (102, 102, 156)),
    (13, 4, "fence", (190, 153, 153)),
    (14, 255, "guard rail", (180, 165, 180)),
    (15, 255, "bridge", (150, 100, 100)),
    (16, 255, "tunnel", (150, 120, 90)),
    (17, 5, "pole", (153, 153, 153)),
    (18, 255, "polegroup", (153, 153, 153)),
    (19, 6, "traffic light", (250, 170, 30)),
    (20, 7, "traffic sign", (220, 220, 0)),
    (21, 8, "vegetation", (107, 142, 35)),
    (22, 9, "terrain", (152, 251, 152)),
    (23, 10, "sky", (70, 130, 180)),
    (24, 11, "person", (220, 20, 60)),
    (25, 12, "rider", (255, 0, 0)),
    (26, 13, "car", (0, 0, 142)),
    (27, 14, "truck", (0, 0, 70)),
    (28, 15, "bus", (0, 60, 100)),
    (29, 255, "caravan", (0, 0, 90)),
    (30, 255, "trailer", (0, 0, 110)),
    (31, 16, "train", (0, 80, 100)),
    (32, 17, "motorcycle", (0, 0, 230)),
    (33, 18, "bicycle", (119, 11, 32)),
    (-1, 255, "license plate", (0, 0, 142)),
)
_CITYSCAPES_TRAIN = sorted((t, name, color) for _, t, name, color in CITYSCAPES_LABELS if t != 255)
CITYSCAPES_CLASSES = tuple(name for _, name, _ in _CITYSCAPES_TRAIN)
CITYSCAPES_PALETTE: tuple[Color, ...] = tuple(color for _, _, color in _CITYSCAPES_TRAIN)

# ADE20K SceneParsing (Zhou et al., 2017), ADEChallengeData2016: 150 classes in annotation order 1..150. Names are
# the official toolkit's (CSAILVision/sceneparsing) short names: the first name of each objectInfo150 entry, as its
# colour legend visualizationCode/color150/<name>.jpg spells them ("television receiver" for class 90). Colours are
# its visualizationCode/color150.mat (road and skyscraper share (140, 140, 140) there).
# fmt: off
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
ADE20K_PALETTE: tuple[Color, ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255),
    (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245),
    (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0),
    (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82),
    (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0),
    (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0),
    (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
)
# fmt: on

# COCO-Stuff 164k (Caesar et al., 2018): the 182 labels of the official list (nightrome/cocostuff labels.txt, ids
# 1..182) in the order of the stuffthingmaps PNG values 0..181 (value = id - 1; 255 = unlabeled): 91 thing labels
# of COCO (80 annotated) then 91 stuff labels.
# fmt: off
COCOSTUFF_LABELS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk", "toilet", "door", "tv",
    "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "blender", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush",
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel",
    "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
# fmt: on
# PNG values of the 11 COCO thing labels that were never annotated (street sign, hat, shoe, eye glasses, plate,
# mirror, window, desk, door, blender, hair brush): no pixel holds them, so they are not classes.
COCOSTUFF_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCOSTUFF_CLASSES = tuple(name for i, name in enumerate(COCOSTUFF_LABELS) if i not in COCOSTUFF_UNUSED)


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
