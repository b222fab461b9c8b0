"""dotmesh from Python: the operations ``dm`` runs, as typed calls.

```python
import dotmesh

with dotmesh.Repo.open() as repo:          # $DM_HOME, else ~/.dotmesh
    app = repo.dot("app")
    app.commit("three users, one of them broken")
    app.tag("bug-42", message="the user who cannot log in")
    with app.at("bug-42"):                  # the state, for the block; then back, exactly
        run_the_regression_test()
```

Results are the dataclasses the CLI renders (:class:`CommitResult`, :class:`ResetResult`,
:class:`dotmesh.ops.sync.Transfer`, ...), and failures raise the exceptions the CLI maps to
exit codes (:class:`dotmesh.errors.NotFound`, :class:`dotmesh.errors.Conflict`, ...; all are
:class:`dotmesh.errors.DotmeshError`). Long operations take a ``progress`` callback, called
with the number of bytes done since the last call. docs/python.md tells it with examples.

A :class:`Repo` holds the store open (one SQLite connection): use one per thread, and close
it (or use ``with``) when done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

from dotmesh.model.ids import ObjectId
from dotmesh.model.names import DEFAULT_SUBDOT, check_name
from dotmesh.store.repo import Repo as Store
from dotmesh.store.repo import default_home

if TYPE_CHECKING:  # the operations are imported when called: dm's start-up stays light
    from dotmesh.capture.hooks import Hook
    from dotmesh.capture.stop import Stopped
    from dotmesh.fs.pool import PoolInfo
    from dotmesh.model.objects import Commit
    from dotmesh.model.tags import Tag
    from dotmesh.ops.browse import Listing, Shown
    from dotmesh.ops.checkout import ResetResult
    from dotmesh.ops.commit import CommitResult
    from dotmesh.ops.datadiff import Report, SubdotKind
    from dotmesh.ops.dots import DotStatus
    from dotmesh.ops.du import DuReport
    from dotmesh.ops.fsck import FsckReport
    from dotmesh.ops.gc import GcResult, Plan
    from dotmesh.ops.history import Change, ReflogEntry
    from dotmesh.ops.hubread import RemoteLog
    from dotmesh.ops.mount import Mounted
    from dotmesh.ops.pin import Visit
    from dotmesh.ops.remotes import Remote
    from dotmesh.ops.sync import Transfer
    from dotmesh.remote.hubread import DotSummary

Progress = Callable[[int], None]
Ref = str | ObjectId  # a ref's text (HEAD~2, a branch, a tag, an id prefix) or a commit's id


def _text(ref: Ref) -> str:
    return ref.hex() if isinstance(ref, bytes) else ref


def _opt(ref: Ref | None) -> str | None:
    return None if ref is None else _text(ref)


@dataclass(frozen=True)
class LogEntry:
    """One commit of a log: its id and what it records."""

    id: ObjectId
    commit: Commit


@dataclass(frozen=True)
class CheckoutResult:
    """Whether a checkout moved the dot, and what it stopped (processes are not restarted;
    containers were, on the new branch's data)."""

    moved: bool
    stopped: Stopped


@dataclass(frozen=True)
class FsckResult:
    """What :meth:`Repo.fsck` found, what it repaired, and the check after the repair
    (``report``: its counts; ``report.problems``: what is left)."""

    report: FsckReport
    found: list[str]
    repaired: list[str]

    @property
    def ok(self) -> bool:
        return self.report.ok


class Repo:
    """A dotmesh store: the dots of one user (``$DM_HOME``; ``/var/lib/dotmesh`` for root,
    ``~/.dotmesh`` for others)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @classmethod
    def open(cls, home: str | Path | None = None) -> Repo:
        """Open the store at ``home`` (default: ``$DM_HOME``, else dm's default), making
        it if it is not there."""
        return cls(Store(Path(home) if home is not None else default_home()))

    @property
    def home(self) -> Path:
        return self._store.root

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Repo:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @staticmethod
    def backend_at(home: str | Path | None = None) -> str:
        """The folder backend of the store at ``home`` (plain, btrfs, reflink), or the one a
        store made there would get; nothing is made."""
        from dotmesh.ops import dots as dot_ops  # noqa: PLC0415

        return dot_ops.store_backend(Path(home) if home is not None else default_home())

    def choose_backend(self, backend: str | None = None) -> str:
        """Fix how the store keeps folders (plain, btrfs, reflink; None: the one its disk
        allows), which only a store without dots may change; returns it."""
        from dotmesh.workdir.branches import choose  # noqa: PLC0415

        return choose(self._store, backend)

    # ------------------------------------------------------------ dots
    def init(self, name: str, backend: str | None = None) -> Dot:
        """Make a new, empty dot (AlreadyExists if the name is taken); it becomes the
        current dot if there is none. ``backend`` (plain, btrfs, reflink): how the store
        keeps folders, chosen only before its first dot."""
        from dotmesh.ops import dots as dot_ops  # noqa: PLC0415

        dot_ops.init(self._store, name, backend)
        return Dot(self, name)

    def dots(self) -> list[Dot]:
        return [Dot(self, name) for name in self._store.dots()]

    def dot(self, name: str) -> Dot:
        """An existing dot (NotFound if there is none of that name)."""
        self._store.require_dot(check_name(name, "dot name"))
        return Dot(self, name)

    def current(self) -> Dot | None:
        """The dot commands act on when none is named (``dm switch``), if any."""
        name = self._store.current_dot()
        return None if name is None else Dot(self, name)

    def current_or(self, name: str | None) -> Dot:
        """The dot ``name``, or the current one (UsageError if there is none)."""
        return Dot(self, self._store.require_current(name))

    def switch(self, name: str) -> Dot:
        """Make ``name`` the current dot."""
        from dotmesh.ops import dots as dot_ops  # noqa: PLC0415

        dot_ops.switch(self._store, name)
        return Dot(self, name)

    def path(self, volume: str, owner: str | None = None) -> Path:
        """The folder of ``DOT[.SUBDOT]`` (the subdot is added if new; the dot must exist);
        ``owner`` (``USER[:GROUP]``): give the folder to that user (root only)."""
        from dotmesh.ops import dots as dot_ops  # noqa: PLC0415

        return dot_ops.path(self._store, volume, owner)

    def statuses(self, names: list[str] | None = None) -> list[DotStatus]:
        """``dm list``: each dot's branch, head, state, size, writers and containers."""
        from dotmesh.ops import dots as dot_ops  # noqa: PLC0415

        return dot_ops.statuses(self._store, names)

    # ------------------------------------------------------------ the store
    def object_count(self) -> int:
        """Objects in the store's index (what :meth:`fsck` verifies)."""
        return self._store.packs.count()

    def fsck(self, repair: bool = False, progress: Progress | None = None) -> FsckResult:
        """Verify every object, index row and ref. ``repair``: drop what cannot be trusted,
        move a branch whose head is lost back along its reflog, rebuild an unreadable index
        from the packs; the store is then checked again (``report``)."""
        import sqlite3  # noqa: PLC0415

        from dotmesh.errors import DamagedIndex  # noqa: PLC0415
        from dotmesh.ops import fsck as fsck_ops  # noqa: PLC0415

        def check(fix: bool) -> FsckReport:
            try:
                return fsck_ops.fsck(self._store, progress, fix)
            except sqlite3.OperationalError:
                raise
            except sqlite3.DatabaseError as e:  # a damaged page met while reading rows
                raise DamagedIndex(f"the store's index is damaged ({e}): run dm fsck "
                                   "--repair") from None

        rebuilt: list[str] = []
        try:
            r = check(repair)
        except DamagedIndex:
            if not repair:
                raise
            root = self._store.root
            self._store.close()
            rebuilt = self.rebuild_index(root)
            self._store = Store(root)
            r = check(True)
        if not repair:
            return FsckResult(r, r.problems, [])
        return FsckResult(check(False), r.problems, [*rebuilt, *r.repaired])

    @staticmethod
    def rebuild_index(home: str | Path) -> list[str]:
        """Rebuild the index (meta.db) of the store at ``home`` from its packs, when it
        cannot be read even to open the store (the damaged one is kept aside); returns what
        was done. :meth:`fsck` with ``repair`` does it too, for damage found later."""
        from dotmesh.ops import fsck as fsck_ops  # noqa: PLC0415

        return fsck_ops.rebuild(Path(home).absolute())

    def gc(self, dry_run: bool = False, repack_below: int | None = None,
           marking: Progress | None = None, sweeping: Progress | None = None,
           planned: Callable[[Plan], None] | None = None) -> GcResult:
        """Free what no ref reaches (``dm gc``); ``planned`` is called with the plan before
        anything is deleted. ``repack_below``: rewrite packs less live than this percent."""
        from dotmesh.ops import gc as gc_ops  # noqa: PLC0415

        below = gc_ops.REPACK_BELOW if repack_below is None else repack_below
        return gc_ops.gc(self._store, dry_run, below, marking, sweeping, planned)

    def expire_reflog(self, days: int | None = None, dry_run: bool = False) -> int:
        """Forget reflog entries older than ``days`` (default: the setting), with the
        discarded states only they name; returns how many."""
        from dotmesh.ops import gc as gc_ops  # noqa: PLC0415

        return gc_ops.expire_reflog(self._store, days, dry_run)

    def du(self, dots: list[str] | None = None, progress: Progress | None = None,
           with_gc: bool = True) -> DuReport:
        """Where the disk went, per dot, branch and subdot (``dm du``)."""
        from dotmesh.ops import du as du_ops  # noqa: PLC0415

        return du_ops.usage(self._store, dots, progress, with_gc)

    def settings(self) -> dict[str, int]:
        """Every setting's value (``dm config``)."""
        from dotmesh.ops import settings as settings_ops  # noqa: PLC0415

        return settings_ops.all_values(self._store)

    @staticmethod
    def setting_help() -> dict[str, str]:
        """What each setting means."""
        from dotmesh.ops.settings import SETTINGS  # noqa: PLC0415

        return {key: s.help for key, s in SETTINGS.items()}

    def setting(self, key: str) -> int:
        from dotmesh.ops import settings as settings_ops  # noqa: PLC0415

        return settings_ops.get(self._store, key)

    def set_setting(self, key: str, value: str | int | None) -> int:
        """Change a setting (``None``: back to its default); returns its value now."""
        from dotmesh.ops import settings as settings_ops  # noqa: PLC0415

        if value is None:
            settings_ops.unset(self._store, key)
        else:
            settings_ops.set_value(self._store, key, str(value))
        return settings_ops.get(self._store, key)

    def pool(self) -> PoolInfo:
        """The btrfs pool in a file under the store (``dm pool show``)."""
        from dotmesh.ops import pool as pool_ops  # noqa: PLC0415

        return pool_ops.show(self._store)

    def create_pool(self, size: int) -> PoolInfo:
        """Make and mount a btrfs pool of ``size`` bytes for the dots' folders (root only,
        before the first dot)."""
        from dotmesh.ops import pool as pool_ops  # noqa: PLC0415

        return pool_ops.create(self._store, size)

    def grow_pool(self, size: int) -> PoolInfo:
        from dotmesh.ops import pool as pool_ops  # noqa: PLC0415

        return pool_ops.grow(self._store, size)

    # ------------------------------------------------------------ remotes
    def remotes(self) -> list[Remote]:
        from dotmesh.ops import remotes  # noqa: PLC0415

        return remotes.all_remotes(self._store)

    def default_remote(self) -> str | None:
        """The remote push, pull and clone use when none is named."""
        from dotmesh.ops import remotes  # noqa: PLC0415

        return remotes.default(self._store)

    def add_hub(self, name: str, address: str, api_key: str | Callable[[], str],
                http: bool = False, ca_cert: Path | None = None) -> tuple[Remote, str]:
        """Add a hub (``USER@HOST[:PORT]``) as a remote, checking the key with it first;
        returns the remote and the user the hub knows the key as. ``api_key`` may be a
        function that asks for it, called once the name and address are good. A bare
        ``HOST[:PORT]`` adds the hub without a key (user ""): public dots only."""
        from dotmesh.ops import remotes  # noqa: PLC0415

        return remotes.add_hub(self._store, name, address, api_key, http, ca_cert)

    def add_s3(self, name: str, spec: str,
               secret: str | Callable[[], str] | None = None) -> Remote:
        """Add a bucket (``ACCESS_KEY@ENDPOINT/BUCKET``) as a remote, after listing it with
        the keys; ``secret`` may be a function that asks for it."""
        from dotmesh.ops import remotes  # noqa: PLC0415

        return remotes.add_s3(self._store, name, spec, secret)

    def remove_remote(self, name: str) -> None:
        from dotmesh.ops import remotes  # noqa: PLC0415

        remotes.remove(self._store, name)

    def switch_remote(self, name: str) -> None:
        """Make ``name`` the default remote."""
        from dotmesh.ops import remotes  # noqa: PLC0415

        remotes.switch(self._store, name)

    def remote_dots(self, remote: str) -> list[DotSummary]:
        """The dots this remote's user may read on the hub ``remote`` (nothing is cloned)."""
        from dotmesh.ops import hubread  # noqa: PLC0415 - the network code, only when used

        return hubread.dots(self._store, remote)

    def remote_log(self, remote: str, remote_dot: str | None = None, ref: str | None = None,
                   limit: int | None = None, dot: str | None = None) -> RemoteLog:
        """A dot's log on the hub ``remote``: ``remote_dot`` (NAMESPACE/DOT), else the one
        the local ``dot`` pushes to there (default: the current dot's)."""
        from dotmesh.ops import hubread  # noqa: PLC0415 - the network code, only when used

        local = None if remote_dot else self._store.require_current(dot)
        return hubread.log(self._store, remote, remote_dot, local, ref, limit)

    def remote_branches(self, remote: str, remote_dot: str | None = None,
                        dot: str | None = None) -> tuple[str, dict[str, ObjectId]]:
        """The remote dot's full name and its branches' heads on the hub ``remote``."""
        from dotmesh.ops import hubread  # noqa: PLC0415 - the network code, only when used

        local = None if remote_dot else self._store.require_current(dot)
        return hubread.heads(self._store, remote, remote_dot, local)

    # ------------------------------------------------------------ mounts
    def mounts(self) -> list[Mounted]:
        """The commits ``dm mount`` has mounted."""
        from dotmesh.ops import mount as mount_ops  # noqa: PLC0415

        return mount_ops.mounted(self._store)

    def umount(self, folder: str | Path) -> Mounted:
        from dotmesh.ops import mount as mount_ops  # noqa: PLC0415

        return mount_ops.stop(self._store, Path(folder))

    def clone(self, remote: str | None, remote_dot: str, branch: str | None = None,
              local_name: str | None = None, progress: Progress | None = None,
              same_owner: bool = False) -> Transfer:
        """Copy a dot from a remote (``dm clone``), with its tags and folders; the new
        dot is ``repo.dot(result.dot)``."""
        from dotmesh.ops import sync  # noqa: PLC0415 - the network code, only when used

        return sync.clone(self._store, remote, remote_dot, branch, local_name, progress,
                          same_owner)


class Dot:
    """One app's data: its subdots (one folder per data store), branches, commits, tags."""

    def __init__(self, repo: Repo, name: str) -> None:
        self.repo, self.name = repo, name

    def __repr__(self) -> str:
        return f"Dot({self.name!r})"

    @property
    def _store(self) -> Store:
        return self.repo._store  # noqa: SLF001 - one package

    # ------------------------------------------------------------ folders
    def path(self, subdot: str = DEFAULT_SUBDOT, owner: str | None = None) -> Path:
        """The folder an app keeps ``subdot``'s data in (made if it is new): what
        ``dm path DOT.SUBDOT`` prints."""
        name = self.name if subdot == DEFAULT_SUBDOT else f"{self.name}.{subdot}"
        return self.repo.path(name, owner)

    def subdots(self) -> list[str]:
        return self._store.subdots(self.name)

    def subdot_kinds(self) -> list[SubdotKind]:
        """Each subdot's folder and what ``diff_data`` reads it as."""
        from dotmesh.ops import datadiff  # noqa: PLC0415

        return datadiff.subdot_kinds(self._store, self.name)

    def set_kind(self, subdot: str, kind: str) -> None:
        """Say what a subdot holds (postgres, redis, sqlite, files; auto: detect again)."""
        from dotmesh.ops import datadiff  # noqa: PLC0415

        datadiff.set_kind(self._store, self.name, subdot, kind)

    def status(self) -> DotStatus:
        """Branch, head, clean or dirty (with the changes), writers, containers, remotes."""
        from dotmesh.ops import dots as dot_ops  # noqa: PLC0415

        return dot_ops.statuses(self._store, [self.name])[0]

    def delete(self, stop_writers: bool = False, force: bool = True) -> Stopped:
        """Delete the dot with its folders and history (``force=False`` refuses, as
        ``dm dot delete`` without -f does); refused while processes or containers use it,
        unless ``stop_writers``."""
        from dotmesh.ops import dots as dot_ops  # noqa: PLC0415

        return dot_ops.delete(self._store, self.name, force, stop_writers)

    # ------------------------------------------------------------ hooks
    def hooks(self) -> list[Hook]:
        from dotmesh.ops import hooks as hook_ops  # noqa: PLC0415

        return hook_ops.hooks(self._store, self.name)

    def add_hook(self, stage: str, command: str, subdot: str | None = None,
                 timeout: float = 60.0) -> int:
        """Run ``command`` (a shell line) at ``stage`` (pre-freeze, post-thaw) of every
        commit; returns its number."""
        from dotmesh.ops import hooks as hook_ops  # noqa: PLC0415

        return hook_ops.add_hook(self._store, self.name, stage, command, subdot, timeout)

    def remove_hook(self, hook_id: int) -> None:
        from dotmesh.ops import hooks as hook_ops  # noqa: PLC0415

        hook_ops.remove_hook(self._store, self.name, hook_id)

    # ------------------------------------------------------------ history
    @property
    def branch(self) -> str:
        """The branch checked out."""
        return self._store.branch(self.name)

    @property
    def head(self) -> ObjectId | None:
        """The checked-out branch's head (None before the first commit)."""
        return self._store.head(self.name, self.branch)

    def branches(self) -> dict[str, ObjectId | None]:
        return self._store.branches(self.name)

    def delete_branch(self, name: str, force: bool = False) -> ObjectId | None:
        """Delete a branch that is not checked out; without ``force``, refused if its head
        is in no other branch or its folders hold uncommitted changes. Returns its head."""
        from dotmesh.ops import gc as gc_ops  # noqa: PLC0415

        return gc_ops.delete_branch(self._store, self.name, name, force)

    def reflog(self, limit: int | None = None) -> list[ReflogEntry]:
        """How the branches moved, newest first, with the working states saved or kept."""
        from dotmesh.ops import history  # noqa: PLC0415

        return history.reflog(self._store, self.name, limit)

    def commit_of(self, ref: Ref) -> Commit:
        """The commit ``ref`` names."""
        return self._store.commit(self.resolve(ref))

    def resolve(self, ref: Ref) -> ObjectId:
        """A commit id for ``HEAD``, ``HEAD~2``, a branch, a tag or an id prefix."""
        return self._store.resolve(self.name, _text(ref))

    def commit(self, message: str, metadata: dict[str, str] | None = None,
               freeze: bool = True, freeze_timeout: float = 5.0, author: str | None = None,
               progress: Progress | None = None) -> CommitResult:
        """Commit every subdot at once; running writers are stopped for a moment
        (``freeze``) so that all subdots are captured at one point in time. ``author``:
        default ``$DM_AUTHOR``, else the user's name."""
        from dotmesh.ops import commit as commit_ops  # noqa: PLC0415

        return commit_ops.commit(self._store, self.name, message, metadata, author, progress,
                                 freeze, freeze_timeout)

    def log(self, ref: Ref = "HEAD", limit: int | None = None) -> list[LogEntry]:
        """Commits from ``ref`` back along first parents, newest first."""
        from dotmesh.ops import history  # noqa: PLC0415

        walk = history.log(self._store, self.name, limit, _text(ref))
        return [LogEntry(oid, c) for oid, c in walk]

    def show(self, ref: Ref = "HEAD") -> Shown:
        """A commit with per-subdot sizes and a diff stat against its parent."""
        from dotmesh.ops import browse  # noqa: PLC0415

        return browse.show(self._store, self.name, _text(ref))

    def diff(self, a: Ref | None = None, b: Ref | None = None) -> list[Change]:
        """Files that differ from ``a`` (default HEAD) to ``b`` (default: the working
        state)."""
        from dotmesh.ops import history  # noqa: PLC0415

        return history.diff(self._store, self.name, _opt(a), _opt(b))

    def diff_data(self, a: Ref | None = None, b: Ref | None = None,
                  subdot: str | None = None) -> list[Report]:
        """What changed in each subdot's own terms: PostgreSQL and SQLite rows and schema,
        Redis keys, text lines (``dm diff --data``)."""
        from dotmesh.ops import datadiff  # noqa: PLC0415

        return datadiff.diff_data(self._store, self.name, _opt(a), _opt(b), subdot)

    def ls(self, where: str | None = None, recursive: bool = False) -> Listing:
        """What a commit holds: ``REF`` (its subdots and sizes) or ``REF:SUBDOT/PATH``
        (a folder's entries, or one file), without checking anything out."""
        from dotmesh.ops import browse  # noqa: PLC0415

        return browse.ls(self._store, self.name, where, recursive)

    def cat(self, where: str) -> Iterator[bytes | memoryview]:
        """The bytes of the file ``REF:SUBDOT/PATH``, streamed and checked as they come."""
        from dotmesh.ops import browse  # noqa: PLC0415

        return browse.cat(self._store, self.name, where)

    def mount(self, ref: Ref, folder: str | Path) -> Mounted:
        """Mount the commit ``ref`` read-only at ``folder`` (an empty folder) through FUSE;
        gc keeps it until :meth:`Repo.umount`."""
        from dotmesh.ops import mount as mount_ops  # noqa: PLC0415

        return mount_ops.start(self._store, self.name, _text(ref), Path(folder))

    # ------------------------------------------------------------ moving
    def checkout(self, branch: str, create: bool = False, at: str | None = None,
                 stop_writers: bool = False, progress: Progress | None = None
                 ) -> CheckoutResult:
        """Switch to ``branch`` (``create``: a new one, at ``at``, default HEAD); each branch
        keeps its own working state. ``stop_writers``: stop the processes using the dot
        instead of refusing."""
        from dotmesh.ops import checkout as checkout_ops  # noqa: PLC0415

        moved, stopped = checkout_ops.checkout(self._store, self.name, branch, create,
                                               progress, stop_writers, at)
        return CheckoutResult(moved, stopped)

    def reset(self, ref: Ref, stop_writers: bool = False,
              progress: Progress | None = None) -> ResetResult:
        """Move the branch to ``ref`` and make the working state match; the state it
        replaces is saved first (``ResetResult.saved`` or ``.kept_as``)."""
        from dotmesh.ops import checkout as checkout_ops  # noqa: PLC0415

        return checkout_ops.reset_hard(self._store, self.name, _text(ref), progress,
                                       stop_writers)

    @contextmanager
    def at(self, ref: Ref, stop_writers: bool = False, fetch: bool = True,
           progress: Progress | None = None) -> Iterator[Visit]:
        """The state ``ref`` (a tag, branch or commit; fetched from the dot's remote if it
        is not here) for the block; afterwards exactly the state that was there before, on
        the branch and head it had. What the block changed is saved (``dm reflog``)."""
        from dotmesh.ops import pin  # noqa: PLC0415

        with pin.at(self._store, self.name, _text(ref), stop_writers, fetch,
                    progress) as visit:
            yield visit

    def keep(self, visit: Visit, branch: str, message: str) -> ObjectId:
        """Inside :meth:`at`: commit the state the block made on a new ``branch`` (a failed
        test's state, to share with ``push(branch=...)``)."""
        from dotmesh.ops import pin  # noqa: PLC0415

        return pin.keep_on(self._store, self.name, visit, branch, message)

    def export(self, ref: Ref, dest: str | Path, subdot: str | None = None,
               progress: Progress | None = None) -> list[str]:
        """Write a commit's subdots (or one) as plain folders into ``dest`` (new, or an
        empty folder); returns the subdots written."""
        from dotmesh.ops import browse  # noqa: PLC0415

        return browse.export(self._store, self.name, _text(ref), Path(dest), subdot,
                             progress)

    def export_tar(self, ref: Ref, out: BinaryIO, subdot: str | None = None) -> None:
        """Write a commit as a tar stream to ``out`` (``SUBDOT/PATH`` names, or ``PATH``
        with ``subdot``); holes are written as zeros."""
        from dotmesh.ops import browse  # noqa: PLC0415

        browse.tar_stream(self._store, self.name, _text(ref), out, subdot)

    # ------------------------------------------------------------ tags
    def tag(self, name: str, ref: Ref = "HEAD", message: str = "",
            force: bool = False) -> Tag:
        """Name the commit ``ref``; the name works wherever a ref does, travels with the
        dot and keeps its commit from gc."""
        from dotmesh.ops.commit import default_author  # noqa: PLC0415

        commit = self.resolve(ref)
        self._store.add_tag(self.name, name, commit, message, default_author(), force)
        return self._store.tags(self.name)[name]

    def tags(self) -> dict[str, Tag]:
        return self._store.tags(self.name)

    def delete_tag(self, name: str) -> Tag:
        return self._store.delete_tag(self.name, name)

    # ------------------------------------------------------------ sharing
    def push(self, remote: str | None = None, branch: str | None = None,
             force: bool = False, tags: bool = True, remote_dot: str | None = None,
             progress: Progress | None = None, total: Progress | None = None,
             stash_on_divergence: bool = False) -> Transfer:
        """Send a branch (default: the checked-out one) and the dot's tags to a remote
        (``remote_dot``: its name there, default ``USER/DOT`` or as before); ``total`` is
        called once with the bytes to send. ``stash_on_divergence``: if the remote's branch
        has commits this one lacks, keep its head on a new branch there
        (``Transfer.stashed``) and move the branch to ours."""
        from dotmesh.ops import sync  # noqa: PLC0415 - the network code, only when used

        return sync.push(self._store, self.name, remote, branch, remote_dot, force, progress,
                         total, with_tags=tags, stash_on_divergence=stash_on_divergence)

    def set_upstream(self, remote: str, remote_dot: str) -> str:
        """The dot on ``remote`` this one pushes to and pulls from (``NAMESPACE/DOT`` on a
        hub, or ``DOT`` in your own namespace there); returns its full name."""
        from dotmesh.ops import remotes  # noqa: PLC0415 - the network code, only when used

        return remotes.set_upstream(self._store, self.name, remote, remote_dot)

    def fetch(self, ref: str, remote: str | None = None) -> ObjectId:
        """Bring a tag, a branch's head or a commit (by its whole id) of the dot's remote
        here, without moving anything; a tag is made here too."""
        from dotmesh.ops import sync  # noqa: PLC0415 - the network code, only when used

        return sync.fetch_ref(self._store, self.name, ref, remote)

    def pull(self, remote: str | None = None, branch: str | None = None,
             stop_writers: bool = False, same_owner: bool = False,
             progress: Progress | None = None, remote_dot: str | None = None,
             stash_on_divergence: bool = False) -> Transfer:
        """Fetch a branch's new commits and the remote's tags; fast-forward to them
        (``remote_dot``: the dot's name there, remembered). ``stash_on_divergence``: if
        both sides have new commits, keep this branch's head on a new branch
        (``Transfer.stashed``) and take the remote's."""
        from dotmesh.ops import sync  # noqa: PLC0415 - the network code, only when used

        return sync.pull(self._store, self.name, remote, branch, progress, stop_writers,
                         same_owner, remote_dot, stash_on_divergence)

    def pull_all(self, remote: str | None = None, stop_writers: bool = False,
                 same_owner: bool = False, progress: Progress | None = None,
                 remote_dot: str | None = None,
                 stash_on_divergence: bool = False) -> list[Transfer]:
        """:meth:`pull` every branch of the dot on the remote (``dm pull --all``): one
        :class:`Transfer` each; a branch that could not move has status ``refused``."""
        from dotmesh.ops import sync  # noqa: PLC0415 - the network code, only when used

        return sync.pull_all(self._store, self.name, remote, progress, stop_writers,
                             same_owner, remote_dot, stash_on_divergence)

__all__ = ["CheckoutResult", "Dot", "FsckResult", "LogEntry", "Progress", "Ref", "Repo"]
