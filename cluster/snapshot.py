"""A code snapshot per SLURM launch: the array tasks run the code the launch was made with.

Without it a task `cd`s into the live working tree when it *starts*, so code edited while an array waits
in the queue (or between a task and its requeue) changes what later tasks run, while MLflow records the
launch's commit. Here the launch copies the repository's code into `<output_root>/snapshots/<digest>/`
and the job script `cd`s there (cluster/slurm.py), so a task imports the snapshot, never the live tree.

What is copied: the code a task imports or reads, i.e. the package folders (core, cluster, sweeps,
reports, bench: configs and assets included) and pyproject.toml, as `git ls-files --cached --others
--exclude-standard` lists them: tracked files as they are on disk, edits included, plus untracked files
that are not ignored, so `outputs/`, `__pycache__/` and the like stay out. tests/ and the README are
not copied (no task runs them). Not a git checkout (an unpacked sdist): every file of those folders.
The launch run records the whole tree's `git diff HEAD` and untracked files, tests included.

Content-addressed: `<digest>` is a hash of every copied path, its executable bit and its bytes, so
launches of the same code share one folder and a snapshot folder never changes once it exists (it is
written to a temporary folder, checked against the digest, then renamed into place; a tree edited
during the copy fails the launch instead of giving a snapshot that is not what the digest says).

Why not submitit.helpers.RsyncSnapshot (the model for this): it `chdir`s the launching process into the
snapshot for the duration of a `with` block, `git clone`s the history into every snapshot, copies
tracked files only (untracked ones must be listed by the caller), stops with an rsync error when a
tracked file was deleted in the working tree, and re-uses a folder by syncing over it, so a file
removed from the tree stays in the snapshot. What we need is ~60 lines with none of that.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from core.config import REPO

PACKAGES = ("core", "cluster", "sweeps", "reports", "bench")  # [tool.setuptools] packages (tests/test_deps.py)
CODE = (*PACKAGES, "pyproject.toml")


@dataclass(frozen=True)
class Snapshot:
    path: Path                 # <output_root>/snapshots/<digest>
    digest: str
    files: tuple[str, ...]     # relative to the repository
    diff: str = ""             # `git diff HEAD` at launch ("" when no tracked file differs)
    untracked: tuple[str, ...] = ()

    @property
    def dirty(self) -> bool:
        return bool(self.diff or self.untracked)


def _git(repo: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, encoding="utf-8",
                             errors="replace", timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def _listed(out: str) -> list[str]:
    return [f for f in out.split("\0") if f]


def _hash(root: Path, files: list[str]) -> str:
    h = hashlib.sha256()
    for rel in files:
        p = root / rel
        st = p.lstat()
        h.update(rel.encode() + b"\0")
        if stat.S_ISLNK(st.st_mode):
            h.update(b"link\0" + os.readlink(p).encode())
        else:
            h.update(b"x\0" if st.st_mode & stat.S_IXUSR else b"-\0")
            h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def plan(output_root: str | Path, repo: Path = REPO, code: tuple[str, ...] = CODE) -> Snapshot:
    """What the snapshot of `code` (folders and files of `repo`) would be, and where; reads the tree,
    writes nothing (dry runs use it)."""
    listed = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *code)
    if listed is not None:
        untracked = tuple(sorted(_listed(_git(repo, "ls-files", "-z", "--others", "--exclude-standard") or "")))
        diff = _git(repo, "diff", "HEAD", "--binary") or ""
        candidates = _listed(listed)
    else:
        untracked, diff = (), ""
        candidates = [c for c in code if (repo / c).is_file()] + [
            str(p.relative_to(repo)) for c in code if (repo / c).is_dir()
            for p in (repo / c).rglob("*") if "__pycache__" not in p.parts]
    # A tracked file deleted in the working tree is not part of the code that runs; folders (submodules) are skipped.
    files = sorted({f for f in candidates if (repo / f).is_symlink() or (repo / f).is_file()})
    digest = _hash(repo, files)
    return Snapshot(Path(output_root).resolve() / "snapshots" / digest, digest, tuple(files), diff, untracked)


def write(snap: Snapshot, repo: Path = REPO) -> Path:
    """Copy the planned files into `snap.path` (nothing to do when a launch of the same code made it)."""
    if snap.path.is_dir():
        return snap.path
    tmp = snap.path.with_name(f".{snap.digest}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel in snap.files:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / rel, dst, follow_symlinks=False)
        got = _hash(tmp, list(snap.files))
        if got != snap.digest:
            raise RuntimeError(f"the code in {repo} changed while it was being copied to a snapshot "
                               f"(digest {snap.digest} planned, {got} copied); relaunch")
        try:
            os.rename(tmp, snap.path)
        except OSError:  # a concurrent launch of the same code renamed its copy first: same content
            if not snap.path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return snap.path


def record(c, run_id: str, snap: Snapshot) -> None:
    """On the launch run: the snapshot folder as a tag; when the tree was dirty, `git diff HEAD` and the
    untracked files it copied as artifacts (code/git_diff.patch, code/untracked.txt)."""
    from core import tracking
    c.set_tag(run_id, tracking.TAG + "snapshot", str(snap.path))
    if snap.diff:
        c.log_text(run_id, snap.diff, "code/git_diff.patch")
    if snap.untracked:
        c.log_text(run_id, "\n".join(snap.untracked) + "\n", "code/untracked.txt")
