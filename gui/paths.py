"""What the page may read and write: the path rules every handler goes through.

Anyone who reaches the page (with --share, anyone with the link and the login)
acts as the user running the app, and every request can carry any path, so no
handler trusts one. The page may read the data folder, the dataset folders the
user opened, the model and adapter files the user named and the output folders
of the app's jobs. It may write the data folder, captions in opened dataset
folders, and adapter copies into an existing folder the user chose. Gradio
itself serves only the data folder (`allowed_paths`), its upload folder and
what a handler returns; handlers return only thumbnails, previews and adapter
files (`gui.exports.servable`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from core.errors import UserError
from datasets_tools.formats import SUPPORTED_EXTENSIONS, UNSUPPORTED_EXTENSIONS
from datasets_tools.scan import ScanStopped, normalise_caption_extension
from datasets_tools.scan_limits import refuse_system_folder
from gui.datadir import DataDirs
from gui.safetensors_meta import adapter_problem

IMAGE_EXTENSIONS = SUPPORTED_EXTENSIONS | UNSUPPORTED_EXTENSIONS
# A caption is a line of tags; a bigger file next to an image is something else.
MAX_CAPTION_BYTES = 64 * 1024


def is_system_folder(folder: Path) -> bool:
    """A filesystem root, an operating-system folder (the scan's list, so a
    folder the page refuses is one the CLI refuses too) or the home folder
    itself, which holds everything and is never one dataset or LoRA folder."""
    try:
        refuse_system_folder(folder)
    except ScanStopped:
        return True
    return os.path.realpath(folder) == os.path.realpath(Path.home())


def existing_folder(text: str, what: str) -> Path:
    """`text` as an existing folder, resolved; UserError otherwise."""
    folder = Path(text.strip()).expanduser()
    if not text.strip():
        raise UserError(f"Enter the path of {what} (on the machine running this app).")
    if not folder.is_dir():
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UserError(f"{folder} {state}; enter the path of {what}.")
    return folder.resolve()


def dataset_folder(text: str) -> Path:
    """An existing folder that can be a dataset (not a system folder), resolved."""
    folder = existing_folder(text, "a folder of images")
    if is_system_folder(folder):
        raise UserError(f"{folder} is a system folder, a whole disk or your home folder, not a "
                        "folder of training images; enter the folder that holds your images "
                        "(and their caption files or kohya \"N_name\" subfolders).")
    return folder


# --- captions ----------------------------------------------------------------
def caption_extension(extension: str) -> str:
    """The scan's rule (datasets_tools.scan): a caption is written next to its
    image with this extension, so it must never name a file another program
    loads or runs."""
    return normalise_caption_extension(extension)


def image_in(folder: Path, rel_path: str) -> Path:
    """The image `rel_path` inside `folder`; anything else is refused."""
    path = (folder / rel_path).resolve()
    if not path.is_relative_to(folder) or not path.is_file() \
            or path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise UserError(f"{rel_path} is not an image in {folder}; pick one from the gallery.")
    return path


def caption_file(folder: Path, image: Path, extension: str) -> Path:
    """The caption file of `image`, to read or replace: refused when what is
    there is not a caption (a folder, a link, a binary or big file), so a
    caption edit never destroys another file."""
    path = image.with_suffix(caption_extension(extension))
    if not path.exists() and not path.is_symlink():
        return path
    why = None
    if path.is_symlink() or not path.is_file():
        why = "it is a link or a folder, not a caption file"
    elif path.stat().st_size > MAX_CAPTION_BYTES:
        why = f"it is bigger than {MAX_CAPTION_BYTES // 1024} KB, too big for a caption"
    else:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = "\0"
        if "\0" in text:
            why = "it is not a UTF-8 text file"
    if why:
        raise UserError(f"{path} is not a caption file ({why}); nothing was changed. Rename or "
                        "move that file, or use another caption extension.")
    return path


# --- adapters ------------------------------------------------------------------
def adapter_file(text: str | os.PathLike, what: str = "pick an adapter from the list") -> Path:
    """An existing LoRA/LyCORIS .safetensors file (by its header), resolved."""
    text = os.fspath(text or "")
    if not text.strip():
        raise UserError("Pick an adapter file first.")
    path = Path(text.strip()).expanduser()
    if not path.is_file():
        raise UserError(f"{path} is not a file; {what}.")
    problem = adapter_problem(path)
    if problem:
        raise UserError(f"{path} is not a LoRA/LyCORIS adapter file ({problem}); {what}.")
    return path.resolve()


def copy_target(source: Path, folder_text: str, overwrite: bool) -> Path:
    """Where a copy of the adapter `source` goes in the folder the user chose."""
    folder = existing_folder(folder_text, "an existing folder, e.g. "
                                          "/path/to/stable-diffusion-webui/models/Lora")
    if is_system_folder(folder):
        raise UserError(f"{folder} is a system folder, a whole disk or your home folder; copy "
                        "into an app's LoRA folder instead, e.g. "
                        "/path/to/stable-diffusion-webui/models/Lora.")
    target = folder / source.name
    if target.resolve() == source:
        raise UserError(f"{target} is the file itself; choose another folder.")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise UserError(f"{target} already exists; tick 'Overwrite' to replace it.")
        if target.is_symlink() or adapter_problem(target):
            raise UserError(f"{target} exists and is not an adapter file; it is never replaced, "
                            "even with 'Overwrite'. Move it away or choose another folder.")
    return target


class PathRules:
    """The folders this page's user opened, and the rules that depend on them.

    Held by the server process for the app's lifetime: a folder counts as
    opened once the user opened, uploaded or chose it in the Dataset tab.
    """

    def __init__(self, dirs: DataDirs, job_outputs: Callable[[], Iterable[str | Path]]):
        self.dirs = dirs
        self._job_outputs = job_outputs
        self._opened: set[Path] = set()
        self._lock = threading.Lock()

    def open_dataset(self, text: str) -> Path:
        """A folder the user asks to open: checked, then remembered as opened."""
        return self.register(dataset_folder(text))

    def register(self, folder: Path) -> Path:
        folder = folder.resolve()
        with self._lock:
            self._opened.add(folder)
        return folder

    def dataset(self, text: str) -> Path:
        """An opened dataset folder (or one in the data folder), for captions and checks."""
        folder = existing_folder(text, "a folder of images")
        with self._lock:
            opened = folder in self._opened
        if not (opened or folder.is_relative_to(self.dirs.datasets.resolve())):
            raise UserError(f"{folder} is not an opened dataset folder; press Open folder "
                            "first (the page edits captions and checks only in folders opened "
                            "there).")
        return folder

    def app_output(self, path: Path) -> bool:
        """Inside the data folder or the output folder of one of the app's jobs."""
        # A run may have been given output.dir = / or the like; that makes no file there the app's.
        runs = [f for f in map(Path, self._job_outputs()) if not is_system_folder(f)]
        return any(path.is_relative_to(f.resolve()) for f in [self.dirs.root, *runs])

    def writable_adapter(self, text: str) -> Path:
        """An adapter whose metadata the page may rewrite: one the app made."""
        path = adapter_file(text)
        if not self.app_output(path):
            raise UserError(f"{path} is not in the data folder or the output folder of a run "
                            "of this app; its metadata is edited only there. Copy it into "
                            f"{self.dirs.outputs} first, or edit a file from the list.")
        return path
