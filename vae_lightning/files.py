"""Files written whole and read with one-line errors: a temporary beside the final name,
fsynced, then renamed, so a kill or a full disk never leaves a partial file under a final name;
a full disk, and a file that is not what it should hold, are named in one line."""

import csv
import errno
import hashlib
import io
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torchvision.utils import save_image

from vae_lightning.errors import UserError, first_line


class DiskFullError(UserError, RuntimeError):
    """No space was left for a file; the message names the disk, the space needed and free."""


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def disk_full_message(path: Path | None, needed: int | None = None) -> str:
    """``No space left on the disk at <mount point> for <file>: it needs .. MB, .. MB are
    free. ...``; without ``path`` (a write that named no file), a shorter line."""
    advice = (
        "Every file under its final name is whole: free space there and run the command "
        "again (a run resumes from its last.ckpt)"
    )
    if path is None:
        return f"No space left on a disk this command writes to. {advice}"
    folder = path.parent if path.parent.exists() else Path.cwd()
    free = shutil.disk_usage(folder).free
    size = f"it needs {needed / 1e6:.2f} MB, " if needed is not None else ""
    return (
        f"No space left on the disk at {_mount_point(folder)} for {path}: {size}"
        f"{free / 1e6:.2f} MB are free. {advice}"
    )


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of ``path`` left by writers that were killed mid-write."""
    for temporary in path.parent.glob(f".{path.name}.*.tmp"):
        pid = temporary.name[len(path.name) + 2 : -len(".tmp")]
        if pid.isdigit() and not _is_running(int(pid)):
            temporary.unlink(missing_ok=True)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds its old content or all of the new:
    a temporary file in the same folder (so on the same file system), flushed and fsynced,
    then renamed over ``path``. A full disk raises ``DiskFullError``, the temporary removed;
    a temporary a killed writer left is removed by the next write of ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(disk_full_message(path, len(data))) from None
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, text.encode())


def save_png_atomically(grid: torch.Tensor, path: Path) -> None:
    """An image grid (``make_grid``'s output, values in [0, 1]) as a PNG, through
    ``write_atomically``."""
    buffer = io.BytesIO()
    save_image(grid, buffer, format="png")
    write_atomically(path, buffer.getbuffer())


def markdown_table(
    rows: list[dict[str, Any]], headers: dict[str, str] | None = None, digits: int = 4
) -> str:
    """``rows`` as a Markdown table: a column per key of ``headers`` (key: title; by default
    the first row's keys), floats with ``digits`` decimals, a dash for None."""
    headers = headers or {key: key for key in rows[0]}

    def cell(value: Any) -> str:
        if value is None:
            return "—"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers.values()) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(row[key]) for key in headers) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(
    rows: list[dict[str, Any]],
    path: Path,
    headers: dict[str, str] | None = None,
    digits: int = 4,
    note: str = "",
) -> None:
    """``rows`` as ``path`` (``markdown_table``, then ``note``) and beside it as CSV (the same
    name with ``.csv``), both written whole."""
    write_text_atomically(path, markdown_table(rows, headers, digits) + note)
    write_text_atomically(path.with_suffix(".csv"), csv_text(rows))


def csv_text(rows: list[dict[str, Any]]) -> str:
    """``rows`` as CSV, with the first row's keys as the header."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def torch_save_atomically(obj: Any, path: Path) -> None:
    """``torch.save`` through ``write_atomically``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomically(path, buffer.getbuffer())


class RunFileDamagedError(UserError, ValueError):
    """A run file cannot be read as what it should hold; the message names it and why."""


def has_key(tree: Any, dotted_key: str) -> bool:
    for part in dotted_key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def read_run_file(path: Path, expected: type = dict, required: Sequence[str] = ()) -> Any:
    """The YAML or JSON file ``path``, which must hold a ``expected`` (a dict or a list) and,
    for a dict, each dotted key of ``required``; else ``RunFileDamagedError`` naming the file."""
    damaged = f"{path} is damaged"
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:  # JSON and Unicode errors are ValueErrors
        reason = first_line(err)
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise RunFileDamagedError(f"{damaged}: it is not {kind} ({reason})") from None
    if not isinstance(data, expected):
        shape = "a mapping" if expected is dict else "a list"
        raise RunFileDamagedError(f"{damaged}: it holds {type(data).__name__}, not {shape}")
    missing = [key for key in required if not has_key(data, key)]
    if missing:
        raise RunFileDamagedError(f"{damaged}: it lacks {', '.join(missing)}")
    return data


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
