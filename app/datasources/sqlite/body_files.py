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
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import sqlite3
from collections.abc import Sequence

from app.datasources.interface import DatasourceError, DatasourceUnavailable, StoredMessage

__all__ = ["BodyFiles", "FILE_BODY_MIN"]

log = logging.getLogger("stompgate.sqlite")

# Bodies at least this long go to files. Measured (queue, 2/2, receipts, client-individual; msgs/s with files / in
# SQLite, two alternating pairs each): 32 KiB 988, 1,200 / 2,317, 2,046; 64 KiB 1,085, 922 / 1,408, 1,391;
# 128 KiB 878, 916 / 755, 721; 256 KiB 560, 465 / 388, 364. Below about 100 KiB a file's own cost (create,
# fdatasync, directory sync, unlink) is more than SQLite's pages cost; Artemis draws its line at 100 KiB too.
FILE_BODY_MIN = 128 * 1024
_NAME = re.compile(r"[0-9a-f]{32}")  # what ``write_one`` names files; anything else in a row is refused, not opened


class BodyFiles:
    """The bodies directory of one SQLite store. ``write_one``, ``sync_directory``, ``discard`` and
    ``load_if_present`` run in the store's body threads (a peek's in its reader thread), ``take_gone`` and ``sweep``
    in its writer thread."""

    def __init__(self, database_path: str, messages_table: str) -> None:
        self.directory = os.path.abspath(database_path) + "-bodies"
        self.bodies_table = f"{messages_table}_bodies"
        self.gone_table = f"{messages_table}_files_gone"
        # Whether any file body may exist (written by this process, or found at open). Until then a commit does not
        # look at the gone table, so small-message work pays nothing for this module.
        self.in_use = False

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
    def write_one(self, body: bytes) -> str:
        """Write one body to a new file and sync it; return its name. The caller then syncs the directory
        (``sync_directory``) once for all the files of a put. On failure nothing is left behind and
        DatasourceUnavailable says why (a full disk is the usual reason)."""
        self.in_use = True
        name = secrets.token_hex(16)
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view) :]
                os.fdatasync(fd)
            except BaseException:
                os.close(fd)
                _unlink(path)
                raise
            os.close(fd)
        except OSError as exc:
            raise DatasourceUnavailable(f"cannot store a message body in {self.directory}: {exc.strerror or exc}") from exc
        return name

    def sync_directory(self) -> None:
        """Make the names of the files written so far durable (a new file's name is in its directory's data)."""
        try:
            _sync_directory(self.directory)
        except OSError as exc:
            raise DatasourceUnavailable(f"cannot sync the bodies directory {self.directory}: {exc.strerror or exc}") from exc

    def discard(self, names: Sequence[str | None]) -> None:
        """Remove files: of a put that did not commit, or of messages whose deletion did."""
        for name in names:
            if name is not None:
                _unlink(os.path.join(self.directory, name))

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
            self.discard(sorted(orphans))
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
