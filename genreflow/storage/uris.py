"""What a path or URI names, and how it may be shown: the one place URIs are parsed.

A URI may carry a secret in three places: userinfo (user:password@), the query (a signed
URL's X-Goog-Signature, sig=...) and path parameters or the fragment (;jsessionid=...).
`redacted` removes all three from one URI; `redacted_text` and `redacted_values` apply it
to every URI in a message or a record. Everything genreflow prints, raises, logs or
records goes through them. Userinfo is refused outright where a URI enters (sources,
tracking URIs): `refuse_userinfo` says where such credentials go instead.
"""

from __future__ import annotations

import re
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from genreflow.cluster import MLFLOW_CREDENTIALS_SECRET
from genreflow.errors import GenreflowError

REMOTE_SCHEMES = frozenset({"http", "https", "gs"})

# Where credentials go instead of into a URI, by what the URI is for.
SOURCE_CREDENTIALS = (
    "give an https:// source's user and password in a netrc file ($NETRC, else ~/.netrc; "
    "sent only to that host, only over https), or use a signed URL, which needs neither"
)
TRACKING_CREDENTIALS = (
    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD for a tracking server (the "
    f"pipeline's steps take them from the Secret {MLFLOW_CREDENTIALS_SECRET}, infra/README.md), "
    "PGPASSWORD or ~/.pgpass for a PostgreSQL store"
)


def scheme_of(uri: str | Path) -> str:
    """'' for a plain path, else the lower-cased scheme; unknown schemes are an error."""
    if isinstance(uri, Path):
        return ""
    text = str(uri)
    if "://" not in text:
        return ""
    scheme = text.split("://", 1)[0].lower()
    if scheme == "file" or scheme in REMOTE_SCHEMES:
        return scheme
    raise GenreflowError(
        f"{redacted(text)}: unsupported URI scheme '{scheme}://' "
        "(use a local path, file://, http://, https:// or gs://)"
    )


def is_remote(uri: str | Path) -> bool:
    """True for http://, https:// and gs:// URIs; False for plain paths and file://."""
    return scheme_of(uri) in REMOTE_SCHEMES


def local_path(uri: str | Path) -> Path | None:
    """The local file a plain path or file:// URI names; None for a remote URI."""
    scheme = scheme_of(uri)
    if scheme == "":
        return Path(uri).expanduser()
    if scheme != "file":
        return None
    parsed = urllib.parse.urlparse(str(uri))
    if parsed.netloc not in ("", "localhost"):
        raise GenreflowError(
            f"{redacted(uri)}: file:// URIs must name a local file (file:///path), "
            f"not host '{redacted('file://' + parsed.netloc).removeprefix('file://')}'"
        )
    return Path(urllib.request.url2pathname(parsed.path))


def split_gs(uri: str) -> tuple[str, str]:
    """gs://BUCKET/OBJECT -> (BUCKET, OBJECT)."""
    rest = str(uri)[len("gs://") :]
    bucket, _, name = rest.partition("/")
    if not bucket or not name or name.endswith("/"):
        raise GenreflowError(f"{redacted(uri)}: expected gs://BUCKET/OBJECT naming one object")
    return bucket, name


def gs_folder(uri: str) -> str:
    """gs://BUCKET or gs://BUCKET/PREFIX, without a trailing slash; objects go below it."""
    bucket, _, prefix = str(uri)[len("gs://") :].partition("/")
    prefix = prefix.strip("/")
    if not bucket or "//" in prefix:
        raise GenreflowError(
            f"{redacted(uri)}: expected gs://BUCKET or gs://BUCKET/PREFIX for a folder"
        )
    return f"gs://{bucket}/{prefix}" if prefix else f"gs://{bucket}"


def gs_bucket_and_prefix(folder_uri: str) -> tuple[str, str]:
    """gs://BUCKET/PREFIX (as gs_folder gives it) -> (BUCKET, 'PREFIX/'), '' for no prefix."""
    bucket, _, prefix = gs_folder(folder_uri)[len("gs://") :].partition("/")
    return bucket, f"{prefix}/" if prefix else ""


def file_name_of(uri: str | Path) -> str:
    """The last path component of a path or URI, e.g. 'genres.tar.gz'; '' if it has none."""
    path = local_path(uri)
    if path is not None:
        return path.name
    if scheme_of(uri) == "gs":
        return split_gs(str(uri))[1].rsplit("/", 1)[-1]
    return urllib.parse.unquote(urllib.parse.urlparse(str(uri)).path).rsplit("/", 1)[-1]


# --- redaction -----------------------------------------------------------------------------
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# A URI inside free text: a scheme, "://" and everything up to the next white space. Quotes,
# brackets and the like are legal in a password, so they cannot end it.
_URI_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://\S*")
# What closes a quoted or bracketed URI, or ends the sentence around it: kept as it was.
_CLOSING = "'\")]}>,.;:"


def redacted(uri: str | Path) -> str:
    """`uri` as it may be shown or recorded: userinfo (everything up to the last "@", since
    a password may hold "/", "?" or "#") replaced by REDACTED, the query by REDACTED, path
    parameters (";jsessionid=...") and the fragment dropped, but for a web app's page (see
    `_route`). Plain paths and file:/// paths are local names and stay as they are."""
    text = str(uri)
    match = _SCHEME.match(text)
    if match is None or text.lower().startswith("file:///"):
        return text
    scheme, rest = match.group(0), text[match.end() :]
    _, at, rest = rest.rpartition("@")  # the userinfo, however many "@" its password holds
    try:
        parts = urllib.parse.urlsplit(scheme + rest)
    except ValueError:  # a malformed IPv6 host, say: nothing of it is shown
        return f"{scheme}REDACTED"
    # Put together by hand: urlunsplit turns sqlite:////abs/path into sqlite://abs/path.
    return (
        scheme
        + ("REDACTED@" if at else "")
        + parts.netloc
        + _without_parameters(parts.path)
        + ("?REDACTED" if parts.query else "")
        + _route(parts.fragment)
    )


def _without_parameters(path: str) -> str:
    """A path less its segments' parameters (";jsessionid=...")."""
    return "/".join(segment.split(";", 1)[0] for segment in path.split("/"))


def _route(fragment: str) -> str:
    """What may be shown of a fragment: a web app's page ("#/runs/details/ID", the KFP and
    MLflow UIs' addresses) less its query; any other fragment (#access_token=...) is
    dropped."""
    if not fragment.startswith("/"):
        return ""
    page, question, _ = fragment.partition("?")
    return "#" + _without_parameters(page) + ("?REDACTED" if question else "")


def redacted_text(text: str) -> str:
    """`text` with every URI in it `redacted`: for messages and recorded values that may
    quote a URI (MLflow params and tags, KFP metadata, stderr)."""

    def one(match: re.Match) -> str:
        token = match.group(0)
        uri = token.rstrip(_CLOSING)
        return redacted(uri) + token[len(uri) :]

    return _URI_IN_TEXT.sub(one, str(text))


def redacted_values(value: object) -> object:
    """A record (dicts, lists, strings) with every URI in its strings `redacted`."""
    if isinstance(value, str):
        return redacted_text(value)
    if isinstance(value, dict):
        return {key: redacted_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted_values(item) for item in value]
    return value


def has_userinfo(uri: str | Path) -> bool:
    """Whether `uri` may carry user[:password]@: an "@" anywhere after "scheme://HOST", since
    a raw password may hold "/", "?" or "#" and so end the host part early. An "@" that
    belongs to the path or query is written %40 (the same to any server)."""
    text = str(uri)
    match = _SCHEME.match(text)
    rest = text[match.end() :] if match else ""
    return bool(rest) and not rest.startswith("/") and "@" in rest


def refuse_userinfo(uri: str | Path, *, what: str, instead: str) -> None:
    """Raise, naming `what` and saying where credentials go `instead`, when `uri` may carry
    userinfo: a password in a URI ends up in logs, run parameters and process listings."""
    if has_userinfo(uri):
        raise GenreflowError(
            f"{what} {redacted(uri)}: a user or password in the URI is refused (an @ that is "
            f"part of the path is written %40); {instead}"
        )


def refuse_credentials_in(arguments: Mapping[str, object]) -> None:
    """Refuse a pipeline run's arguments where a URI carries userinfo: KFP shows and stores
    every argument. The tracking URI's credentials go to MLflow's variables, a source's
    to a netrc file."""
    for key, value in arguments.items():
        if not isinstance(value, str):
            continue
        if key == "tracking_uri" or value.lower().startswith(("http://", "https://")):
            instead = TRACKING_CREDENTIALS if key == "tracking_uri" else SOURCE_CREDENTIALS
            refuse_userinfo(value, what=key, instead=instead)
