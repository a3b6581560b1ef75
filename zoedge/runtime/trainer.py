"""Compatibility: `zoedge train` used to live here. The loop is runtime/loop.py (setup.py opens the run,
estimate.py holds the ± forwards, finish.py writes the patch); the names other code imports stay importable here."""

from __future__ import annotations

from zoedge.runtime.bundle import Bundle
from zoedge.runtime.config import TrainConfig, default_recipe, lr_at, resolve, trajectory_key
from zoedge.runtime.evaluator import Dataset, Evaluator, fmt, load_dataset, score
from zoedge.runtime.loop import batch_indices, train

__all__ = ["Bundle", "Dataset", "Evaluator", "TrainConfig", "batch_indices", "default_recipe", "fmt", "load_dataset",
           "lr_at", "resolve", "score", "train", "trajectory_key"]
