"""Is this model name a local folder or a hub id? One answer for every command.

Users pass `--model`, `--vae`, `--adapter` (and datasets) as either a local folder or a
Hugging Face hub id (`org/name`). Guessing wrong is expensive both ways: a typo in a local path
looked up on the hub fails minutes later with a confusing network error (or, offline, with "not
found in the cache"), and a hub id taken for a folder is refused. The rule, in order:

1. the path exists: a folder (or, if it is a file, that is said);
2. it can only be a path: it starts with `/`, `.` or `~`, holds more than one `/`, uses the
   platform's separator, or is `org/name` where a local folder `org` exists (the user was
   clearly pointing into it): a folder that does not exist, said as such;
3. otherwise a hub id (`name` or `org/name`), resolved by the libraries (from the hub cache when
   offline).

No network and no model code here: only the name and the local filesystem are looked at.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Location:
    """Where a model name points. `kind` is "folder", "hub", "missing" (a path that is not
    there) or "file" (a path to a file where a folder is expected)."""

    name: str
    kind: str
    path: Path | None = None  # for folder / missing / file

    @property
    def local(self) -> bool:
        return self.kind != "hub"

    @property
    def ref(self) -> str:
        """What to hand to from_pretrained / load_config: the folder, or the hub id."""
        return str(self.path) if self.kind == "folder" else self.name

    def problem(self, what: str) -> str | None:
        """None when usable; else one line naming `what` (e.g. "--model") and the cause."""
        if self.kind == "missing":
            why = ""
            parent = self.path.parent if self.path is not None else None
            if self.name.count("/") == 1 and parent is not None and parent.is_dir() and not _path_like(self.name):
                why = f" ({parent} is a local folder, so this names a folder in it, not a hub id)"
            return f"{what} {self.name}: no such folder{why}"
        if self.kind == "file":
            return f"{what} {self.name}: is a file, not a folder"
        return None


def _path_like(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def locate(name: str) -> Location:
    """The Location of a model (or dataset) name, by the rule in the module docstring."""
    path = Path(name).expanduser()
    if path.exists():
        return Location(name, "folder" if path.is_dir() else "file", path.absolute())
    if _path_like(name):
        return Location(name, "missing", path.absolute())
    first = name.split("/", 1)[0]
    if "/" in name and first and Path(first).expanduser().is_dir():
        return Location(name, "missing", path.absolute())
    return Location(name, "hub")


def vae_location(name: str) -> tuple[str, str | None]:
    """(repo or folder, subfolder) of a VAE given on its own: a VAE folder or repo (subfolder
    None), or a model folder holding `vae/` (subfolder "vae")."""
    loc = locate(name)
    if loc.kind == "folder" and not (loc.path / "config.json").is_file() and (loc.path / "vae" / "config.json").is_file():
        return str(loc.path), "vae"
    return loc.ref, None


__all__ = ["Location", "locate", "vae_location"]
