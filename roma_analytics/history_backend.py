"""Where a history lives: a local folder or an S3-compatible object store, behind one interface.

:class:`~roma_analytics.store.HistoryStore` knows the layout and the rules (which files a reader
reads, how a day is compacted); a backend knows how to list, read, create and delete files in one
kind of storage, and what that storage can promise:

* :class:`LocalBackend` -- a folder.  A file is written to a dot-named temporary, fsynced and
  hard-linked into place (a link never replaces an existing file), the folder is fsynced.  Readers
  hold ``.lock`` shared; compaction holds it exclusively while it swaps a day, and deletes the
  files it replaced at once (``deletes_replaced_at_once``).
* :class:`ObjectStoreBackend` -- ``s3://bucket/prefix`` on AWS S3, Huawei Cloud OBS, MinIO, Ceph
  or any S3-compatible store, through s3fs.  An object appears whole or not at all (one PUT, or a
  multipart upload that only shows when completed), so no temporary is needed; it is created with
  ``If-None-Match: *`` (conditional create) so a name is never overwritten.  There are no locks:
  replaced objects stay readable for a grace period after the object that replaces them appears
  (see ``HistoryStore.compact``).

Object-store settings come from :class:`ObjectStoreSettings`: endpoint (OBS, MinIO...), region,
path-style or virtual-hosted addressing, a CA bundle.  Credentials are read from environment
variables only -- the standard ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
or other names given in the targets file -- never from the URI, never from a file.  TLS is always
verified; plain ``http://`` endpoints are accepted only on the loopback interface (test servers).

Every backend error a user can cause (a missing bucket, refused credentials, a throttling store,
no permission) becomes a :class:`~roma_analytics.errors.ConfigError` or
:class:`~roma_analytics.errors.RomaError` that says what to do, and never contains a secret.
"""
from __future__ import annotations

import contextlib
import errno
import io
import ipaddress
import os
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .errors import ConfigError, RomaError

try:  # POSIX advisory locks; without them compaction still never loses a row.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "ObjectStoreSettings", "LocalBackend", "ObjectStoreBackend", "backend_for", "is_object_store_uri",
]

#: URI schemes served by :class:`ObjectStoreBackend`.
OBJECT_STORE_SCHEMES = ("s3",)
#: Readers hold this lock shared while they list and read (local folders only).
READ_LOCK_NAME = ".lock"
#: Serialises local compactions.
COMPACT_LOCK_NAME = ".compact.lock"
#: A local temporary file of an append older than this was abandoned by a killed writer.
STALE_TEMP_SECONDS = 15 * 60
#: How long an object replaced by a compaction stays readable on an object store: longer than
#: any read of the history takes, so a reader that listed the day before the compacted object
#: appeared still finds every object it listed.
REPLACED_GRACE_SECONDS = 60 * 60
_LOOPBACK_NAMES = ("localhost",)


def is_object_store_uri(location) -> bool:
    """True for ``s3://...`` (the object-store URIs a history may live at)."""
    if isinstance(location, os.PathLike):
        return False
    scheme = urlsplit(str(location)).scheme.lower()
    return scheme in OBJECT_STORE_SCHEMES


# --------------------------------------------------------------------------------------------
# settings

