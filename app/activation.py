"""Whether a finished job's version replaces the one being served: the job's `activate`
policy (if_better, always, never) judged against the served version's card."""

from __future__ import annotations

from model.checkpoint import ModelCard


def should_activate(policy: str, new: ModelCard, current: ModelCard | None) -> tuple[bool, str]:
    """(activate?, why) for a finished job's version under `policy`."""
    if current is None:
        return True, "activated: no version was being served"
    if policy == "always":
        return True, "activated: activate=always"
    if policy == "never":
        return False, "not activated: activate=never"
    if new.labels != current.labels:
        return False, (f"not activated: its labels differ from the served version "
                       f"{current.version}'s; activate it explicitly")  # fmt: skip
    new_top1 = float(new.metrics.get("val_top1", 0.0))
    cur_top1 = float(current.metrics.get("val_top1", 0.0))
    if new_top1 > cur_top1:
        return True, f"activated: val_top1 {new_top1:.4f} > {cur_top1:.4f} ({current.version})"
    return False, (f"not activated: val_top1 {new_top1:.4f} <= {cur_top1:.4f} of the served "
                   f"version {current.version}")  # fmt: skip
