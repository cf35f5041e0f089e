"""The Wireshark dissector shipped with vfioproxy: where it is, and installing it.

``vfio_user.lua`` (package data, next to this module) dissects the pcapng
files ``vfioproxy trace export --format pcapng`` writes (docs/pcapng.md).
:func:`dissector_path` is its path, for ``tshark -X lua_script:PATH``;
:func:`install` copies it into Wireshark's personal Lua plugins folder,
which :func:`personal_plugins_folder` asks tshark for (``tshark -G
folders``), falling back to Wireshark's documented default. Imports nothing
else of vfioproxy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["DISSECTOR_NAME", "dissector_path", "install", "personal_plugins_folder"]

#: the file name the dissector has here and where it is installed
DISSECTOR_NAME = "vfio_user.lua"

#: the line of ``tshark -G folders`` that names the folder
_FOLDER_LABEL = "Personal Lua Plugins:"


def dissector_path() -> Path:
    """The path of the shipped ``vfio_user.lua``."""
    return Path(__file__).resolve().with_name(DISSECTOR_NAME)


def default_plugins_folder() -> Path:
    """Wireshark's documented personal plugin folder (the one Wireshark 4.0,
    4.2 and 4.4 read Lua plugins from): ``%APPDATA%\\Wireshark\\plugins`` on
    Windows, ``~/.local/lib/wireshark/plugins`` elsewhere."""
    if sys.platform == "win32" and os.environ.get("APPDATA"):
        return Path(os.environ["APPDATA"]) / "Wireshark" / "plugins"
    return Path.home() / ".local" / "lib" / "wireshark" / "plugins"


def personal_plugins_folder(tshark: str | None = None) -> Path:
    """Wireshark's personal Lua plugins folder: what ``tshark -G folders``
    says (``tshark``: its path; default: ``tshark`` on ``PATH``), or
    :func:`default_plugins_folder` when there is no tshark or it does not say
    (it is not run for more than 20 seconds)."""
    program = tshark or shutil.which("tshark")
    if program is not None:
        try:
            done = subprocess.run([program, "-G", "folders"], capture_output=True, text=True,
                                  timeout=20, check=False)
        except (OSError, subprocess.SubprocessError):
            done = None
        if done is not None and done.returncode == 0:
            for line in done.stdout.splitlines():
                if line.startswith(_FOLDER_LABEL):
                    folder = line[len(_FOLDER_LABEL):].strip()
                    if folder:
                        return Path(folder)
    return default_plugins_folder()


def install(dest: str | os.PathLike[str] | None = None, *, force: bool = False) -> Path:
    """Copy the dissector into the folder ``dest`` (created if missing; default:
    :func:`personal_plugins_folder`) and return the path written.

    A ``vfio_user.lua`` already there with the same bytes is left as it is;
    one with other bytes raises :class:`FileExistsError` unless ``force``,
    which replaces it. The copy is written to a temporary file in ``dest``
    and renamed over the target, so a failure leaves no half-written plugin
    (:class:`OSError` says what failed)."""
    folder = Path(dest) if dest is not None else personal_plugins_folder()
    source = dissector_path().read_bytes()
    target = folder / DISSECTOR_NAME
    if target.exists() and not target.is_file():
        raise IsADirectoryError(f"{target} exists and is not a file")
    if target.is_file():
        if target.read_bytes() == source:
            return target
        if not force:
            raise FileExistsError(
                f"{target} exists and is another version of the dissector (--force replaces it)")
    folder.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".vfio_user.", suffix=".lua")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(source)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise
    return target
