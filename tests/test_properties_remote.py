"""Property-based tests (hypothesis) of the remote backends' pure state logic.

- Databricks: :func:`map_state` is total over whatever a ``runs/get`` or ``runs/list``
  item holds (known and unknown ``life_cycle_state``/``result_state`` strings, missing
  fields, JSON nulls, values of the wrong type, the Jobs 2.2 ``status`` object with its
  ``termination_details`` codes), and maps the documented states as documented;
- Kubernetes: :func:`run_status`, :func:`job_outcome` and :func:`pod_problem` are total
  over Job and pod objects with random conditions, phases, container states and reasons,
  missing fields and nulls, and agree with each other;
- Slurm: its ``map_state`` is total over job states as squeue and sacct print them (and
  any text), maps the documented states as documented, never calls a non-zero exit or an
  unknown state FINISHED or final.

Every test is derandomized with a bounded number of examples, like tests/test_properties.py:
CI sees the same inputs on every run and the module takes a few seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from aioproj.backends.databricks import map_state
from aioproj.backends.kubernetes._state import (
    STUCK_REASONS,
    is_started,
    job_outcome,
    pod_problem,
    run_status,
)
from aioproj.backends.slurm import _state as slurm
from aioproj.handle import RunStatus

from .support import property_settings

_settings = property_settings


_MISSING = object()


def _fields(
    fields: Mapping[str, st.SearchStrategy[Any]], *, present: tuple[str, ...] = ()
) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts where every field may be null or drawn from its strategy, and missing unless
    it is one of ``present`` (hypothesis leaves optional fields out more often than not)."""
    nullable = {key: st.one_of(st.none(), value) for key, value in fields.items()}
    return st.fixed_dictionaries(
        {key: nullable[key] for key in present},
        optional={key: value for key, value in nullable.items() if key not in present},
    )


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)

# --------------------------------------------------------------------------- Databricks

SCHEDULED_STATES = ["QUEUED", "PENDING", "BLOCKED", "WAITING_FOR_RETRY", "WAITING"]
RUNNING_STATES = ["RUNNING", "TERMINATING"]
TERMINAL_STATES = ["TERMINATED", "SKIPPED", "INTERNAL_ERROR"]
KNOWN_STATES = SCHEDULED_STATES + RUNNING_STATES + TERMINAL_STATES
RESULT_STATES = ["SUCCESS", "FAILED", "TIMEDOUT", "CANCELED", "UPSTREAM_CANCELED",
                 "UPSTREAM_FAILED", "EXCLUDED", "SUCCESS_WITH_FAILURES", "DISABLED",
                 "MAXIMUM_CONCURRENT_RUNS_REACHED", "EVICTED"]  # fmt: skip
TERMINATION_CODES = ["SUCCESS", "SUCCESS_WITH_FAILURES", "USER_CANCELED", "CANCELED",
                     "RUN_EXECUTION_ERROR", "DRIVER_ERROR", "CLUSTER_ERROR", "INTERNAL_ERROR",
                     "SKIPPED", "TIMEDOUT", "MAX_CONCURRENT_RUNS_EXCEEDED",
                     "BUDGET_POLICY_LIMIT_EXCEEDED", "REPOSITORY_CHECKOUT_FAILED",
                     "INVALID_RUN_CONFIGURATION"]  # fmt: skip
KNOWN = set(KNOWN_STATES)

#: Unknown strings, including near misses of known ones.
unknown_words = st.one_of(
    st.text(max_size=12).filter(lambda s: s not in KNOWN),
    st.sampled_from(["terminated", "Terminated", "TERMINATED ", "SOMETHING_NEW", ""]),
)
lifecycles = st.one_of(st.sampled_from(KNOWN_STATES), unknown_words)
results = st.one_of(st.sampled_from(RESULT_STATES), unknown_words)
codes = st.one_of(st.sampled_from(TERMINATION_CODES), unknown_words)

v1_states = _fields(
    {"life_cycle_state": lifecycles, "result_state": results, "state_message": st.text(max_size=8)}
)
v2_statuses = _fields(
    {
        "state": lifecycles,
        "termination_details": _fields(
            {"code": codes, "type": st.text(max_size=8), "message": st.text(max_size=8)}
        ),
        "queue_details": _fields({"code": st.text(max_size=8)}),
    }
)
databricks_runs = st.fixed_dictionaries(
    {},
    optional={
        "state": st.one_of(st.none(), v1_states, json_values),
        "status": st.one_of(st.none(), v2_statuses, json_values),
        "run_id": st.integers(),
        "end_time": json_scalars,
    },
)


