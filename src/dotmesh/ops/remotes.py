"""``dm remote`` and ``dm s3 remote``: the remotes a store knows, and how to reach one.

A remote is a hub (``USER@HOST[:PORT]``, an API key) or an S3 bucket
(``ACCESS_KEY@ENDPOINT/BUCKET``, the secret key given apart). Secrets live in ``meta.db``,
which, like everything dm keeps in a store, only its owner may read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dotmesh.errors import AlreadyExists, NotFound, UsageError
from dotmesh.meta import config, refs
from dotmesh.meta.db import Tx
from dotmesh.model.names import check_name
from dotmesh.remote.blobs import S3Blobs
from dotmesh.remote.transport import HubTransport, S3Transport, Transport
from dotmesh.store.repo import Repo

HUB, S3 = "hub", "s3"
DEFAULT_REMOTE = "default_remote"  # the store setting naming the remote push and pull use
_HOST = re.compile(r"^(?:([A-Za-z0-9_-]{1,64})@)?([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])"
                   r"(?::(\d{1,5}))?$")


@dataclass(frozen=True)
class Remote:
    name: str
    kind: str
    url: str  # the hub's base URL, or the S3 endpoint
    user: str  # hub user, or S3 access key
    secret: str
    options: dict[str, str] = field(default_factory=dict)  # bucket, ca_cert

    @property
    def anonymous(self) -> bool:
        """A hub added without a user: it reads public dots, pushes nothing."""
        return self.kind == HUB and not self.user

    def describe(self) -> str:
        if self.anonymous:
            return f"{self.url} (no key: public dots only)"
        if self.kind == HUB:
            return f"{self.user}@{self.url}"
        return f"s3 {self.url}/{self.options['bucket']} (key {self.user})"

    def verify(self) -> bool | str:
        return self.options.get("ca_cert") or True


def parse_hub(spec: str, http: bool) -> tuple[str, str]:
    """``USER@HOST[:PORT]`` -> (user, base URL); https on 443 unless ``http`` (port 80).
    ``HOST[:PORT]`` alone gives user "": a remote without a key, for public dots."""
    m = _HOST.match(spec)
    if not m:
        raise UsageError(f"bad hub address {spec!r}: expected USER@HOST[:PORT] (or HOST[:PORT] "
                         "to read public dots without a key)")
    user, host, port = m.groups()
    user = user or ""
    scheme = "http" if http else "https"
    if port is not None and not 0 < int(port) < 65536:
        raise UsageError(f"bad port in {spec!r}")
    return user, f"{scheme}://{host}" + (f":{port}" if port else "")


def parse_s3(spec: str, secret: str | None = None) -> tuple[str, str, str, str]:
    """``ACCESS_KEY[:SECRET_KEY]@ENDPOINT/BUCKET`` -> (access, secret, endpoint URL, bucket);
    without a secret in ``spec``, ``secret`` is used (a secret on a command line is seen by
    every local user in ps). The endpoint may name its scheme; https otherwise."""
    creds, at, rest = spec.rpartition("@")
    access, colon, given = creds.partition(":")
    secret = given if colon else secret
    if not at or not access or not secret:
        raise UsageError("bad S3 remote: expected ACCESS_KEY@ENDPOINT/BUCKET (the secret key "
                         "from --secret-key-file, $DM_S3_SECRET_KEY or asked for)"
                         if not colon and at and access else
                         "bad S3 remote: expected ACCESS_KEY@ENDPOINT/BUCKET")
    scheme = "https"
    if "://" in rest:
        scheme, _, rest = rest.partition("://")
        if scheme not in ("http", "https"):
            raise UsageError(f"bad S3 endpoint scheme {scheme!r}: use http or https")
    endpoint, slash, bucket = rest.rpartition("/")
    if not slash or not endpoint or not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]",
                                                    bucket):
        raise UsageError("bad S3 remote: expected ACCESS_KEY@ENDPOINT/BUCKET, with a bucket "
                         "name of 3-63 lowercase letters, digits, '.' and '-'")
    return access, secret, f"{scheme}://{endpoint}", bucket


def _save(home: Repo, r: Remote) -> None:
    check_name(r.name, "remote name")
    with Tx(home.conn) as c:
        if config.remote_exists(c, r.name):
            raise AlreadyExists(f"remote {r.name!r} already exists (dm remote rm {r.name} "
                                "first)")
        config.add_remote(c, r.name, r.kind, r.url, r.user, r.secret, json.dumps(r.options))
        config.set_setting_once(c, DEFAULT_REMOTE, r.name)


def add_hub(home: Repo, name: str, spec: str, key: str | Callable[[], str],
            http: bool = False, ca_cert: Path | None = None) -> tuple[Remote, str]:
    """Add a hub remote after checking the key with it; returns it and the user it names.
    ``key`` may be a function that asks for it: called once the name and address are good."""
    check_name(name, "remote name")
    user, url = parse_hub(spec, http)
    options = {"ca_cert": str(ca_cert.absolute())} if ca_cert else {}
    secret = ""  # no USER@: no key is asked for or sent
    if user:
        secret = (key() if callable(key) else key).strip()
        if not secret:
            raise UsageError("the API key is empty")
    r = Remote(name, HUB, url, user, secret, options)
    t = HubTransport(r.url, r.user, r.secret, "", r.verify())
    try:
        if user:
            who = t.whoami()
        else:  # no key (public dots only): listing them checks that a hub answers there
            t.list_dots(1)
            who = ""
    finally:
        t.close()
    _save(home, r)
    return r, who


def add_s3(home: Repo, name: str, spec: str,
           secret: str | Callable[[], str] | None = None) -> Remote:
    """Add a bucket after listing it with the keys. ``secret`` may be a function that asks
    for it: called only if ``spec`` is good and holds no secret of its own."""
    check_name(name, "remote name")
    if callable(secret):
        inline = ":" in spec.rpartition("@")[0]
        if not inline:
            parse_s3(spec, "checked")  # a bad spec fails before the secret is asked for
        secret = None if inline else secret()
    access, secret, endpoint, bucket = parse_s3(spec, secret)
    r = Remote(name, S3, endpoint, access, secret, {"bucket": bucket})
    blobs(r).list("dots/")  # the bucket is there and the keys work
    _save(home, r)
    return r


def blobs(r: Remote) -> S3Blobs:
    return S3Blobs(r.url, r.options["bucket"], r.user, r.secret)


def remove(home: Repo, name: str) -> None:
    with Tx(home.conn) as c:
        if not config.remove_remote(c, name):
            raise NotFound(f"no remote named {name!r} (dm remote -v lists them)")
        config.clear_setting(c, DEFAULT_REMOTE, name)


def switch(home: Repo, name: str) -> None:
    get(home, name)
    config.set_setting(home.conn, DEFAULT_REMOTE, name)


def default(home: Repo) -> str | None:
    return config.setting(home.conn, DEFAULT_REMOTE)


def all_remotes(home: Repo) -> list[Remote]:
    return [Remote(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]))
            for r in config.remote_rows(home.conn)]


def get(home: Repo, name: str | None) -> Remote:
    """The remote ``name``, or the default one."""
    if name is None:
        name = default(home)
        if name is None:
            raise UsageError("no remote yet: add one with dm remote add NAME USER@HOST")
    for r in all_remotes(home):
        if r.name == name:
            return r
    raise NotFound(f"no remote named {name!r} (dm remote -v lists them)")


def remote_dot_for(home: Repo, r: Remote, dot: str, given: str | None) -> str:
    """Which dot on the remote a local dot goes to: as given (``NAMESPACE/DOT`` on a hub, a
    bare ``DOT`` in the user's namespace), else as it went before (or as ``dm dot
    set-upstream`` said), else the user's namespace and the same name."""
    if given is None:
        before = config.remote_dot(home.conn, dot, r.name)
        if before:
            return before
        given = dot
    return qualify(r, given)