@dataclass(frozen=True)
class ObjectStoreSettings:
    """How to reach an S3-compatible store.  Secrets are never held here, only variable *names*.

    ``endpoint``: the store's URL (``https://obs.cn-north-4.myhuaweicloud.com``, a MinIO URL);
    ``None`` means AWS S3.  ``region``: signing region.  ``path_style``: address buckets as
    ``endpoint/bucket/key`` (True; the default when an endpoint is given, what MinIO and most
    private stores need) or as ``bucket.endpoint/key`` (False).  ``ca_bundle``: a PEM file of CA
    certificates to verify the endpoint with (verification cannot be switched off).
    ``*_env``: the environment variables holding the access key, secret key and optional session
    token.  ``retries``: attempts for throttled (503 SlowDown) or failed requests, with backoff.
    ``timeout``: connect and read timeout, seconds.
    """

    endpoint: str | None = None
    region: str | None = None
    path_style: bool | None = None
    ca_bundle: str | None = None
    access_key_env: str = "AWS_ACCESS_KEY_ID"
    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"
    session_token_env: str = "AWS_SESSION_TOKEN"
    retries: int = 5
    timeout: float = 30.0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, **overrides) -> ObjectStoreSettings:
        """Settings from the standard AWS variables, then ``overrides`` (values that are ``None`` are skipped).

        Reads ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``), ``AWS_REGION`` (or
        ``AWS_DEFAULT_REGION``), ``AWS_CA_BUNDLE`` and ``ROMA_S3_ADDRESSING`` (``path`` or
        ``virtual``).
        """
        env = os.environ if environ is None else environ
        addressing = (env.get("ROMA_S3_ADDRESSING") or "").strip().lower()
        if addressing not in ("", "path", "virtual"):
            raise ConfigError(f"ROMA_S3_ADDRESSING is {addressing!r}; use 'path' or 'virtual'")
        found = cls(
            endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            path_style={"": None, "path": True, "virtual": False}[addressing],
            ca_bundle=env.get("AWS_CA_BUNDLE") or None,
        )
        return replace(found, **{key: value for key, value in overrides.items() if value is not None})

    @classmethod
    def from_targets_defaults(cls, defaults: Mapping, environ: Mapping[str, str] | None = None) -> ObjectStoreSettings:
        """Settings from the environment, then a targets file's ``[defaults]`` ``history_*`` keys:
        ``history_endpoint``, ``history_region``, ``history_addressing`` (``path``/``virtual``),
        ``history_ca_bundle`` and ``history_access_key_env``/``_secret_key_env``/``_session_token_env``."""
        addressing = defaults.get("history_addressing")
        return cls.from_environ(
            environ,
            endpoint=defaults.get("history_endpoint"), region=defaults.get("history_region"),
            path_style=None if addressing is None else addressing == "path",
            ca_bundle=defaults.get("history_ca_bundle"),
            access_key_env=defaults.get("history_access_key_env"),
            secret_key_env=defaults.get("history_secret_key_env"),
            session_token_env=defaults.get("history_session_token_env"),
        )

    def checked(self) -> ObjectStoreSettings:
        """Self, after refusing what would leak a secret or skip TLS verification."""
        if self.endpoint is not None:
            parts = urlsplit(self.endpoint)
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise ConfigError(f"object-store endpoint {_without_userinfo(self.endpoint)!r} must be an "
                                  "https:// URL (e.g. https://obs.cn-north-4.myhuaweicloud.com)")
            if parts.username or parts.password:
                raise ConfigError("the object-store endpoint must not carry credentials; put them in "
                                  f"the environment variables {self.access_key_env} and {self.secret_key_env}")
            if parts.scheme == "http" and not _is_loopback(parts.hostname):
                raise ConfigError(f"object-store endpoint {self.endpoint!r} is plain http: use https "
                                  "(plain http is accepted only on the loopback interface, for test servers)")
        if self.ca_bundle is not None and not Path(self.ca_bundle).is_file():
            raise ConfigError(f"CA bundle {self.ca_bundle} (AWS_CA_BUNDLE or ca_bundle) is not a file")
        return self


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        return parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")).geturl()
    return url


def backend_for(location, settings: ObjectStoreSettings | None = None):
    """The backend serving ``location`` (a folder path or an ``s3://`` URI)."""
    if is_object_store_uri(location):
        return ObjectStoreBackend(str(location), settings)
    if settings is not None and settings != ObjectStoreSettings():
        raise ConfigError(f"object-store settings were given but the history {location} is a folder; "
                          "pass an s3://bucket/prefix URI")
    return LocalBackend(Path(location))


def _in_memory(write) -> bytes:
    """What ``write(file)`` writes, as bytes."""
    sink = io.BytesIO()
    write(sink)
    return sink.getvalue()


# --------------------------------------------------------------------------------------------
# local folder

