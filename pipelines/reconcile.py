"""The reconciler: what the registry's aliases ask for against what is being served.

MLflow webhooks are best-effort, so a reconciler polls the aliases (every minute as a
Prefect deployment, or `attnflow reconcile`) and starts the rollout a lost webhook
would have started. It decides from three facts: the aliases now, the versions the
gateway serves, and each version's rollout status tag (a version already rolled back
or promoted is not rolled out again).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.registry import CHALLENGER, CHAMPION


@dataclass
class Action:
    """What the reconciler should do: roll out `version`, or nothing."""

    kind: str  # "rollout" | "none"
    version: str | None = None
    reason: str = ""


def plan(aliases: dict[str, str], served_champion: str | None, status: dict[str, str]) -> Action:
    """The one action that brings serving in line with the aliases.

    - `champion` moved (in the MLflow UI) to a version that is not served: roll that
      version out, canary first, as ops asked;
    - `challenger` set on a version that is neither served nor done: roll it out;
    - otherwise nothing.
    `status` maps versions to their `rollout.status` tag ("rolled_back", "promoted").
    """
    champion, challenger = aliases.get(CHAMPION), aliases.get(CHALLENGER)
    if served_champion is None:
        return Action("none", reason="nothing is served yet")
    if champion and champion != served_champion and status.get(champion) != "rolled_back":
        return Action(
            "rollout", champion, f"champion alias is v{champion} but v{served_champion} is served"
        )
    if (
        challenger
        and challenger != served_champion
        and status.get(challenger) not in ("rolled_back", "promoted")
    ):
        return Action("rollout", challenger, f"challenger alias set on v{challenger}")
    return Action("none", reason="serving matches the aliases")