def _check_shape(result: object) -> tuple[RunStatus, bool]:
    assert isinstance(result, tuple)
    assert len(result) == 2
    status, final = result
    assert isinstance(status, RunStatus)
    assert isinstance(final, bool)
    # Final exactly when the status is an end; SCHEDULED/RUNNING otherwise.
    assert final is status.is_terminal
    return status, final


@_settings(600)
@given(databricks_runs)
def test_map_state_is_total(run: dict[str, Any]) -> None:
    _check_shape(map_state(run))


@_settings(300)
@given(lifecycles, st.one_of(st.none(), results), st.one_of(st.none(), v2_statuses))
def test_map_state_maps_life_cycle_states_as_documented(
    lcs: str, result: str | None, status: dict[str, Any] | None
) -> None:
    state: dict[str, Any] = {"life_cycle_state": lcs}
    if result is not None:
        state["result_state"] = result
    run: dict[str, Any] = {"state": state}
    if status is not None:
        run["status"] = status  # the 1.x ``state`` wins when it names a life cycle
    mapped = _check_shape(map_state(run))
    if lcs in TERMINAL_STATES:
        if lcs == "TERMINATED" and result == "SUCCESS":
            assert mapped == (RunStatus.FINISHED, True)
        elif result in ("CANCELED", "UPSTREAM_CANCELED"):
            assert mapped == (RunStatus.KILLED, True)
        else:
            assert mapped == (RunStatus.FAILED, True)
    elif lcs in SCHEDULED_STATES:
        assert mapped == (RunStatus.SCHEDULED, False)
    else:  # running, or unknown: not final, never mistaken for an end
        assert mapped == (RunStatus.RUNNING, False)


@_settings(300)
@given(lifecycles, st.one_of(st.none(), codes), st.booleans())
def test_map_state_reads_the_v2_status_as_documented(
    v2: str, code: str | None, empty_state: bool
) -> None:
    status: dict[str, Any] = {"state": v2}
    if code is not None:
        status["termination_details"] = {"code": code, "message": "m"}
    run: dict[str, Any] = {"status": status}
    if empty_state:
        run["state"] = {"state_message": "no life cycle yet"}
    mapped = _check_shape(map_state(run))
    if v2 == "TERMINATED":
        if code == "SUCCESS":
            assert mapped == (RunStatus.FINISHED, True)
        elif code in ("USER_CANCELED", "CANCELED"):
            assert mapped == (RunStatus.KILLED, True)
        else:
            assert mapped == (RunStatus.FAILED, True)
    elif v2 in SCHEDULED_STATES:
        assert mapped == (RunStatus.SCHEDULED, False)
    elif v2 in TERMINAL_STATES:  # not 2.2 ``status`` states, but ends all the same
        assert mapped == (RunStatus.FAILED, True)
    else:
        assert mapped == (RunStatus.RUNNING, False)


@_settings(200)
@given(st.one_of(st.none(), unknown_words), st.one_of(st.none(), results, codes))
def test_unknown_or_missing_states_are_never_final(lcs: str | None, result: str | None) -> None:
    state: dict[str, Any] = {} if lcs is None else {"life_cycle_state": lcs}
    if result is not None:
        state["result_state"] = result
    for run in (
        {"state": state},
        {"status": {"state": lcs, "termination_details": {"code": result}}},
    ):
        assert map_state(run) == (RunStatus.RUNNING, False)


# --------------------------------------------------------------------------- Kubernetes

JOB_CONDITIONS = ["Failed", "FailureTarget", "Complete", "SuccessCriteriaMet", "Suspended"]
FAILED_KINDS = {"Failed", "FailureTarget"}
DONE_KINDS = {"Complete", "SuccessCriteriaMet"}
PHASES = ["Pending", "Running", "Succeeded", "Failed", "Unknown"]
WAITING_REASONS = [*sorted(STUCK_REASONS), "ContainerCreating", "PodInitializing"]
TERMINATED_REASONS = ["OOMKilled", "Error", "Completed", "ContainerCannotRun", "DeadlineExceeded"]

words = st.one_of(st.text(max_size=10), st.sampled_from(["", "True", "False"]))
#: Mostly "True": conditions that count are what the properties are about.
condition_status = st.sampled_from(["True", "True", "True", "False", "Unknown", "true", ""])

