"""The first phase of a run, before anything is tracked: the backend, the store, the
source and project, parameters, tags and the experiment (see :class:`aioproj.Runner`).

Everything that can be wrong with the input fails here, before a run exists.
"""

from __future__ import annotations

import contextvars
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from aioproj._paths import cache_root
from aioproj._run_args import RunArgs
from aioproj._shared import SharedCalls
from aioproj.backends import (
    Backend,
    Launch,
    LaunchRequest,
    load_backend,
)
from aioproj.errors import InvalidArgumentError
from aioproj.project import (
    EntryPoint,
    ResolvedParameters,
    load_project,
    resolve_parameters,
)
from aioproj.sources import FetchedProject, SourceCache
from aioproj.tracking import TrackingStore, open_store
from aioproj.tracking.base import check_record, current_user
from aioproj.tracking.metrics import MetricsPoller
from aioproj.tracking.resolve import default_tracking_uri

if TYPE_CHECKING:
    from aioproj.sources.path_params import Localized, PathDownloads

__all__ = [
    "Prepared",
    "RunPreparation",
    "active_mlflow_run_id",
    "extra_run_tags",
    "load_backend_config",
    "run_tags",
]


#: Tags added to the runs a task creates, over the usual ones: a sweep sets its parent
#: run (``mlflow.parentRunId``) and trial number here around its ``run()`` calls.
extra_run_tags: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "aioproj_extra_run_tags", default=None
)


@dataclass(frozen=True)
class Prepared:
    """A run ready to be tracked and started: what :meth:`Runner._prepare` produced."""

    backend: Backend
    store: TrackingStore
    launch: Launch
    source: FetchedProject
    entry_point: EntryPoint
    parameters: ResolvedParameters
    experiment_id: str
    #: The downloads of its ``path`` parameters, held until the run has started.
    downloads: Localized | None = None


class RunPreparation:
    """The Runner's preparation phase and the shared resources it uses: backends by name,
    stores by URI, the source cache, the downloads of ``path`` parameters."""

    # The Runner sets these in its __init__ (see aioproj.runner).
    _tracking_uri: str | None
    _cache_dir: Path | None
    _sources: SourceCache | None
    _tg: anyio.abc.TaskGroup | None
    _backends: dict[str, Backend]
    _stores: dict[str, TrackingStore]
    _default_uri: str | None
    _pollers: dict[str, MetricsPoller]
    _shared: SharedCalls
    _downloads: PathDownloads | None

    async def _prepare(self, args: RunArgs) -> Prepared:
        """Everything that can fail before a run is tracked: fetch the source, validate
        the project and parameters, prepare the backend, find the experiment."""
        the_backend = await self._backend(args.backend)
        config = await load_backend_config(args.backend_config)
        store = await self._store()
        assert self._sources is not None
        # Runs started together (a sweep) share one fetch, one parse, one lookup.
        sources = self._sources
        uri, version = args.uri, args.version
        source = await self._shared.run(
            f"fetch\0{uri}\0{version}", lambda: sources.fetch(uri, version)
        )
        project = await self._shared.run(
            f"project\0{source.directory}",
            lambda: anyio.to_thread.run_sync(load_project, source.directory),
        )
        ep = project.get_entry_point(args.entry_point)
        has_paths = any(p.type == "path" for p in ep.parameters.values())
        if has_paths:  # checks files exist
            resolved = await anyio.to_thread.run_sync(
                resolve_parameters, project, ep, args.parameters
            )
        else:
            resolved = resolve_parameters(project, ep, args.parameters)
        # Tags and params checked before an environment, experiment or run is made.
        check_record(
            tags={**run_tags(source, ep, the_backend.name), **(extra_run_tags.get() or {})},
            params=resolved.logged,
        )
        request = LaunchRequest(
            source=source,
            project=project,
            entry_point=ep,
            parameters=resolved,
            backend_config=config,
            env_manager=args.env_manager,
            docker_args=dict(args.docker_args or {}),
            storage_dir=Path(args.storage_dir) if args.storage_dir is not None else None,
            build_image=args.build_image,
            docker_auth=args.docker_auth,
            env_cache_dir=(self._cache_dir or cache_root()) / "envs",
            tracking_uri=store.uri,
            version=version,
            synchronous=args.synchronous,
        )
        downloaded: Localized | None = None
        if has_paths and getattr(the_backend, "downloads_path_parameters", False):
            launch, downloaded = await self._prepare_downloading(
                the_backend, request, args.parameters, store
            )
        else:
            launch = await the_backend.prepare(request)
        experiment_name = args.experiment_name
        exp_key = None if args.experiment_id is None else str(args.experiment_id)
        try:
            exp_id = await self._shared.run(
                f"experiment\0{store.uri}\0{experiment_name}\0{exp_key}",
                lambda: store.resolve_experiment(
                    experiment_name=experiment_name, experiment_id=exp_key
                ),
            )
        except BaseException:
            if downloaded is not None:
                await downloaded.release()
            raise
        return Prepared(the_backend, store, launch, source, ep, resolved, exp_id, downloaded)

    async def _prepare_downloading(
        self,
        backend: Backend,
        request: LaunchRequest,
        parameters: Mapping[str, Any] | None,
        store: TrackingStore,
    ) -> tuple[Launch, Localized | None]:
        """The backend's preparation, with the ``path`` parameters given as URIs
        downloaded meanwhile (MLflow's ``storage_dir``); the launch then runs the command
        with the local paths. Raises what either raises; nothing is left of the downloads
        on failure."""
        from aioproj.sources.path_params import PathDownloads, remote_path_parameters

        if not remote_path_parameters(request.entry_point, request.parameters):
            return await backend.prepare(request), None
        if self._downloads is None:
            self._downloads = PathDownloads()
        downloads = self._downloads
        launch, downloaded = await downloads.alongside(
            lambda: backend.prepare(request),
            lambda: downloads.localize(
                request.project,
                request.entry_point,
                parameters,
                request.parameters,
                storage_dir=request.storage_dir,
                store=store,
            ),
        )
        return launch.with_parameters(downloaded.parameters), downloaded  # type: ignore[attr-defined]

    async def _backend(self, backend: str | Backend) -> Backend:
        if not isinstance(backend, str):
            if not isinstance(backend, Backend):
                raise InvalidArgumentError(
                    f"backend must be a name or an aioproj.backends.Backend, got {backend!r}"
                )
            return backend
        if backend not in self._backends:
            if backend == "local":
                loaded = load_backend(backend)
            else:  # imports and plugin metadata read files: off the loop, once
                loaded = await self._shared.run(
                    f"backend\0{backend}", lambda: anyio.to_thread.run_sync(load_backend, backend)
                )
            self._backends.setdefault(backend, loaded)
        return self._backends[backend]

    def _metrics_poller(self, store: TrackingStore) -> MetricsPoller:
        """The one poll of ``store`` that every run's :meth:`SubmittedRun.metrics` shares."""
        poller = self._pollers.get(store.uri)
        if poller is None:
            assert self._tg is not None
            poller = self._pollers[store.uri] = MetricsPoller(store, self._tg.start_soon)
        return poller

    async def _store(self) -> TrackingStore:
        uri = self._tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow's default looks at ./mlruns and the installed MLflow
            if self._default_uri is None:
                found = await self._shared.run(
                    "default-uri", lambda: anyio.to_thread.run_sync(default_tracking_uri)
                )
                self._default_uri = self._default_uri or found
            uri = self._default_uri
        if uri not in self._stores:
            # Opening imports the store's module (httpx, mlflow): off the loop, once for
            # a whole burst of runs.
            name = uri
            store = await self._shared.run(
                f"store\0{name}", lambda: anyio.to_thread.run_sync(open_store, name)
            )
            self._stores.setdefault(uri, store)
        return self._stores[uri]


