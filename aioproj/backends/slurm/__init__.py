"""The Slurm backend: MLflow projects as Slurm batch jobs, sweeps as job arrays.

It takes mlflow-slurm's backend_config keys as that plugin spells them (``partition``,
``account``, ``environment``, ``gpus_per_node``, ``gres``, ``mem``, ``modules``,
``nodes``, ``time``, ``sbatch-script-file``, ``exports``) and aioproj's own
(``cpus_per_task``, ``sbatch_args``, ``template``, ``shared_dir``, ``arrays``); see
:mod:`aioproj.backends.slurm._config`. Unlike that plugin, the handle is real:

* the environment is built once by the driver in the shared directory, the batch script
  is written next to the run's output there, and ``sbatch --parsable`` submits it; the
  run is tagged ``slurm_job_id`` and ``slurm_cluster``;
* all runs of a backend share one ``squeue`` per poll round, whatever their number
  (``sacct``, ``sacct -c`` or ``scontrol`` only for jobs that ended badly or aged out);
* the job's output file is followed live into ``run.logs()`` and saved as the run's
  artifact; ``cancel()`` is ``scancel`` and returns once the job has ended;
* a sweep's trials go out as one job array (``--array=0-N%max_parallel``), each array
  task its own MLflow child run;
* ``aioproj recover`` asks Slurm how the jobs of a dead driver ended.
"""

from __future__ import annotations

from ._backend import JOB_ID_TAG, SlurmBackend, SlurmLaunch
from ._execution import SlurmExecution

__all__ = ["JOB_ID_TAG", "SlurmBackend", "SlurmExecution", "SlurmLaunch"]