job_conditions = _fields(
    {
        "type": st.one_of(st.sampled_from(JOB_CONDITIONS), st.sampled_from(JOB_CONDITIONS), words),
        "status": condition_status,
        "reason": st.one_of(st.sampled_from(["BackoffLimitExceeded", "DeadlineExceeded"]), words),
        "message": words,
        "lastTransitionTime": words,
    },
    present=("type", "status", "reason", "message"),
)
job_counts = {
    "active": st.integers(0, 3),
    "ready": st.integers(0, 3),
    "succeeded": st.integers(0, 3),
    "failed": st.integers(0, 3),
    "startTime": words,
}
jobs = st.one_of(
    _fields(
        {
            "metadata": _fields({"name": words, "uid": words}),
            "status": _fields({"conditions": st.lists(job_conditions, max_size=4), **job_counts}),
        }
    ),
    # As often, a Job whose status surely has conditions: the interesting cases.
    st.fixed_dictionaries(
        {
            "status": st.fixed_dictionaries(
                {"conditions": st.lists(job_conditions, min_size=1, max_size=4)},
                optional=job_counts,
            )
        }
    ),
)

waiting = _fields(
    {"reason": st.one_of(st.sampled_from(WAITING_REASONS), words), "message": words},
    present=("reason",),
)
terminated = _fields(
    {
        "reason": st.one_of(st.sampled_from(TERMINATED_REASONS), words),
        "exitCode": st.integers(-1, 255),
        "message": words,
    },
    present=("reason",),
)
container_states = _fields(
    {"waiting": waiting, "running": _fields({"startedAt": words}), "terminated": terminated}
)
container_statuses = _fields(
    {
        "name": words,
        "state": container_states,
        "lastState": container_states,
        "ready": st.booleans(),
        "restartCount": st.integers(0, 9),
    },
    present=("name", "state"),
)
pod_conditions = _fields(
    {
        "type": st.one_of(st.sampled_from(["PodScheduled", "Ready", "Initialized"]), words),
        "status": condition_status,
        "reason": st.one_of(st.sampled_from(["Unschedulable"]), words),
        "message": words,
    },
    present=("type", "status", "reason"),
)
pod_fields = {
    "phase": st.one_of(st.sampled_from(PHASES), words),
    "conditions": st.lists(pod_conditions, max_size=3),
    "containerStatuses": st.lists(container_statuses, max_size=2),
    "initContainerStatuses": st.lists(container_statuses, max_size=2),
    "reason": words,
}
pods = st.one_of(
    _fields(
        {
            "metadata": _fields({"name": words}),
            "spec": _fields({"containers": st.lists(_fields({"name": words}), max_size=2)}),
            "status": _fields(pod_fields),
        }
    ),
    # As often, a pod whose status surely has container statuses.
    st.fixed_dictionaries(
        {
            "metadata": st.fixed_dictionaries({"name": words}),
            "status": st.fixed_dictionaries(
                {
                    "containerStatuses": st.lists(container_statuses, min_size=1, max_size=2),
                    "conditions": st.lists(pod_conditions, max_size=2),
                }
            ),
        }
    ),
)


def _true_kinds(job: Mapping[str, Any]) -> set[str]:
    conditions = (job.get("status") or {}).get("conditions") or []
    return {c.get("type") for c in conditions if c.get("status") == "True"}


@_settings(500)
@given(jobs, st.lists(pods, max_size=3))
def test_kubernetes_state_is_total_and_consistent(
    job: dict[str, Any], pod_list: list[dict[str, Any]]
) -> None:
    outcome = job_outcome(job)
    status = run_status(job, pod_list)
    assert isinstance(status, RunStatus)
    kinds = _true_kinds(job)
    if kinds & FAILED_KINDS:
        # A Failed or FailureTarget condition is an end, and never a success.
        assert outcome is not None
        assert outcome[0] is RunStatus.FAILED
    elif kinds & DONE_KINDS:
        assert outcome is not None
        assert outcome[0] is RunStatus.FINISHED
    else:
        assert outcome is None
    if outcome is not None:
        verdict, message = outcome
        assert isinstance(message, str)
        assert message
        assert not message.startswith("None")  # the reason, or else the condition's type
        assert status is verdict
    else:
        assert status in (RunStatus.SCHEDULED, RunStatus.RUNNING)
        if any(is_started(pod) for pod in pod_list):
            assert status is RunStatus.RUNNING
    # Without the Job (not seen yet, or deleted) the pods alone never make an end.
    assert run_status(None, pod_list) in (RunStatus.SCHEDULED, RunStatus.RUNNING)


