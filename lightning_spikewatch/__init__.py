"""lightning_spikewatch: a drop-in Lightning callback that finds loss spikes and explains them.

``SpikeWatch`` is imported lazily, so reading logs (``spikewatch report``) never imports torch.
"""

from typing import TYPE_CHECKING, Any

from lightning_spikewatch.events import Cause, CauseScore, SpikeEvent

if TYPE_CHECKING:
    from lightning_spikewatch.callback import SpikeWatch

__all__ = ["Cause", "CauseScore", "SpikeEvent", "SpikeWatch"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "SpikeWatch":
        from lightning_spikewatch.callback import SpikeWatch

        return SpikeWatch
    raise AttributeError(f"module 'lightning_spikewatch' has no attribute {name!r}")
