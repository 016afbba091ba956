"""The entry point of training: ``train(config)`` runs the recipe of ``config.stage``.

    sft  SFTRecipe (training/sft.py): supervised warm-up on (prompt, completion) rows
    rl   RLRecipe (training/rl.py): learning from verified answers, sample -> score -> update -> metrics

Both share the life cycle in training/recipe.py: setup -> train (the loop) -> save -> cleanup.
"""

from __future__ import annotations

from tsallis_core.config import TrainConfig
from tsallis_core.training.recipe import Recipe, TrainResult
from tsallis_core.training.rl import RLRecipe
from tsallis_core.training.sft import SFTRecipe

RECIPES: dict[str, type[Recipe]] = {"sft": SFTRecipe, "rl": RLRecipe}


def recipe_for(config: TrainConfig, resume: bool = False) -> Recipe:
    """The set-up recipe of ``config.stage`` (validated, model loaded, resumed when asked)."""
    return RECIPES[config.stage](config, resume=resume)


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Run one training stage from a validated config (the Python form of ``tsallis train``)."""
    return recipe_for(config, resume=resume).train()
