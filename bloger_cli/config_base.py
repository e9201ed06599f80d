"""The floor every config stands on: `StrictModel` (unknown keys are errors, "none" turns an optional
setting off) and the device choice. Stage configs live in bloger_cli/config.py and beside their code."""

from __future__ import annotations

import re
import typing
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

Device = Literal["auto", "cpu", "cuda", "mps"]

# Steps in a row with a non-finite loss or gradient (each skipped: no update) before a run stops. A
# safety limit, not a hyperparameter: left out of the config hash, so raising it lets `--resume` go on.
MaxBadSteps = Annotated[int, Field(ge=1, description="stop after this many steps in a row with a non-finite "
                                   "loss or gradient (each one is skipped, no update)")]
MAX_BAD_STEPS = 20

_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s)?")


def parse_duration(value: Any) -> float:
    """`90`, `90s`, `20m`, `1h30m`, `1.5h` -> seconds (> 0); anything else is a ValueError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        match = _DURATION.fullmatch(text) if text else None
        if text.replace(".", "", 1).isdigit():
            seconds = float(text)
        elif match is None or not any(match.groups()):
            raise ValueError(f"time budget must be a duration like 90s, 20m or 1h30m (got {value!r})")
        else:
            h, m, sec = (float(g or 0) for g in match.groups())
            seconds = 3600 * h + 60 * m + sec
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"time budget must be more than 0 seconds (got {value!r})")
    return seconds


# A wall-time budget: a duration (90s, 20m, 1h30m) or seconds, parsed once for every stage that has one
TimeBudget = Annotated[float | None, BeforeValidator(lambda value: None if value is None else parse_duration(value))]


def device_field() -> Any:
    """The `device` setting every torch stage has, declared once."""
    return Field("auto", description="where to run; auto: cuda, else mps, else cpu")


def seed_field(default: int = 42) -> Any:
    """The `seed` setting of every stage that draws random numbers, declared once."""
    return Field(default, description="random seed: the same seed on the same device gives the same result")


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)
    # Paths of files the stage reads, which its catalog inputs already identify (`file:PATH` with a
    # fingerprint): left out of the config hash, so that data moved to another place gives outputs
    # byte for byte the same and the stages downstream stay up to date.
    unhashed: ClassVar[frozenset[str]] = frozenset()

    def hash_exclude(self) -> dict[str, Any]:
        """The `model_dump(exclude=...)` of the unhashed fields, nested configs' included."""
        out: dict[str, Any] = {name: True for name in type(self).unhashed}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name not in out and isinstance(value, StrictModel) and value.hash_exclude():
                out[name] = value.hash_exclude()
        return out

    @model_validator(mode="before")
    @classmethod
    def _none_from_text(cls, data: Any) -> Any:
        """TOML has no null: "none" turns an optional setting off (`--set train.clip_norm=none`)."""
        if not isinstance(data, dict):
            return data
        optional = {name for name, f in cls.model_fields.items() if not f.is_required() and _allows_none(f)}
        return {k: None if k in optional and isinstance(v, str) and v.lower() in ("none", "null") else v
                for k, v in data.items()}


def _allows_none(field: Any) -> bool:
    return type(None) in typing.get_args(field.annotation) or field.annotation is type(None)
