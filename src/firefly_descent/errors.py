"""Every refusal is a `GrowthError` subclass with a one-line message naming the problem and the fix."""

from __future__ import annotations


class GrowthError(ValueError):
    """Base class of all refusals raised by analysis, planning and the engine."""


class UnsupportedOpError(GrowthError):
    """An op without a channel rule touches a growable tensor."""


class ReductionOverGrownDimError(GrowthError):
    """A reduction (mean, sum, softmax…) runs over the dimension that would grow."""


class FrozenGroupError(GrowthError):
    """The group reaches a model input or output, or a fixed-width tensor, so its width is fixed."""


class ApproximationRequiredError(GrowthError):
    """The change cannot keep the function exactly (e.g. LayerNorm over new units) and was not opted into."""


class DataDependentControlFlowError(GrowthError):
    """The model's forward branches on tensor values, so its graph cannot be captured."""


class PlanError(GrowthError):
    """The plan does not fit the model (unknown group, wrong shapes, stale plan)."""


class VerificationError(GrowthError):
    """Applying the plan failed its execution check; the model and optimizer were restored."""


ERROR_TYPES: dict[str, type[GrowthError]] = {
    cls.__name__: cls
    for cls in (
        GrowthError,
        UnsupportedOpError,
        ReductionOverGrownDimError,
        FrozenGroupError,
        ApproximationRequiredError,
        DataDependentControlFlowError,
        PlanError,
        VerificationError,
    )
}
