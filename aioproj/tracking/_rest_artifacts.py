"""The REST store's artifacts where the server keeps them: DBFS on Databricks (1 MiB
blocks), the ``mlflow-artifacts`` proxy of a tracking server elsewhere."""

from __future__ import annotations

import base64
import posixpath
import urllib.parse
from pathlib import Path

import anyio
import anyio.to_thread
import httpx

from aioproj.errors import InvalidArgumentError, TrackingError
from aioproj.tracking._http import HostCreds
from aioproj.tracking._rest_client import RestClient, RestError, display_host

__all__ = [
    "ARTIFACTS_API",
    "RestArtifacts",
]

#: The DBFS API takes at most 1 MiB of data per request.
_DBFS_BLOCK = 1024 * 1024
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"


class RestArtifacts(RestClient):
    """Artifacts where the server keeps them: DBFS on Databricks, its artifact proxy elsewhere."""

    async def _write_dbfs(self, path: str, data: bytes) -> None:
        """Write a DBFS file of the workspace: one ``put``, or ``create``/``add-block``/
        ``close`` past the API's 1 MiB per request."""
        if len(data) <= _DBFS_BLOCK:
            contents = base64.b64encode(data).decode("ascii")
            await self._request(
                "POST",
                "/api/2.0/dbfs/put",
                json={"path": path, "contents": contents, "overwrite": True},
            )
            return
        answer = await self._request(
            "POST", "/api/2.0/dbfs/create", json={"path": path, "overwrite": True}
        )
        handle = answer.json()["handle"]
        for start in range(0, len(data), _DBFS_BLOCK):
            block = base64.b64encode(data[start : start + _DBFS_BLOCK]).decode("ascii")
            await self._request(
                "POST", "/api/2.0/dbfs/add-block", json={"handle": handle, "data": block}
            )
        await self._request("POST", "/api/2.0/dbfs/close", json={"handle": handle})

    async def _read_dbfs(self, path: str) -> bytes:
        out = bytearray()
        while True:
            try:
                response = await self._request(
                    "GET",
                    "/api/2.0/dbfs/read",
                    params={"path": path, "offset": str(len(out)), "length": str(_DBFS_BLOCK)},
                )
            except RestError as exc:
                if exc.status_code == 404 or exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return bytes(out)
                raise
            body = response.json()
            if not body.get("bytes_read"):
                return bytes(out)
            out += base64.b64decode(body.get("data") or "")

    def _proxy(self, location: str, creds: HostCreds) -> tuple[str, str]:
        """The server base URL and artifact path of an ``mlflow-artifacts:`` location."""
        parsed = urllib.parse.urlsplit(location)
        if parsed.scheme.lower() != "mlflow-artifacts":
            raise InvalidArgumentError(f"{location!r} is not an mlflow-artifacts: location.")
        base = creds.host
        if parsed.netloc:
            base = f"{urllib.parse.urlsplit(creds.host).scheme}://{parsed.netloc}"
        return base, urllib.parse.unquote(parsed.path).strip("/")

    async def list_proxied_artifacts(self, location: str) -> list[tuple[str, bool]]:
        """The entries ``(name, is_dir)`` of the artifact directory ``location`` (an
        ``mlflow-artifacts:`` URI), read through the server's artifact proxy.

        A file, or a path that does not exist, lists nothing (as MLflow's own client sees
        it). Entry names that are not plain names (``..``, ``a/b``) are refused.

        Raises:
            TrackingError: the server refused or could not be reached; a malformed answer.
        """
        _client, creds = await self._ensure_client()
        base, path = self._proxy(location, creds)
        response = await self._request("GET", ARTIFACTS_API, params={"path": path}, base=base)
        try:
            files = (response.json() if response.content else {}).get("files", [])
        except (ValueError, AttributeError):
            files = None
        if not isinstance(files, list):
            raise TrackingError(f"{display_host(base)}: unexpected artifact listing for {path}.")
        entries: list[tuple[str, bool]] = []
        for item in files:
            name = posixpath.basename(str(item.get("path", ""))) if isinstance(item, dict) else ""
            if name in ("", ".", "..") or "\\" in name or "\0" in name:
                raise TrackingError(
                    f"{display_host(base)}: the artifact listing of {path} names {item!r}."
                )
            entries.append((name, bool(item.get("is_dir"))))
        return entries

    async def download_proxied_artifact(self, location: str, target: Path) -> None:
        """Stream the artifact file ``location`` (an ``mlflow-artifacts:`` URI) into
        ``target`` through the server's artifact proxy, with the store's retries.

        Raises:
            RestError: the server answered with an error (404: no such artifact).
            TrackingError: the server could not be reached within the retry budget.
        """
        _client, creds = await self._ensure_client()
        base, path = self._proxy(location, creds)

        async def write(response: httpx.Response) -> None:
            async with await anyio.open_file(target, "wb") as out:
                async for chunk in response.aiter_bytes(1 << 20):
                    await out.write(chunk)

        url_path = f"{ARTIFACTS_API}/{urllib.parse.quote(path)}"
        await self._request("GET", url_path, base=base, sink=write)

    async def _read_proxied(self, url_path: str, base: str) -> bytes:
        try:
            response = await self._request("GET", url_path, base=base)
        except RestError as exc:
            if exc.status_code == 404 or exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return b""
            raise
        return response.content