def qualify(r: Remote, given: str) -> str:
    """A dot's name on ``r`` as a user writes it, checked: on a hub, a name without
    ``NAMESPACE/`` is in the remote's user's own namespace (as in Dotmesh, where ``dm clone
    hub app`` meant your own ``app``); a bucket's names are used as given."""
    if r.kind == HUB and "/" not in given:
        if r.anonymous:
            raise UsageError(f"remote {r.name} has no user: name the dot NAMESPACE/{given}")
        given = f"{r.user}/{given}"
    return check_remote_dot(r, given)


def set_upstream(home: Repo, dot: str, remote_name: str, remote_dot: str) -> str:
    """``dm dot set-upstream``: the dot on ``remote_name`` that ``dot`` pushes to and pulls
    from from now on (until a push or pull names another with ``--remote-name``). Nothing
    is asked of the remote: the dot there may not exist yet (a push makes it)."""
    home.require_dot(dot)
    r = get(home, remote_name)
    rdot = qualify(r, remote_dot)
    with Tx(home.conn) as c:
        refs.track(c, dot, r.name, rdot, "", None)
    return rdot


def check_remote_dot(r: Remote, given: str) -> str:
    """A dot's name on ``r``: ``NAMESPACE/DOT`` on a hub, ``/``-separated names in a bucket."""
    ns, slash, name = given.partition("/")
    if r.kind == HUB:
        if not slash:
            raise UsageError(f"a hub names dots NAMESPACE/DOT, not {given!r}")
        check_name(ns, "namespace")
        check_name(name, "dot name")
    else:
        for part in given.split("/"):
            check_name(part, "remote dot name")
    return given


def transport(home: Repo, r: Remote, remote_dot: str) -> Transport:
    if r.kind == HUB:
        return HubTransport(r.url, r.user, r.secret, remote_dot, r.verify())
    cache = home.root / "remotes" / r.name
    return S3Transport(blobs(r), remote_dot, cache)
