"""lightning_spikewatch: a drop-in Lightning callback that finds loss spikes and explains them."""

from lightning_spikewatch.callback import SpikeWatch
from lightning_spikewatch.events import Cause, CauseScore, SpikeEvent

__all__ = ["Cause", "CauseScore", "SpikeEvent", "SpikeWatch"]
__version__ = "0.1.0"