class LocalBackend:
    """A history folder on a local (POSIX) file system.  Paths are :class:`pathlib.Path`."""

    deletes_replaced_at_once = True

    def __init__(self, root: Path) -> None:
        self.root = root

    def __str__(self) -> str:
        return str(self.root)

    def describe(self) -> str:
        return f"the history folder {self.root}"

    def child(self, base, *names) -> Path:
        return Path(base).joinpath(*names)

    @staticmethod
    def name(path) -> str:
        return Path(path).name

    def check_root(self, tables) -> None:
        where = self.root
        if where.exists() and not where.is_dir():
            raise ConfigError(f"{where} is a file, not a roma-analytics history folder; pass a folder")
        if not where.is_dir():
            return
        try:
            entries = [entry.name for entry in where.iterdir() if not entry.name.startswith(".")]
        except OSError as exc:
            raise ConfigError(f"cannot read the history folder {where}: {exc.strerror}") from exc
        for table in tables:
            if (where / table).exists() and not (where / table).is_dir():
                raise ConfigError(f"{where} is not a roma-analytics history folder: {where / table} is a file")
        if entries and not any(name in tables for name in entries):
            raise ConfigError(
                f"{where} is not a roma-analytics history folder (it holds other files and no "
                "stats/ or errors/ folder); pass an empty or new folder, or an existing history"
            )

    def exists(self) -> bool:
        return self.root.is_dir()

    def ensure_layout(self, tables) -> None:
        for table in tables:
            (self.root / table).mkdir(parents=True, exist_ok=True)
        lock = self.root / READ_LOCK_NAME
        if not lock.exists():
            lock.touch(exist_ok=True)

    def subfolders(self, folder) -> list[Path]:
        try:
            entries = list(Path(folder).iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigError(f"cannot read the history folder {folder}: {exc.strerror}") from exc
        return [entry for entry in entries if entry.is_dir()]

    def data_files(self, folder) -> list[Path]:
        """The folder's data files: ``*.parquet`` not hidden by a dot or underscore (temporaries)."""
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        return sorted(Path(folder) / name for name in names
                      if name.endswith(".parquet") and not name.startswith((".", "_")))

    def file_stamps(self, folder) -> list[tuple[str, str]]:
        """``(name, size and modification time)`` of the folder's data files: what a rollup's key
        covers, so that a file changed in place (even at the same size) makes the rollup stale."""
        stamps = []
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not entry.name.endswith(".parquet") or entry.name.startswith((".", "_")):
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:  # swapped by a compaction between listing and stat
                continue
            stamps.append((entry.name, f"{stat.st_size}:{stat.st_mtime_ns}"))
        return sorted(stamps)

    def file_exists(self, path) -> bool:
        return os.path.exists(path)

    def modified_ns(self, folder) -> list[int]:
        """The modification times (ns) of the folder's data files."""
        times = []
        for path in self.data_files(folder):
            try:
                times.append(path.stat().st_mtime_ns)
            except OSError:  # swapped by a compaction between listing and stat
                continue
        return times

    def schema_metadata(self, path) -> dict[bytes, bytes]:
        return pq.read_schema(path).metadata or {}

    def open(self, path):
        """``path`` opened for binary reading (history_files inspects footers through it)."""
        return open(path, "rb")

    def create(self, path, write) -> None:
        """Create ``path`` with what ``write(file)`` writes, atomically; FileExistsError if the name is taken."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _write_temp(target, write)
        try:
            _link_into_place(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, paths) -> None:
        for path in paths:
            Path(path).unlink(missing_ok=True)

    def age(self, path, now: float) -> float:
        try:
            return now - Path(path).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def remove_abandoned_temporaries(self, folder, now: float, merged_prefix: str) -> None:
        for entry in Path(folder).iterdir():
            if ".tmp-" not in entry.name or not entry.name.startswith("."):
                continue
            # A killed compaction's temporaries go at once (compactions are serialised by the
            # lock); a killed append's only once clearly abandoned, since on a finished day a
            # late append could still be writing one.
            if entry.name.startswith("." + merged_prefix) or self.age(entry, now) > STALE_TEMP_SECONDS:
                entry.unlink(missing_ok=True)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with _flock(self.root / READ_LOCK_NAME, exclusive=False, create=False):
            yield

    @contextlib.contextmanager
    def swapping(self) -> Iterator[None]:
        """Readers wait while this is held: a day's files are being replaced."""
        with _flock(self.root / READ_LOCK_NAME, exclusive=True, create=True):
            yield
        _fsync_dir(self.root)

    @contextlib.contextmanager
    def compacting(self) -> Iterator[None]:
        with _flock(self.root / COMPACT_LOCK_NAME, exclusive=True, create=True):
            yield

    def replace_files(self, target, write, sources) -> None:
        """Commit ``target`` (a merged file, written by ``write(file)``) and delete ``sources`` in one
        step readers cannot split."""
        tmp = _write_temp(Path(target), write)
        try:
            with self.swapping():
                _link_into_place(tmp, Path(target))
                self.delete(sources)
                _fsync_dir(Path(target).parent)
        finally:
            tmp.unlink(missing_ok=True)

    def dataset(self, paths, schema: pa.Schema, table_folder=None) -> ds.Dataset:
        return _dataset(paths, schema, table_folder)

    def public(self, path) -> Path:
        return Path(path)

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Turn permission/read-only/space errors into messages that say what to do."""
        try:
            yield
        except NotADirectoryError as exc:
            # A file stands where the history keeps a folder (say a stray file named rollup_1h):
            # the folder is writable, the file is in the way.
            blocking = _file_in_the_way(exc.filename)
            if blocking is None:
                raise ConfigError(f"{what}: {exc.strerror or exc} ({exc.filename}); a file stands where a folder "
                                  "belongs: move it away or choose another folder") from exc
            if blocking == self.root or self.root in blocking.parents:
                raise ConfigError(f"{what}: {blocking} is a file where the history keeps a folder; move that file "
                                  "out of the history folder and run the command again") from exc
            raise ConfigError(f"{what}: Not a directory: {blocking} is a file, not a folder; choose another "
                              "history folder") from exc
        except IsADirectoryError as exc:
            raise ConfigError(f"{what}: {exc.filename} is a folder where the history writes a file; move that "
                              "folder out of the history folder and run the command again") from exc
        except PermissionError as exc:
            raise ConfigError(f"{what}: {exc.strerror or exc} ({exc.filename}); choose a writable folder") from exc
        except OSError as exc:
            if exc.errno == errno.EROFS:
                raise ConfigError(f"{what}: read-only file system; choose a writable folder") from exc
            if isinstance(exc, FileExistsError):
                raise
            raise RomaError(f"{what}: {exc.strerror or exc} ({exc.filename})") from exc


def _file_in_the_way(filename) -> Path | None:
    """The nearest existing ancestor of ``filename`` (or itself) that is not a folder, if any."""
    if not filename:
        return None
    for path in (Path(filename), *Path(filename).parents):
        if path.exists() or path.is_symlink():
            return None if path.is_dir() else path
    return None


_DATE_PARTITIONING = ds.partitioning(pa.schema([("date", pa.date32())]), flavor="hive")


def _dataset(paths, schema: pa.Schema, table_folder=None, filesystem=None) -> ds.Dataset:
    """The Parquet files ``paths`` as one dataset of ``schema`` (no file is opened to infer it);
    with ``table_folder``, the ``date`` of their ``date=YYYY-MM-DD`` folder is a column too."""
    options = {}
    if table_folder is not None:
        options = dict(partitioning=_DATE_PARTITIONING, partition_base_dir=str(table_folder))
        schema = schema.append(_DATE_PARTITIONING.schema.field("date"))
    return ds.dataset([str(path) for path in paths], schema=schema, format="parquet",
                      filesystem=filesystem, **options)


@contextlib.contextmanager
def _flock(path: Path, *, exclusive: bool, create: bool) -> Iterator[None]:
    """Hold an advisory lock on ``path``; a reader without the lock file simply goes unlocked."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(path, (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY, 0o666)
    except OSError:
        if create:
            raise
        yield  # no lock file (a new or foreign history) or not readable: nothing to wait for
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_temp(target: Path, write) -> Path:
    """Write ``target``'s content (``write(file)``) to a dot-named temporary file next to it, fsynced."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _link_into_place(tmp: Path, target: Path) -> None:
    """Give ``tmp`` the name ``target`` atomically, failing (FileExistsError) if it exists."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError as exc:
        # Filesystems without hard links: check, then rename (a tiny window instead of none).
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if target.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(target)) from None
        os.replace(tmp, target)
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - filesystems that refuse directory fsync
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# object store

