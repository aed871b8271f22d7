"""Tasks: what differs between kinds of segmentation output, so that one trainer and one CLI serve them all.

See :mod:`maskworks.tasks.base` for the interface. Each registered model declares its task (the ``task`` of its
registry entry); :func:`task_for_model` builds the task a model needs.
"""

from __future__ import annotations

from typing import Any

from maskworks.tasks.base import Evaluator, Task
from maskworks.tasks.instance import InstanceEvaluator, InstanceTask
from maskworks.tasks.panoptic import PanopticEvaluator, PanopticTask
from maskworks.tasks.semantic import SemanticEvaluator, SemanticTask
from maskworks.tasks.volumetric import VolumetricEvaluator, VolumetricTask

__all__ = [
    "Task",
    "Evaluator",
    "SemanticTask",
    "SemanticEvaluator",
    "InstanceTask",
    "InstanceEvaluator",
    "PanopticTask",
    "PanopticEvaluator",
    "VolumetricTask",
    "VolumetricEvaluator",
    "TASKS",
    "build_task",
    "model_task",
]

TASKS: dict[str, type[Task]] = {
    "semantic": SemanticTask,
    "instance": InstanceTask,
    "panoptic": PanopticTask,
    "volumetric": VolumetricTask,
}


def build_task(kind: str, **kwargs: Any) -> Task:
    """The task of ``kind`` (``"semantic"``, ``"instance"``, ``"panoptic"``, ``"volumetric"``) built with ``kwargs``.

    Raises:
        ValueError: an unknown kind (the message lists the known ones).
    """
    if kind not in TASKS:
        raise ValueError(f"unknown task {kind!r}; expected one of {', '.join(TASKS)}")
    return TASKS[kind](**kwargs)


def model_task(model_or_name: Any) -> str:
    """The task kind a registered model declares (from its name, or a built model's ``maskworks_config``; a built
    model that serves several tasks, as Mask2Former, answers with the one it is set to, its ``task``);
    ``"semantic"`` for a model built outside the registry."""
    from maskworks.registry import model_entry

    name = model_or_name
    if not isinstance(name, str):
        config = getattr(model_or_name, "maskworks_config", None)
        name = config.get("name") if isinstance(config, dict) else None
        if name is None:
            return "semantic"
    entry = model_entry(name)
    current = getattr(model_or_name, "task", None) if not isinstance(model_or_name, str) else None
    return current if isinstance(current, str) and current in entry.all_tasks else entry.task
