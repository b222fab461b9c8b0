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
    from dotmesh.capture.stop import Stopped
    from dotmesh.model.objects import Commit
    from dotmesh.model.tags import Tag
    from dotmesh.ops.browse import Shown
    from dotmesh.ops.checkout import ResetResult
    from dotmesh.ops.commit import CommitResult
    from dotmesh.ops.datadiff import Report
    from dotmesh.ops.history import Change
    from dotmesh.ops.pin import Visit
    from dotmesh.ops.sync import Transfer

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

    def init(self, name: str) -> Dot:
        """Make a new, empty dot (AlreadyExists if the name is taken)."""
        from dotmesh.ops import dots as dot_ops  # noqa: PLC0415

        dot_ops.init(self._store, name)
        return Dot(self, name)

    def dots(self) -> list[Dot]:
        return [Dot(self, name) for name in self._store.dots()]

    def dot(self, name: str) -> Dot:
        """An existing dot (NotFound if there is none of that name)."""
        self._store.require_dot(check_name(name, "dot name"))
        return Dot(self, name)

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
    def path(self, subdot: str = DEFAULT_SUBDOT) -> Path:
        """The folder an app keeps ``subdot``'s data in (made if it is new): what
        ``dm path DOT.SUBDOT`` prints."""
        from dotmesh.ops import dots as dot_ops  # noqa: PLC0415

        name = self.name if subdot == DEFAULT_SUBDOT else f"{self.name}.{subdot}"
        return dot_ops.path(self._store, name)

    def subdots(self) -> list[str]:
        return self._store.subdots(self.name)

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

__all__ = ["CheckoutResult", "Dot", "LogEntry", "Progress", "Ref", "Repo"]
