"""The training system's public names, from the modules that hold them.

A run goes through four modules, in order:

1. :mod:`ftjax.build`: :func:`build` reads the config once into a validated
   :class:`Setup`.
2. :mod:`ftjax.round`: the round written once (local updates, server rows,
   server step), :class:`TrainState` and the device data.
3. :mod:`ftjax.loop`: the compiled chunk of rounds between two evaluations,
   and the evaluation.
4. :mod:`ftjax.run`: :func:`train_runs` and its one-run case
   :func:`train_and_evaluate` (workdirs, resume, metrics, checkpoints).

:mod:`ftjax.policy` holds the backend choices they make.
"""

from ftjax.build import ConfigError, Setup, attack_family, build
from ftjax.loop import CompiledChunk, EvalData, ProgramCache, make_chunk_fn, make_eval_data
from ftjax.loop import make_eval_fn
from ftjax.round import DeviceData, TrainState, init_state, init_states, make_device_data
from ftjax.round import make_round, place, sample_chunk, update_batch_stats, worker_state_rows
from ftjax.run import RUN_ERRORS, RunResult, TrainingDiverged, TrainResult
from ftjax.workdir import config_fields
from ftjax.run import runs_mesh, train_and_evaluate, train_runs

__all__ = [
    "ConfigError", "Setup", "attack_family", "build", "CompiledChunk", "EvalData",
    "ProgramCache", "make_chunk_fn", "make_eval_data", "make_eval_fn", "DeviceData",
    "TrainState", "init_state", "init_states", "make_device_data", "make_round", "place",
    "sample_chunk", "update_batch_stats", "worker_state_rows", "RUN_ERRORS", "RunResult",
    "TrainingDiverged", "TrainResult", "config_fields", "runs_mesh", "train_and_evaluate",
    "train_runs",
]
