"""The project's exception hierarchy: one base class, specific subclasses."""

from __future__ import annotations


class DeksdenFlowError(Exception):
    """Base class for every error the project raises on purpose."""


class ConfigError(DeksdenFlowError):
    """A setting is missing or has a value we cannot use."""


class WebhookError(DeksdenFlowError):
    """A delivery was rejected; carries the HTTP status to answer with."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


class TransitionConflict(DeksdenFlowError):
    """A guarded state transition found the row in another state (HTTP 409)."""

    def __init__(self, kind: str, entity_id: int, current: str, wanted: str) -> None:
        # str(): a StrEnum status member reads 'running' in the message, as the stored string does
        super().__init__(f"{kind} {entity_id} is {str(current)!r}; cannot move to {str(wanted)!r}")
        self.kind = kind
        self.entity_id = entity_id
        self.current = current
        self.wanted = wanted


class DependenciesPending(TransitionConflict):
    """`/run-step N` for a step of a graph whose dependencies are not done yet (HTTP 409)."""

    def __init__(self, step_index: int, missing: tuple[int, ...]) -> None:
        super().__init__("step", step_index, "pending", "running")
        names = ", ".join(f"{i:02d}" for i in missing)
        self.args = (
            f"step {step_index:02d} waits for step{'s' if len(missing) > 1 else ''} {names} "
            "(not completed yet)",
        )
        self.missing = missing


class NotFound(DeksdenFlowError):
    """A referenced row does not exist (HTTP 404)."""


class EngineError(DeksdenFlowError):
    """An engine could not be started or produced unusable output."""


class GitError(DeksdenFlowError):
    """A git command failed or timed out."""


class ForgeError(DeksdenFlowError):
    """A forge (GitHub, GitLab, Local) request failed after its retries."""


class SpecError(DeksdenFlowError):
    """A ProtocolSpec, planning output or workspace failed validation."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class LockBusy(DeksdenFlowError):
    """Another worker holds the per-protocol lock."""


class StepStopped(DeksdenFlowError):
    """A human stopped the protocol (/cancel, /pause) while one of its jobs was working."""

    def __init__(self, protocol_status: str) -> None:
        super().__init__(f"protocol was {protocol_status} while the step ran")
        self.protocol_status = protocol_status
