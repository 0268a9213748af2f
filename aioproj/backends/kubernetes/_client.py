"""One Kubernetes API connection: configuration (kubeconfig context or in-cluster) and raw
JSON requests over kubernetes-asyncio's ApiClient (its auth, TLS and proxy handling),
with errors translated and transient failures retried.

Objects are handled as plain dicts: the backend reads a few fields, and skipping the
model classes keeps a 200-run watch cheap.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from aioproj._http import backoff_delay
from aioproj.errors import BackendError

__all__ = ["ExpiredError", "KubeApiError", "KubeClient", "connect"]

logger = logging.getLogger("aioproj.kubernetes")

_RETRIED = frozenset({429, 500, 502, 503, 504})
_SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class KubeApiError(BackendError):
    """The Kubernetes API answered an error ``Status`` (or could not be reached: code 0)."""

    def __init__(self, message: str, *, code: int, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class ExpiredError(KubeApiError):
    """410 Gone/Expired: the resourceVersion is older than the server keeps."""


def _status_error(code: int, body: bytes | str, what: str) -> KubeApiError:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    reason, message = "", text.strip()[:500]
    try:
        status = json.loads(text)
        if isinstance(status, dict):
            reason = str(status.get("reason", ""))
            message = str(status.get("message", message))
    except ValueError:
        pass
    cls = ExpiredError if code == 410 else KubeApiError
    return cls(
        f"{what} failed: {code} {reason}: {message}".replace(" : ", ": "), code=code, reason=reason
    )


@dataclass
class KubeClient:
    """An ApiClient of one cluster and user, and the namespace its context names."""

    api: Any  # kubernetes_asyncio.client.ApiClient
    host: str
    default_namespace: str

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.api.close()

    async def _send(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] | None = 60.0,  # noqa: ASYNC109 (per request)
    ) -> Any:
        """Send one request; return the raw aiohttp response (2xx), else raise."""
        from kubernetes_asyncio.client.exceptions import ApiException

        what = f"{method} {path}"
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            response = await self.api.call_api(
                path,
                method,
                query_params=list(query),
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=timeout,
            )
        except ApiException as exc:  # kubernetes-asyncio > 36.1 raises on streams too
            raise _status_error(exc.status or 0, exc.body or exc.reason or "", what) from None
        except (OSError, TimeoutError) as exc:
            raise KubeApiError(
                f"{what}: cannot reach the Kubernetes API at {self.host}: {exc}", code=0
            ) from exc
        except Exception as exc:  # aiohttp.ClientError and friends
            if type(exc).__module__.startswith("aiohttp"):
                raise KubeApiError(
                    f"{what}: cannot reach the Kubernetes API at {self.host}: {exc!r}", code=0
                ) from exc
            raise
        if not 200 <= response.status < 300:
            try:
                data = await response.read()
            finally:
                response.release()
            raise _status_error(response.status, data, what)
        return response

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Any = None,
        content_type: str = "application/json",
        attempts: int = 4,
        sleep: Any = None,
    ) -> dict[str, Any]:
        """A JSON request, retried with jittered backoff on 429/5xx and lost connections.

        Raises :class:`KubeApiError` (with the Status reason and message) otherwise.
        """
        sleep = sleep or anyio.sleep
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._send(
                    method, path, query=query, body=body, content_type=content_type
                )
                try:
                    data = await response.read()
                finally:
                    response.release()
                result = json.loads(data) if data else {}
                return result if isinstance(result, dict) else {}
            except KubeApiError as exc:
                if attempt >= attempts or (exc.code not in _RETRIED and exc.code != 0):
                    raise
                logger.debug("%s %s: %s; retrying", method, path, exc)
            except ValueError as exc:
                raise KubeApiError(
                    f"{method} {path}: the answer is not JSON: {exc}", code=0
                ) from exc
            await sleep(backoff_delay(attempt, base=0.2, cap=5.0))

    async def watch(
        self,
        path: str,
        *,
        label_selector: str,
        resource_version: str,
        timeout_seconds: int,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield watch events (dicts) from ``resource_version`` until the server ends the
        stream. Raises :class:`ExpiredError` for 410 (HTTP or ERROR event) and
        :class:`KubeApiError` for other errors and lost connections."""
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("labelSelector", label_selector),
            ("resourceVersion", resource_version),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        response = await self._send(
            "GET", path, query=query, timeout=(30.0, float(timeout_seconds) + 60.0)
        )
        try:
            while True:
                try:
                    line = await response.content.readline()
                except Exception as exc:  # aiohttp payload errors, timeouts
                    raise KubeApiError(f"watch {path}: the stream broke: {exc!r}", code=0) from exc
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    raise KubeApiError(
                        f"watch {path}: not a JSON event: {line[:200]!r}", code=0
                    ) from None
                if event.get("type") == "ERROR" or "type" not in event:
                    status = event.get("object", event)
                    raise _status_error(
                        int(status.get("code", 0) or 0), json.dumps(status), f"watch {path}"
                    )
                yield event
        finally:
            response.release()

    async def follow_log(self, namespace: str, pod: str, container: str) -> AsyncIterator[bytes]:
        """Yield a container's log from the start, following it until the container ends.
        Raises :class:`KubeApiError` (400 while the container is still waiting)."""
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}/log"
        response = await self._send(
            "GET", path, query=[("container", container), ("follow", "true")], timeout=None
        )
        try:
            while True:
                try:
                    chunk = await response.content.readany()
                except Exception as exc:
                    raise KubeApiError(f"log of {pod}: the stream broke: {exc!r}", code=0) from exc
                if not chunk:
                    return
                yield chunk
        finally:
            response.release()