async def load_backend_config(config: Mapping[str, Any] | str | None) -> dict[str, Any] | None:
    """A dict as given, a ``.json`` path loaded, a JSON object string parsed; None stays
    None (MLflow tells "not given" from ``{}``: Databricks requires a config)."""
    if config is None:
        return None
    if isinstance(config, Mapping):
        return dict(config)
    if not isinstance(config, str):
        raise InvalidArgumentError(
            f"backend_config must be a dict or a path to a JSON file, got {type(config).__name__}"
        )
    if config.endswith(".json"):
        try:
            text = await anyio.Path(config).read_text()
        except OSError as exc:
            raise InvalidArgumentError(
                f"Could not read backend config file {config}: {exc.strerror or exc}"
            ) from exc
        source = f"file {config}"
    else:
        text, source = config, "string"
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(
            f"Invalid backend config JSON in {source}: {exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}."
        ) from exc
    if not isinstance(loaded, dict):
        raise InvalidArgumentError(
            f"The backend config ({source}) must be a JSON object, got {type(loaded).__name__}."
        )
    return loaded


def run_tags(source: FetchedProject, ep: EntryPoint, backend: str) -> dict[str, str]:
    """The tags MLflow gives a project run, all set at creation."""
    tags = {
        "mlflow.user": current_user(),
        "mlflow.source.name": source.source_name,
        "mlflow.source.type": "PROJECT",
        "mlflow.project.entryPoint": ep.name,
        "mlflow.project.backend": backend,
    }
    if source.git_commit:
        tags["mlflow.source.git.commit"] = source.git_commit
    if source.git_repo_url:
        tags["mlflow.source.git.repoURL"] = source.git_repo_url
    if source.git_branch:
        tags["mlflow.source.git.branch"] = source.git_branch
    parent = active_mlflow_run_id()
    if parent:
        tags["mlflow.parentRunId"] = parent
    return tags


def active_mlflow_run_id() -> str | None:
    """The caller's active MLflow run, if it uses mlflow (never imported just for this)."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return None
    active = mlflow.active_run()
    return active.info.run_id if active is not None else None
