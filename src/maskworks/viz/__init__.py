"""Visualisation: coloured masks, overlays, label PNGs, training curves, confusion matrices and HTML reports."""

from maskworks.viz.instances import draw_instances, instance_colors
from maskworks.viz.plots import plot_confusion_matrix, plot_reliability, plot_training_curves
from maskworks.viz.render import (
    colorize,
    default_palette,
    denormalize,
    label_png_bytes,
    make_grid,
    overlay,
    save_label_png,
    save_rgb_png,
    to_uint8_hwc,
)
from maskworks.viz.report import write_html_report

__all__ = [
    "colorize",
    "default_palette",
    "denormalize",
    "draw_instances",
    "instance_colors",
    "label_png_bytes",
    "make_grid",
    "overlay",
    "plot_confusion_matrix",
    "plot_reliability",
    "plot_training_curves",
    "save_label_png",
    "save_rgb_png",
    "to_uint8_hwc",
    "write_html_report",
]
