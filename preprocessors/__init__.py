"""Preprocessors: the `task` control signals (see `registry`). Importing this package is cheap
(numpy only); model-backed preprocessors import their libraries when first looked up."""

from preprocessors.registry import (
    Preprocessor,
    PreprocessorContext,
    PreprocessorSet,
    available_tasks,
    get_preprocessor,
    known_tasks,
    register,
    register_planned,
)

__all__ = [
    "Preprocessor",
    "PreprocessorContext",
    "PreprocessorSet",
    "available_tasks",
    "get_preprocessor",
    "known_tasks",
    "register",
    "register_planned",
]
