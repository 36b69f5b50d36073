"""The speed profile of a run, made for this machine.

The profiles are declared in `finqlora.core.profiles` (where the run config checks their names).
A declared choice that depends on the machine, such as the `cpu` profile's bf16-where-native
precision, is made here when the profile is asked for, not when anything is imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from typing import Any

from finqlora.core.errors import FinqloraError
from finqlora.core.hardware import cpu_has_fast_bf16
from finqlora.core.profiles import BF16_WHERE_NATIVE, PROFILES, SpeedProfile


def get_profile(name: str) -> SpeedProfile:
    """The profile called `name` (case-insensitive) for this machine; a clear error lists the known ones."""
    key = (name or "").strip().lower()
    if key in PROFILES:
        return for_this_machine(PROFILES[key])
    known = ", ".join(f"{p.name} ({p.description.split(':')[0]})" for p in PROFILES.values())
    raise FinqloraError(
        f"unknown speed profile {name!r}",
        hint=f"use one of: {known}; e.g. --set train.profile=t4",
    )


def for_this_machine(profile: SpeedProfile) -> SpeedProfile:
    """`profile` with its machine-dependent choices made (the same object when it has none)."""
    if profile.compute_dtype == BF16_WHERE_NATIVE:
        return dataclasses.replace(profile, compute_dtype="bf16" if cpu_has_fast_bf16() else "fp32")
    return profile


def profile_as_dict(profile: SpeedProfile) -> dict[str, Any]:
    """The profile's fields, for training_info.json."""
    return {f.name: getattr(profile, f.name) for f in fields(profile)}