@_settings(500)
@given(pods)
def test_pod_problem_is_total_and_consistent(pod: dict[str, Any]) -> None:
    assert isinstance(is_started(pod), bool)
    problem = pod_problem(pod)
    status = pod.get("status") or {}
    statuses = [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
    ]
    reasons = {((cs.get("state") or {}).get("waiting") or {}).get("reason") for cs in statuses}
    unschedulable = any(
        c.get("type") == "PodScheduled"
        and c.get("status") == "False"
        and c.get("reason") == "Unschedulable"
        for c in status.get("conditions") or []
    )
    if unschedulable or reasons & STUCK_REASONS:
        assert problem is not None
    if problem is None:
        return
    text, stuck = problem
    assert isinstance(text, str)
    assert isinstance(stuck, bool)
    assert text.startswith("pod ")
    if unschedulable:
        assert "Unschedulable" in text
        assert stuck
    elif "CrashLoopBackOff" in text or "OOMKilled" in text:
        # Retried by the kubelet: bad, but not stuck until the Job gives up.
        assert not stuck
    else:
        assert stuck
        assert any(reason in text for reason in STUCK_REASONS)


# -- Slurm ------------------------------------------------------------------------------

_SLURM_KNOWN = (
    slurm.SCHEDULED_STATES | slurm.RUNNING_STATES | slurm.FAILED_STATES | {"COMPLETED", "CANCELLED"}
)


def test_slurm_states_map_as_documented() -> None:
    for state in ("PENDING", "CONFIGURING"):
        assert slurm.map_state(state) == (RunStatus.SCHEDULED, False)
    for state in ("RUNNING", "COMPLETING", "SUSPENDED"):
        assert slurm.map_state(state) == (RunStatus.RUNNING, False)
    assert slurm.map_state("COMPLETED", 0) == (RunStatus.FINISHED, True)
    assert slurm.map_state("COMPLETED") == (RunStatus.FINISHED, True)
    assert slurm.map_state("CANCELLED") == (RunStatus.KILLED, True)
    assert slurm.map_state("CANCELLED by 1000") == (RunStatus.KILLED, True)  # sacct's form
    for state in (
        "FAILED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    ):
        assert slurm.map_state(state) == (RunStatus.FAILED, True)
        assert slurm.map_state(state + "+", 1) == (RunStatus.FAILED, True)


slurm_known_states = st.sampled_from(sorted(_SLURM_KNOWN))
slurm_any_state = st.one_of(
    slurm_known_states,
    slurm_known_states.map(lambda s: s.lower()),
    slurm_known_states.map(lambda s: f"{s}+"),
    slurm_known_states.map(lambda s: f"{s} by 1000"),
    st.text(max_size=20),
)
slurm_exit_codes = st.one_of(st.none(), st.integers(min_value=0, max_value=255))


@_settings(500)
@given(slurm_any_state, slurm_exit_codes)
def test_slurm_map_state_is_total_and_consistent(state: str, code: int | None) -> None:
    status, final = slurm.map_state(state, code)
    assert isinstance(status, RunStatus)
    # Final exactly for the ends; an end is never SCHEDULED or RUNNING.
    assert final == status.is_terminal
    if status is RunStatus.FINISHED:
        assert state.split()[0].rstrip("+").upper() == "COMPLETED"
        assert not code  # a non-zero exit is never FINISHED
    if state.split() and state.split()[0].rstrip("+").upper() == "CANCELLED":
        assert status is RunStatus.KILLED
    info = slurm.JobInfo(state=state, exit_code=code)
    assert (info.status, info.final) == (status, final)


def _unknown_slurm(state: str) -> bool:
    words = state.split()
    return not words or words[0].rstrip("+").upper() not in _SLURM_KNOWN


@_settings(300)
@given(st.text(max_size=30).filter(_unknown_slurm))
def test_unknown_slurm_states_are_never_final(state: str) -> None:
    assert slurm.map_state(state, 1) == (RunStatus.RUNNING, False)


@_settings(300)
@given(st.text(max_size=12))
def test_slurm_exit_code_parsing_is_total(text: str) -> None:
    parsed = slurm.parse_exit_code(text)
    assert parsed is None or (parsed[0] >= 0 and parsed[1] >= 0)
    assert slurm.parse_exit_code("3:0") == (3, 0)
    assert slurm.parse_exit_code("0:9") == (0, 9)