#: The resolution of an object's Last-Modified time as a HEAD request gives it (an HTTP date).
LAST_MODIFIED_RESOLUTION_SECONDS = 1.0


class ObjectStoreBackend:
    """A history under ``s3://bucket/prefix``.  Paths are ``bucket/key`` strings (no scheme)."""

    deletes_replaced_at_once = False

    def __init__(self, uri: str, settings: ObjectStoreSettings | None = None) -> None:
        parts = urlsplit(uri)
        if parts.username or parts.password or "@" in parts.netloc:
            raise ConfigError("a history URI must not carry credentials (s3://KEY:SECRET@...): put them in "
                              "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and use s3://bucket/prefix")
        if parts.query or parts.fragment:
            raise ConfigError(f"history URI s3://{parts.netloc}{parts.path} must not have a query or "
                              "fragment; set the endpoint and region in the environment or the targets file")
        self.bucket = parts.netloc
        if not self.bucket:
            raise ConfigError(f"history URI {uri!r} names no bucket; use s3://bucket/prefix")
        prefix = parts.path.strip("/")
        self.root = f"{self.bucket}/{prefix}" if prefix else self.bucket
        self.settings = (settings or ObjectStoreSettings.from_environ()).checked()
        self._fs = None

    def __str__(self) -> str:
        return f"s3://{self.root}"

    def describe(self) -> str:
        where = f" at {self.settings.endpoint}" if self.settings.endpoint else ""
        return f"the history s3://{self.root}{where}"

    # -- the s3fs filesystem, created on first use (no network before then)
    @property
    def fs(self):
        if self._fs is None:
            self._fs = self._filesystem()
        return self._fs

    def _filesystem(self):
        import s3fs  # only object-store histories need it

        settings = self.settings
        key = os.environ.get(settings.access_key_env, "").strip()
        secret = os.environ.get(settings.secret_key_env, "").strip()
        token = os.environ.get(settings.session_token_env, "").strip() or None
        if not key or not secret:
            raise ConfigError(
                f"no object-store credentials: set the environment variables {settings.access_key_env} "
                f"and {settings.secret_key_env} (and {settings.session_token_env} for temporary credentials)"
            )
        path_style = settings.path_style if settings.path_style is not None else settings.endpoint is not None
        client_kwargs = {"verify": settings.ca_bundle or True}
        if settings.region:
            client_kwargs["region_name"] = settings.region
        config_kwargs = {
            "s3": {"addressing_style": "path" if path_style else "virtual"},
            # botocore's standard mode retries 503 SlowDown, 500s and connection errors with
            # exponential backoff; the store's own rate limit then has time to recover.
            "retries": {"max_attempts": max(1, int(settings.retries)), "mode": "standard"},
            "connect_timeout": settings.timeout,
            "read_timeout": settings.timeout,
        }
        fs = s3fs.S3FileSystem(
            key=key, secret=secret, token=token, endpoint_url=settings.endpoint,
            client_kwargs=client_kwargs, config_kwargs=config_kwargs,
            # Several writers change the listing all the time: never answer from a cache.
            use_listings_cache=False, skip_instance_cache=True,
        )
        fs.retries = 1  # s3fs' own retry loop on top of botocore's would multiply the waits
        return fs

    # -- layout
    def child(self, base, *names) -> str:
        return "/".join([str(base).rstrip("/"), *names])

    @staticmethod
    def name(path) -> str:
        return str(path).rstrip("/").rsplit("/", 1)[-1]

    def check_root(self, tables) -> None:
        return  # checked on first use: constructing a store makes no network call

    def exists(self) -> bool:
        with self.errors(f"cannot read {self.describe()}"):
            return bool(self.subfolders(self.root, missing_ok=True))

    def ensure_layout(self, tables) -> None:
        return  # object stores have no folders to create

    def subfolders(self, folder, missing_ok: bool = True) -> list[str]:
        return [entry["name"] for entry in self._ls(folder) if entry["type"] == "directory"]

    def data_files(self, folder) -> list[str]:
        return sorted(entry["name"] for entry in self._data_entries(folder))

    def _data_entries(self, folder) -> list[dict]:
        """Listing entries of the folder's data objects: ``*.parquet`` not hidden by a dot or underscore."""
        return [entry for entry in self._ls(folder)
                if entry["type"] != "directory" and self.name(entry["name"]).endswith(".parquet")
                and not self.name(entry["name"]).startswith((".", "_"))]

    def _ls(self, folder) -> list[dict]:
        try:
            return self.fs.ls(str(folder), detail=True, refresh=True)
        except FileNotFoundError:
            self._check_bucket()
            return []

    def _check_bucket(self) -> None:
        try:
            self.fs.ls(self.bucket, detail=False, refresh=True)
        except FileNotFoundError:
            raise ConfigError(
                f"bucket {self.bucket} does not exist{' at ' + self.settings.endpoint if self.settings.endpoint else ''}; "
                "create it first (roma-analytics never creates buckets) or fix the history URI"
            ) from None

    def file_stamps(self, folder) -> list[tuple[str, str]]:
        """``(name, size and ETag)`` of the folder's data objects (what a rollup's key covers)."""
        return sorted((self.name(entry["name"]), f"{entry['size']}:{entry.get('ETag', '')}")
                      for entry in self._data_entries(folder))

    def modified_ns(self, folder) -> list[int]:
        """The modification times (ns) of the folder's data objects."""
        return [int(entry["LastModified"].timestamp() * 1e9) for entry in self._data_entries(folder)]

    def file_exists(self, path) -> bool:
        try:
            self.fs.info(str(path), refresh=True)
            return True
        except FileNotFoundError:
            return False

    def schema_metadata(self, path) -> dict[bytes, bytes]:
        with self.open(path) as file:
            return pq.read_schema(file).metadata or {}

    def open(self, path):
        """``path`` opened for binary reading (history_files inspects footers through it)."""
        return self.fs.open(str(path), "rb", cache_type="readahead")

    def create(self, path, write) -> None:
        """PUT what ``write(file)`` writes at ``path`` only if no object has that name (``If-None-Match: *``).

        FileExistsError when the name is taken.  Stores that ignore the condition (older MinIO,
        some gateways) still get a HEAD check just before, leaving a window of one request.
        """
        if self.file_exists(path):
            raise FileExistsError(errno.EEXIST, "object exists", f"s3://{path}")
        try:
            self.fs.pipe_file(str(path), _in_memory(write), mode="create")
        except FileNotFoundError:
            self._check_bucket()
            raise

    def delete(self, paths) -> None:
        paths = [str(path) for path in paths]
        if paths:
            try:
                self.fs.rm(paths)
            except FileNotFoundError:
                pass  # deleted meanwhile by another compactor: what we wanted

    def age(self, path, now: float) -> float:
        """Seconds since the object at ``path`` was written, never more: its Last-Modified (a
        HEAD request) is in whole seconds, rounded down, so up to a second is taken off; a
        replaced object must not go a second before its grace period is over."""
        try:
            modified = self.fs.info(str(path), refresh=True)["LastModified"]
        except FileNotFoundError:
            return 0.0
        return now - modified.timestamp() - LAST_MODIFIED_RESOLUTION_SECONDS

    def remove_abandoned_temporaries(self, folder, now: float, merged_prefix: str) -> None:
        return  # an object appears whole or not at all: there are no temporaries

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        # Lock-free: replaced objects stay readable for REPLACED_GRACE_SECONDS.
        with self.errors(f"cannot read {self.describe()}"):
            yield

    @contextlib.contextmanager
    def swapping(self) -> Iterator[None]:
        yield  # nothing to wait for: readers skip replaced objects by name

    @contextlib.contextmanager
    def compacting(self) -> Iterator[None]:
        yield  # lock-free: concurrent compactors produce overlapping objects that readers skip

    def replace_files(self, target, write, sources) -> None:
        """Create the merged object; the sources stay until the grace period has passed."""
        try:
            self.create(target, write)
        except FileExistsError:
            pass  # another compactor merged exactly these sources: same name, same rows

    def dataset(self, paths, schema: pa.Schema, table_folder=None) -> ds.Dataset:
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return _dataset(paths, schema, table_folder, PyFileSystem(FSSpecHandler(self.fs)))

    def public(self, path) -> str:
        return f"s3://{path}"

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Say what an object-store failure means and what to do, without any secret."""
        try:
            yield
        except (ConfigError, RomaError):
            raise
        except FileExistsError:
            raise
        except PermissionError as exc:
            raise ConfigError(
                f"{what}: the object store refused the request ({_reason(exc)}). Check the credentials in "
                f"{self.settings.access_key_env}/{self.settings.secret_key_env}, their permissions on "
                f"bucket {self.bucket}, and the endpoint and region"
            ) from None
        except FileNotFoundError as exc:
            self._check_bucket()
            raise RomaError(f"{what}: {_reason(exc)}; the history changed while it was read, try again") from None
        except OSError as exc:
            text = _reason(exc)
            if "SlowDown" in text or "503" in text or exc.errno == errno.EBUSY:
                # EAGAIN: a transient failure, so `collect --every` reports it and goes on.
                raise RomaError(
                    f"{what}: the object store is throttling requests (503 SlowDown) and still was after "
                    f"{self.settings.retries} attempts; nothing was lost, try again later or spread the "
                    "collectors' schedules"
                ) from OSError(errno.EAGAIN, "503 SlowDown")
            raise RomaError(f"{what}: {text}") from OSError(exc.errno or errno.EIO, text)
        except Exception as exc:  # botocore's connection and credential errors are not OSErrors
            if type(exc).__module__.startswith(("botocore", "aiobotocore", "aiohttp")):
                raise RomaError(f"{what}: {type(exc).__name__}: {_reason(exc)}") from None
            raise


def _reason(exc: BaseException) -> str:
    text = str(exc.args[1] if isinstance(exc, OSError) and len(exc.args) > 1 else exc)
    return text.strip() or type(exc).__name__