def _import_client() -> None:
    import kubernetes_asyncio.client
    import kubernetes_asyncio.config  # noqa: F401


def _read_kubeconfigs(path: str | None) -> dict[str, Any] | None:
    """The kubeconfig as one dict (KUBECONFIG lists are merged, first wins), or None
    when no file exists. Blocking."""
    import yaml

    candidates = (
        [path]
        if path
        else (
            os.environ.get("KUBECONFIG", "").split(os.pathsep)
            if os.environ.get("KUBECONFIG")
            else [os.path.expanduser("~/.kube/config")]
        )
    )
    merged: dict[str, Any] | None = None
    for candidate in candidates:
        candidate = os.path.expanduser(candidate)
        if not candidate or not os.path.exists(candidate):
            if path:
                raise BackendError(f"The kubeconfig file {path} does not exist.")
            continue
        with open(candidate, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise BackendError(f"The kubeconfig file {candidate} is not a YAML mapping.")
        if merged is None:
            merged = loaded
            continue
        for key in ("clusters", "users", "contexts"):
            names = {item.get("name") for item in merged.get(key) or []}
            merged.setdefault(key, [])
            merged[key] += [i for i in loaded.get(key) or [] if i.get("name") not in names]
        merged.setdefault("current-context", loaded.get("current-context"))
    return merged


def _context_namespace(config: Mapping[str, Any], context: str | None) -> str:
    name = context or config.get("current-context")
    for item in config.get("contexts") or []:
        if item.get("name") == name:
            return str((item.get("context") or {}).get("namespace") or "default")
    return "default"


def _incluster(configuration: Any) -> str:
    """Load the in-cluster configuration (blocking); return the pod's namespace."""
    from kubernetes_asyncio import config

    config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    try:
        with open(_SA_NAMESPACE, encoding="utf-8") as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


async def connect(context: str | None, config_path: str | None = None) -> KubeClient:
    """An API client for ``context`` of the kubeconfig (``config_path``, else
    ``$KUBECONFIG``, else ``~/.kube/config``), falling back to the in-cluster service
    account when there is no kubeconfig or it does not load, as MLflow does.

    Raises :class:`BackendError` saying what failed for both.
    """
    await anyio.to_thread.run_sync(_import_client)  # imports read files: off the loop
    from kubernetes_asyncio import client, config
    from kubernetes_asyncio.config.config_exception import ConfigException

    configuration = client.Configuration()
    try:
        raw = await anyio.to_thread.run_sync(_read_kubeconfigs, config_path)
    except (OSError, ValueError) as exc:
        raw, kube_error = None, f"{exc}"
    else:
        kube_error = "no kubeconfig file found" if raw is None else ""
    namespace = "default"
    if raw is not None:
        try:
            await config.load_kube_config_from_dict(
                raw, context=context, client_configuration=configuration
            )
            namespace = _context_namespace(raw, context)
        except (ConfigException, OSError, KeyError, TypeError) as exc:
            raw, kube_error = None, str(exc) or type(exc).__name__
    if raw is None:
        try:
            namespace = await anyio.to_thread.run_sync(_incluster, configuration)
        except ConfigException as exc:
            raise BackendError(
                f"Could not configure a Kubernetes client: the kubeconfig did not load "
                f"(context {context or '(current)'}: {kube_error}) and this is not a pod with "
                f"a service account ({exc}). Set KUBECONFIG, or 'kube-context' (and "
                "'kube-config-path') in backend_config."
            ) from exc
    api = client.ApiClient(configuration=configuration)
    return KubeClient(api=api, host=str(configuration.host), default_namespace=namespace)
