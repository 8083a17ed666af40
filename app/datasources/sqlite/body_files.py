"""Large message bodies as files beside the SQLite database, in ``<database>-bodies/``, as Artemis keeps bodies over
100 KiB apart from its journal.

Why: SQLite writes a blob twice (into the WAL, then into the database file at the checkpoint), a 4 KiB page and a
frame header at a time, and reads it back a page at a time; the writer thread every claim and ACK waits for does all
of that. Storing a 1 MiB body took 5.5 ms there; a file takes one write and one ``fdatasync`` (1.3 ms on the same
disk), can be written by other threads while the writer goes on, and is read back with one read.

Durability: a body's file is written and synced, and then its directory synced, before the transaction that stores
the message commits (``SqlitePollQueue.put`` awaits ``write`` first). So every committed message has its body on disk,
and a RECEIPT still means durably stored. A crash between the two leaves a file no row names; the store removes such
files when it next opens (one gateway process per database file, so no unnamed file can belong to a live put).

Where a name is kept: the message's row in the bodies table holds the file's name as TEXT, where an inline body is a
BLOB (SQLite keeps each value's type), so a claim's one statement still returns either; a claim's caller then reads
the files on the body threads (``load_if_present``), not in the writer.

Deletion: a trigger on the bodies table records the names of deleted file bodies in ``<ns>_files_gone``, so every
way a message leaves (ACK, purge, expiry) is covered by SQL alone. The writer takes the names out of that table in
the same transaction, just before its COMMIT, and unlinks the files (on a body thread: an unlink of a synced 1 MiB
file costs about 0.9 ms) only once the COMMIT succeeded. A rolled-back delete unlinks nothing; a crash after the
COMMIT leaves files no row names, removed at the next open.

Reuse: a file whose message is gone is kept as a spare (up to ``SPARE_FILES_MAX``) and the next large body is
written over it, in place. Creating, syncing the directory and unlinking a 1 MiB file cost the kernel about 0.6 ms
of CPU per message more than overwriting an allocated one (a new file's blocks and name go through the file system's
journal; an overwritten file of the same size changes neither). Two rules keep it safe:
- only with ``synchronous`` FULL or EXTRA: the deletion that frees a file is then durable before the file is written
  over, so a crash can never bring back a row naming a file that now holds another message's body;
- never under a reader: a claim's or a peek's file is read after the statement that named it, beside the writer, and
  the message may be deleted meanwhile. Every such reader holds a ``ReadGuard`` from before its statement until it has
  read; a freed file waits (in limbo) until every reader that was running when it was freed is done. Unlinking needs
  no such wait (a reader's open file stays readable; a later open finds nothing and leaves the message out), so a
  spare beyond the limit is simply unlinked. Spares are unlinked at close, and any left by a crash at the next open.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import sqlite3
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence

from app.datasources.interface import DatasourceError, DatasourceUnavailable, StoredMessage

__all__ = ["BodyFiles", "FILE_BODY_MIN", "READ_BACK_SAVED_BYTES", "ReadGuard", "SPARE_FILES_MAX"]

log = logging.getLogger("stompgate.sqlite")

# Bodies at least this long go to files. Measured (queue, 2/2, receipts, client-individual; msgs/s with files / in
# SQLite, two alternating pairs each): 32 KiB 988, 1,200 / 2,317, 2,046; 64 KiB 1,085, 922 / 1,408, 1,391;
# 128 KiB 878, 916 / 755, 721; 256 KiB 560, 465 / 388, 364. Below about 100 KiB a file's own cost (create,
# fdatasync, directory sync, unlink) is more than SQLite's pages cost; Artemis draws its line at 100 KiB too.
FILE_BODY_MIN = 128 * 1024
# Files kept for reuse once their message is gone (each as large as the body it last held; 32 MiB of disk at 1 MiB).
SPARE_FILES_MAX = 32
# The bodies most recently written, kept (the put's own bytes objects, not copies) so that a claim soon after the put
# takes them from memory instead of reading its file back: at most this many bytes, oldest dropped first. With
# consumers keeping up, a body is claimed within milliseconds of its write, and this is what they hold meanwhile.
READ_BACK_SAVED_BYTES = 32 * 1024 * 1024
_NAME = re.compile(r"[0-9a-f]{32}")  # what ``write_one`` names files; anything else in a row is refused, not opened


class BodyFiles:
    """The bodies directory of one SQLite store. ``write_one``, ``sync_directory``, ``discard`` and
    ``load_if_present`` run in the store's body threads (a peek's in its reader thread), ``take_gone`` and ``sweep``
    in its writer thread."""

    def __init__(self, database_path: str, messages_table: str, *, reuse: bool = False) -> None:
        self.directory = os.path.abspath(database_path) + "-bodies"
        self.bodies_table = f"{messages_table}_bodies"
        self.gone_table = f"{messages_table}_files_gone"
        # Whether any file body may exist (written by this process, or found at open). Until then a commit does not
        # look at the gone table, so small-message work pays nothing for this module.
        self.in_use = False
        self.reuse = reuse  # keep freed files as spares (only where deletions are durable at once: module docstring)
        # Reuse bookkeeping, shared by the body threads, the writer and the reader: the epoch counts the frees, a
        # reader is registered under the epoch it began in, a freed file waits in limbo under the epoch it was freed
        # in until no reader began at or before that.
        self._lock = threading.Lock()
        self._epoch = 0
        self._readers: dict[int, int] = {}
        self._limbo: deque[tuple[int, str]] = deque()
        self._spares: list[str] = []
        self._recent: OrderedDict[str, bytes] = OrderedDict()  # name -> body just written (READ_BACK_SAVED_BYTES)
        self._recent_bytes = 0

    @staticmethod
    def schema(messages_table: str) -> str:
        """The gone table and the trigger that fills it (run inside the store's schema transaction)."""
        m = messages_table
        return f"""
            CREATE TABLE IF NOT EXISTS {m}_files_gone (name TEXT NOT NULL);
            CREATE TRIGGER IF NOT EXISTS {m}_body_file_gone AFTER DELETE ON {m}_bodies WHEN typeof(OLD.body) = 'text'
            BEGIN INSERT INTO {m}_files_gone (name) VALUES (OLD.body); END;
        """

    # -- writing (body threads) ------------------------------------------------------------------------------------
    def write_one(self, body: bytes) -> tuple[str, bool]:
        """Write one body to a file, over a spare one if there is one, and sync it; return its name and whether the
        file is new. If any is, the caller then syncs the directory (``sync_directory``) once for all the files of a
        put. On failure nothing is left behind and DatasourceUnavailable says why (a full disk is the usual reason)."""
        self.in_use = True
        spare = self._take_spare()
        if spare is not None:
            try:
                self._write(spare, body, os.O_WRONLY | os.O_CLOEXEC)
                self._remember(spare, body)
                return spare, False
            except OSError:  # the spare cannot be written (or opened, for now): let it go; try a new file once
                _unlink(os.path.join(self.directory, spare))
        name = secrets.token_hex(16)
        try:
            self._write(name, body, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            raise DatasourceUnavailable(f"cannot store a message body in {self.directory}: {exc.strerror or exc}") from exc
        self._remember(name, body)
        return name, True

    def _remember(self, name: str, body: bytes) -> None:
        if type(body) is not bytes or len(body) > READ_BACK_SAVED_BYTES:  # (only what nobody can change meanwhile)
            return
        with self._lock:
            self._recent[name] = body
            self._recent_bytes += len(body)
            while self._recent_bytes > READ_BACK_SAVED_BYTES:
                self._recent_bytes -= len(self._recent.popitem(last=False)[1])

    def _forget(self, names: list[str]) -> None:
        """(Locked.) A freed file's saved body goes before the file can be written over (or is unlinked)."""
        for name in names:
            body = self._recent.pop(name, None)
            if body is not None:
                self._recent_bytes -= len(body)

    def recall(self, messages: list[StoredMessage]) -> bool:
        """Fill in, from memory, the bodies a claim returned as file names that were written a moment ago; each is
        taken out (a redelivery reads the file). The rest are left for ``load_if_present``; True if none is left."""
        left = False
        with self._lock:
            recent = self._recent
            for message in messages:
                name = message.body
                if isinstance(name, str):
                    body = recent.pop(name, None)
                    if body is None:
                        left = True
                    else:
                        self._recent_bytes -= len(body)
                        message.body = body
        return not left

    def _write(self, name: str, body: bytes, flags: int) -> None:
        path = os.path.join(self.directory, name)
        fd = os.open(path, flags, 0o600)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            if not flags & os.O_CREAT and os.fstat(fd).st_size > len(body):  # a spare that held a longer body
                os.ftruncate(fd, len(body))
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        os.close(fd)

    def sync_directory(self) -> None:
        """Make the names of the files written so far durable (a new file's name is in its directory's data)."""
        try:
            _sync_directory(self.directory)
        except OSError as exc:
            raise DatasourceUnavailable(f"cannot sync the bodies directory {self.directory}: {exc.strerror or exc}") from exc

    def discard(self, names: Sequence[str | None], *, named_durably: bool = True) -> None:
        """Let files go: of a put that did not commit, or of messages whose deletion did. Kept as spares when reused
        (in limbo until the readers that may hold their names are done), else removed. ``named_durably`` False: the
        directory was not synced after them, so a spare's name could be lost in a crash; such files are removed."""
        freed = [name for name in names if name is not None]
        with self._lock:
            self._forget(freed)
            if self.reuse and named_durably:
                self._limbo.extend((self._epoch, name) for name in freed)
                self._epoch += 1
                freed = self._surplus()
        for name in freed:
            _unlink(os.path.join(self.directory, name))

    def drop_spares(self) -> None:
        """At close: remove the spare files (and those still in limbo), so that only stored messages use disk."""
        with self._lock:
            self.reuse = False  # a put still finishing after the close unlinks what it discards
            self._recent.clear()
            self._recent_bytes = 0
            names = self._spares + [name for _, name in self._limbo]
            self._spares, self._limbo = [], deque()
        for name in names:
            _unlink(os.path.join(self.directory, name))

    def spares(self) -> set[str]:
        """The files kept for reuse or waiting to be (no stored message names them)."""
        with self._lock:
            return set(self._spares) | {name for _, name in self._limbo}

    def guard(self) -> ReadGuard:
        return ReadGuard(self)

    def _take_spare(self) -> str | None:
        if not self.reuse:
            return None
        with self._lock:
            self._promote()
            return self._spares.pop() if self._spares else None

    def _promote(self) -> None:
        """(Locked.) Files freed before every running reader began are spares now."""
        oldest = min(self._readers) if self._readers else self._epoch
        limbo = self._limbo
        while limbo and limbo[0][0] < oldest:
            self._spares.append(limbo.popleft()[1])

    def _surplus(self) -> list[str]:
        """(Locked.) Spares beyond the limit, oldest first, to unlink; unlinking is safe even under a reader."""
        out = []
        while len(self._spares) + len(self._limbo) > SPARE_FILES_MAX:
            out.append(self._spares.pop(0) if self._spares else self._limbo.popleft()[1])
        return out

    def _enter(self, guard: ReadGuard) -> None:
        # (Not skipped while no file body exists yet: a peek's statement runs after its guard, beside the writer, and
        # may see the first one.)
        if not self.reuse:
            return
        with self._lock:
            if not guard.done and guard.epoch is None:
                guard.epoch = self._epoch
                self._readers[guard.epoch] = self._readers.get(guard.epoch, 0) + 1

    def _exit(self, guard: ReadGuard) -> None:
        with self._lock:
            guard.done = True
            epoch, guard.epoch = guard.epoch, None
            if epoch is not None:
                left = self._readers[epoch] - 1
                if left:
                    self._readers[epoch] = left
                else:
                    del self._readers[epoch]

    # -- reading --------------------------------------------------------------------------------------------------
    def load_if_present(self, messages: list[StoredMessage]) -> list[StoredMessage]:
        """Replace each file name a claim or a peek returned as a body with the file's content. This runs beside the
        writer, so the message may have been deleted since (an ACK after its lease lapsed and another consumer
        took it, or a purge), and its file with it: such a message is left out, as it is gone."""
        out = []
        for message in messages:
            name = message.body
            if isinstance(name, str):
                try:
                    message.body = self._read(name)
                except FileNotFoundError:
                    log.warning("message %s: its body file is gone (deleted meanwhile?); not delivered", message.message_id)
                    continue
                except OSError as exc:
                    raise DatasourceError(f"cannot read a message body in {self.directory}: {exc.strerror or exc}") from exc
            out.append(message)
        return out

    def _read(self, name: str) -> bytes:
        if not _NAME.fullmatch(name):
            raise DatasourceError(f"the bodies table names {name!r}, which is not a body file's name")
        with open(os.path.join(self.directory, name), "rb", buffering=0) as file:
            return file.readall()

    # -- removal ---------------------------------------------------------------------------------------------------
    def take_gone(self, conn: sqlite3.Connection) -> list[str]:
        """In the writer's transaction, just before its COMMIT: the files of the bodies it deleted, taken out of the
        gone table in the same transaction. The caller unlinks them once the COMMIT succeeded; if it fails, the
        deletions and this are rolled back together."""
        if not self.in_use:
            return []
        return [name for (name,) in conn.execute(f"DELETE FROM {self.gone_table} RETURNING name") if _NAME.fullmatch(name)]

    def sweep(self, conn: sqlite3.Connection) -> None:
        """At open (writer thread): create the directory and remove files no row names: written for a put that never
        committed, or of a message deleted just before a crash."""
        try:
            if not os.path.isdir(self.directory):
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                # its name is in its parent's data: synced, or a power loss may take it and the synced files in it
                _sync_directory(os.path.dirname(self.directory))
            present = set(os.listdir(self.directory))
        except OSError as exc:
            raise DatasourceError(f"cannot use the bodies directory {self.directory}: {exc.strerror or exc}") from exc
        conn.execute(f"DELETE FROM {self.gone_table}")  # empty after every commit; nothing to do with it here
        named = {name for (name,) in conn.execute(f"SELECT body FROM {self.bodies_table} WHERE typeof(body) = 'text'")}
        orphans = {name for name in present - named if _NAME.fullmatch(name)}  # other files are not ours to remove
        if orphans:
            log.info("removing %d body file(s) no stored message names, in %s", len(orphans), self.directory)
            for name in sorted(orphans):
                _unlink(os.path.join(self.directory, name))
        self.in_use = bool(named)


def _sync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("cannot remove %s: %s", path, exc.strerror or exc)


class ReadGuard:
    """Held by a claim or a peek from before the statement that may name body files until it has read them (or given
    up): no file it could have seen named is written over meanwhile. ``enter`` runs in the thread that runs the
    statement, ``exit`` wherever the reading ends; an ``exit`` first (a cancelled claim) makes a later ``enter`` do
    nothing, so a guard never outlives its reader."""

    __slots__ = ("files", "epoch", "done")

    def __init__(self, files: BodyFiles) -> None:
        self.files = files
        self.epoch: int | None = None
        self.done = False

    def enter(self) -> None:
        self.files._enter(self)

    def exit(self) -> None:
        self.files._exit(self)
