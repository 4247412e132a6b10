"""Writing a user's files so that a crash or a full disk never leaves half a file behind.

Every file this project writes (checkpoints, prepared data, tokenizers, model.bin, pictures,
exported models) goes through `atomic_write`: the bytes go to a temporary file in the same
folder, which replaces the target with os.replace only once it is complete. os.replace is
atomic on POSIX and Windows when both names are on one file system, which the same folder
guarantees. On any failure the temporary file is removed and the old file stays as it was.
"""

import contextlib
import os


@contextlib.contextmanager
def atomic_write(path, mode="wb", **open_options):
    """`with atomic_write(path) as f: ...` writes f to path only if the block succeeds."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # hidden, and unique per process, so two writers never share a temporary file
    temporary = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        with open(temporary, mode, **open_options) as f:
            yield f
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@contextlib.contextmanager
def atomic_folder(path):
    """`with atomic_folder(path) as folder: ...` fills a fresh temporary folder beside `path`,
    which becomes `path` only if the block succeeds. An existing `path` is renamed aside, the
    new folder renamed in, and only then the old one deleted: a failure at any point leaves
    either the old folder or the new one under `path`, never a mixture of the two."""
    import shutil

    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    old = os.path.join(directory, f".{name}.old-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    try:
        yield temporary
        had_old = os.path.exists(path)
        if had_old:
            os.replace(path, old)
        try:
            os.replace(temporary, path)
        except BaseException:
            if had_old:
                os.replace(old, path)  # put the old folder back
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
