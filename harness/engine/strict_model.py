"""The base of every YAML schema (recipes, study files): a frozen pydantic model that refuses
unknown keys, so a misspelt field is an error and not a silent default."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
