"""manifest.json: read, validate, and verify before anything runs; written by every exporter.

The manifest describes the artifacts (paths inside the export directory, sha256, inputs and outputs), the
tokenizer, the preprocessing and the schedule (prefill chunk, context, KV layout, embedding scales, default
sampling). Every write and every read validates against `manifest.schema.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jsonschema

from minicpm.errors import UserError

SCHEMA_VERSION = 1
SCHEMA = json.loads((Path(__file__).parent / "manifest.schema.json").read_text())


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | os.PathLike) -> str:
    """Digest of a directory artifact (a Core ML .mlpackage): sha256 over one line per file,
    `<relative POSIX path>\\0<sha256 of the file>\\n`, in sorted path order. Timestamps, permissions and listing
    order do not matter; adding, removing, renaming or changing any file does."""
    root = Path(path)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for relative in files:
        h.update(f"{relative}\0{sha256_file(root / relative)}\n".encode())
    return h.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """sha256_file for a file, sha256_tree for a directory artifact."""
    return sha256_tree(path) if Path(path).is_dir() else sha256_file(path)


def validate(manifest: dict) -> None:
    """Schema check with one readable line on failure."""
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"manifest schema_version {shown(repr(version), 40)} is not supported (this runtime reads "
                        f"{SCHEMA_VERSION})")
    try:
        jsonschema.validate(manifest, SCHEMA)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise UserError(f"manifest.json is invalid at {shown(where)}: {shown(e.message, 200)}") from None
    if "audio" in manifest["schedule"]["steps"] and not ("audio_cache" in manifest["schedule"]
                                                         and "audio" in manifest["preprocessing"]):
        raise UserError("manifest.json: an audio step needs schedule.audio_cache and preprocessing.audio")
    for step, spec in manifest["schedule"]["steps"].items():
        if spec["artifact"] not in manifest["artifacts"]:
            raise UserError(f"manifest.json: schedule step '{shown(step)}' names unknown artifact "
                            f"'{shown(spec['artifact'])}'")


def shown(text: str, limit: int = 80) -> str:
    """A manifest string as it may appear in a one-line message: control characters escaped, length capped."""
    return repr(text[:limit])[1:-1] + ("..." if len(text) > limit else "")


MAX_PATH_BYTES = 1024  # artifact paths are short relative names; longer ones are hostile, not files


def safe_path(root: Path, relative: str) -> Path:
    """`root/relative`, refusing absolute paths, overlong or NUL-carrying names and anything outside `root`."""
    if "\0" in relative or len(relative.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES \
            or any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in relative.split("/")):
        raise UserError(f"manifest path '{shown(relative, 60)}' is not a valid artifact path (NUL byte, or "
                        f"longer than {MAX_PATH_BYTES} bytes / 255 per name)")
    if os.path.isabs(relative) or relative.startswith(("/", "\\")):
        raise UserError(f"manifest path '{shown(relative)}' is absolute; artifact paths must stay inside the export "
                        "directory")
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise UserError(f"manifest path '{shown(relative)}' escapes the export directory")
    return target


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    validate(manifest)
    path = Path(directory) / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | os.PathLike, verify: bool = True) -> dict:
    """Load and validate `directory/manifest.json`; with `verify`, check every listed file's sha256."""
    root = Path(directory)
    path = root / "manifest.json"
    if not path.is_file():
        raise UserError(f"{root}: no manifest.json (not an export directory)")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: damaged or not a manifest)") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path}: invalid JSON ({str(e).splitlines()[0][:200]})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: the manifest must be a JSON object, got {type(manifest).__name__}")
    validate(manifest)
    entries = [(name, a) for name, a in manifest["artifacts"].items()]
    entries += [(f["path"], f) for f in manifest["files"]]
    for name, entry in entries:
        target = safe_path(root, entry["path"])
        try:
            present = target.is_file() or target.is_dir()  # directories: .mlpackage / .aimodel artifacts
            matches = not (present and verify) or sha256_path(target) == entry["sha256"]
        except OSError as e:
            raise UserError(f"{root}: artifact '{shown(name)}' ({shown(entry['path'])}) cannot be read "
                            f"({e.strerror})") from None
        if not present:
            raise UserError(f"{root}: artifact '{shown(name)}' is missing ({shown(entry['path'])})")
        if not matches:
            raise UserError(f"{root}: artifact '{shown(name)}' ({shown(entry['path'])}) does not match its sha256 in "
                            "manifest.json (modified or corrupt)")
    return manifest


def artifact_path(directory: str | os.PathLike, manifest: dict, name: str) -> Path:
    return safe_path(Path(directory), manifest["artifacts"][name]["path"])
