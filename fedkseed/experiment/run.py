"""``simulate(config)``: claim the output folder, run the config on its engine, write the outputs."""

from __future__ import annotations

from . import engines
from .config import SimConfig
from .folder import claim_output
from .outputs import Results, write_outputs


def simulate(config: SimConfig, *, progress: bool = True) -> Results:
    """Run ``config`` on the engine it names and write the output folder. The folder is checked
    (and the engine found) before any model or data is loaded."""
    with claim_output(config):  # a failed --overwrite run puts the replaced run back
        engine = engines.load(config.engine)
        results = engine(config, progress=progress)
        write_outputs(results)
    return results
