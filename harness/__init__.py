"""finetune-harness: find the best way to fine-tune a pretrained vision model on your data."""
from harness.errors import HarnessError
from harness.engine.recipe import Recipe, Stage
from harness.engine.run_types import Result
from harness.engine.train import fine_tune

__all__ = ["HarnessError", "Recipe", "Stage", "Result", "fine_tune"]
