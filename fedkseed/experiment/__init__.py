"""The experiment layer (L5): a FedKSeed run on one machine, from options to output folder.

config.py      SimConfig / ApplyConfig: fields, help, choices, protocols (demo, paper),
               validation (the CLI is generated from them)
methods.py     the federated methods (fedkseed, fedit, fedavg) and what the first-order ones train
folder.py      the output folder's rules: refuse a used folder, --resume/--overwrite,
               writability, stale temporaries (checked before anything is loaded)
prepare.py     model, data split, server, clients and evaluation batches of a run
evaluate.py    eval loss and Rouge-L (both scorers, intervals) of the global model
usage.py       a client's local work measured: wall and CPU seconds, peak added memory
checkpoint.py  state.npz: what --resume continues from
runbook.py     RunBook: the bookkeeping every engine shares (resume, per-round records,
               checkpoints, the final block)
engines.py     the engine registry ("local" built in, others by entry point)
local.py       the local engine
outputs.py     Results and the output folder (delta.fks, model/, losses.png, metrics.json last)
run.py         simulate(config): claim the folder, engine, outputs
apply.py       apply_delta: delta file + base model -> fine-tuned model
"""

from .apply import apply_delta
from .config import ApplyConfig, SimConfig
from .outputs import Results, write_outputs
from .prepare import Setup, prepare
from .run import simulate

__all__ = ["ApplyConfig", "Results", "Setup", "SimConfig", "apply_delta", "prepare", "simulate", "write_outputs"]
